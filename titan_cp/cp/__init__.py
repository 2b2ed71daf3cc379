"""Context parallelism (CP) for GDN and hybrid models: only what crosses shard boundaries.

- layout.py: which rank holds which segments of a sequence (contiguous, zigzag).
- context.py: :class:`CPContext`, the group + layout + exchange strategy a layer runs under.
- comm.py: every collective CP issues, with byte/round accounting (:data:`comm_stats`).
- halo.py: the W-1 pre-conv tokens before each segment (short convs).
- state_passing.py: GDN's shard summaries (M, S_local), their exchange
  (``allgather`` / ``logscan``) and the corrected outputs.
- head_parallel.py: GDN's head-parallel strategy (``alltoall``).
- ring_attention.py: causal softmax attention over the CP ring (hybrid models).
- block_attention.py: one query block against one key block with its LSE (the ring's block ops;
  torch's fused flash-attention kernel on CPU).

:func:`mix_sequence` is the one entry point of a GDN layer's sequence mixing.
"""

from __future__ import annotations

import torch

from titan_cp.cp.comm import comm_stats
from titan_cp.cp.context import CPContext
from titan_cp.cp.settings import EXCHANGES
from titan_cp.cp.head_parallel import mix_head_parallel
from titan_cp.cp.state_passing import mix_state_passing
from titan_cp.ops.gated_delta_rule.mixing import GDNMixingInputs, mix_local


@torch.compiler.disable
def mix_sequence(inp: GDNMixingInputs, *, kernel: str, cp: CPContext | None, layer_name: str = "") -> torch.Tensor:
    """The sequence-mixing part of a GDN layer under any CP strategy. Returns o [B, T, Hv, V].

    No CP (or one rank): :func:`titan_cp.ops.gated_delta_rule.mixing.mix_local`; ``alltoall``:
    head-parallel; ``allgather`` / ``logscan``: state passing. Runs eagerly
    under torch.compile (a graph break around it): the kernels and CP
    communication stay as written, the token-local rest of the block is
    compiled.
    """
    if cp is None or cp.size == 1:
        return mix_local(inp, kernel)
    if cp.exchange == "alltoall":
        return mix_head_parallel(inp, kernel, cp, layer_name)
    return mix_state_passing(inp, kernel, cp, layer_name)


__all__ = ["EXCHANGES", "CPContext", "comm_stats", "mix_sequence"]
