"""The CP context and the sequence sharding of token tensors, for any PyTorch training loop.

A CP group of P ranks splits every sequence of length L into segments
(``layout``: ``contiguous`` = P segments, rank r holds segment r; ``zigzag`` =
2P segments, rank r holds r and 2P-1-r, concatenated) and each rank holds
L / P tokens of every row. Everything that is a function of the token
position is sharded the same way: token ids, labels, positions, document
starts.

Packed rows (several documents in one row) carry their document boundaries as
``positions`` [B, L] that restart at 0 at every document start
(:func:`packed_positions`); titan_cp's model reads ``positions == 0`` as the
document starts and the op-level calls take ``doc_starts`` [B, L] bool. Shard
them with the tokens: the boundary facts stay exact on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from titan_cp.cp.context import CPContext
from titan_cp.cp.settings import EXCHANGES, Q_TRANSITIONS
from titan_cp.cp.layout import LAYOUTS, rank_segments, unshard_sequence
from titan_cp.errors import ConfigError, unknown_choice_message


def cp_context(
    group: dist.ProcessGroup | DeviceMesh | None = None,
    *,
    mesh_dim: str | int | None = None,
    layout: str = "contiguous",
    exchange: str = "allgather",
    q_transition: str = "recompute",
) -> CPContext:
    """The CP context over a process group or one dimension of a DeviceMesh.

    group:    a ``ProcessGroup``, a ``DeviceMesh`` (1-D, or with ``mesh_dim`` naming the
              CP dimension), or None for the default (WORLD) group.
    layout:   ``contiguous`` or ``zigzag`` (which segments a rank holds, module docstring).
    exchange: how GDN layers cross shard boundaries: ``allgather`` (one all-gather of the
              shard summaries), ``logscan`` (log-depth prefix scan; contiguous layout only),
              ``alltoall`` (head-parallel: heads divisible by P).
    q_transition: what state passing keeps of q_t M_<=t for the backward: ``recompute``
              (nothing token-sized; the backward recomputes it) or ``keep`` (saved from the
              forward: 4 H K bytes per token and layer more, a faster backward); not for
              ``alltoall`` (no q M there). titan_cp.cp.settings.
    Raises ``ConfigError`` naming the argument before any communication.
    """
    if layout not in LAYOUTS:
        raise ConfigError(unknown_choice_message("cp_context(layout)", layout, LAYOUTS))
    if exchange not in EXCHANGES:
        raise ConfigError(unknown_choice_message("cp_context(exchange)", exchange, EXCHANGES))
    if q_transition not in Q_TRANSITIONS:
        raise ConfigError(unknown_choice_message("cp_context(q_transition)", q_transition, Q_TRANSITIONS))
    if q_transition != "recompute" and exchange == "alltoall":
        raise ConfigError(f"cp_context(q_transition={q_transition!r}) has no effect with exchange='alltoall' "
                          "(head-parallel: no q M); drop q_transition, or use exchange='allgather' / 'logscan'.")
    if exchange == "logscan" and layout != "contiguous":
        raise ConfigError(
            "cp_context(exchange='logscan') needs layout='contiguous' (the scan runs over ranks in "
            "sequence order); use exchange='allgather' with layout='zigzag'."
        )
    if isinstance(group, DeviceMesh):
        if mesh_dim is None and group.ndim != 1:
            raise ConfigError(
                f"cp_context(mesh_dim) is needed for a {group.ndim}-D DeviceMesh "
                f"(dimensions {group.mesh_dim_names}); name the CP dimension, e.g. mesh_dim='cp'."
            )
        names = group.mesh_dim_names or ()
        if isinstance(mesh_dim, str) and mesh_dim not in names:
            raise ConfigError(unknown_choice_message("cp_context(mesh_dim)", mesh_dim, names))
        group = group.get_group(mesh_dim if mesh_dim is not None else 0)
    elif mesh_dim is not None:
        raise ConfigError("cp_context(mesh_dim) is only for a DeviceMesh; pass the mesh, or drop mesh_dim.")
    if group is None:
        if not dist.is_initialized():
            raise ConfigError(
                "cp_context(): torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first (torchrun sets the environment)."
            )
        group = dist.group.WORLD
    return CPContext(group=group, layout=layout, exchange=exchange, q_transition=q_transition)


def shard_sequence(x: torch.Tensor, cp: CPContext | None, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (tokens, labels, positions, doc starts; [B, L, ...]).

    ``x.shape[dim]`` must divide by the layout's segments (P, or 2P for zigzag).
    ``cp`` None: ``x`` unchanged. Differentiable (a slice).
    """
    if cp is None or cp.size == 1:
        return x
    return rank_segments(x, dim, cp.rank, cp.size, cp.layout)


def gather_sequence(x_local: torch.Tensor, cp: CPContext | None, dim: int = 1) -> torch.Tensor:
    """The full-sequence tensor from every rank's shard, in sequence order (inverse of
    :func:`shard_sequence`; an all-gather, not differentiable: for logging, eval, checks)."""
    if cp is None or cp.size == 1:
        return x_local
    return unshard_sequence(x_local, dim, cp.group, cp.layout)


def packed_positions(doc_starts: torch.Tensor) -> torch.Tensor:
    """Positions inside each document [B, L] (int64) from the document starts [B, L] bool of packed rows.

    A row always starts a document at position 0 (also when it continues a document cut by
    the previous row, as TorchTitan packs text). ``packed_positions(d) == 0`` gives back
    ``d`` with its first column set.
    """
    B, L = doc_starts.shape
    index = torch.arange(L, device=doc_starts.device).expand(B, L)
    starts = doc_starts.clone()
    starts[:, 0] = True
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start
