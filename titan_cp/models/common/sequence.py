"""Where this rank's tokens sit in their sequences: what every titan_cp decoder computes once per forward.

Under CP a rank holds segments of each sequence (``titan_cp.cp.layout``);
:func:`sequence_info` maps its tokens to global indices, and with packed
documents (``positions`` restarting at 0) to document starts and ids, with
no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import rank_segments


@dataclass
class SequenceInfo:
    """Where this rank's tokens sit in their sequences; shared by every layer of a forward.

    doc_starts: [B, T] bool, True where a document starts (None: one document per row)
    positions:  [B, T] position of each token inside its document (RoPE)
    doc_ids:    [B, T] a globally consistent id of each token's document (its start index)
    """

    doc_starts: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None



def sequence_info(
    tokens: torch.Tensor, positions: torch.Tensor | None, cp: CPContext | None, doc_masking: bool = True
) -> SequenceInfo:
    """Global token index of this rank's tokens (from the CP layout), and document facts.

    With packed documents ``positions`` restart at 0 at every document start;
    a document's id is the global index of its first token (index - position),
    the same on every rank without any communication. Without ``positions``
    (or with ``doc_masking`` off) each row is one sequence and RoPE positions
    are the global token indices.
    """
    B, T = tokens.shape[:2]
    index = torch.arange(T * (cp.size if cp else 1), device=tokens.device)
    if cp is not None and cp.size > 1:
        index = rank_segments(index, 0, cp.rank, cp.size, cp.layout)
    index = index.expand(B, T)
    if positions is None or not doc_masking:
        return SequenceInfo(positions=index if positions is None else positions)
    return SequenceInfo(doc_starts=positions == 0, positions=positions, doc_ids=index - positions)
