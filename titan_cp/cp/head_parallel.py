"""Head-parallel CP for GDN (``parallelism.cp_exchange = 'alltoall'``), Megatron-style.

Each rank holds L/P tokens of all (local-TP) heads. One all-to-all turns that
into all L tokens of H/P heads: rank r sends the channels of head group j of
its tokens to rank j, receives head group r of every rank's tokens and puts
the segments back in sequence order (any layout). The convs and the delta
rule then run on full sequences (:func:`titan_cp.ops.gated_delta_rule.mixing.mix_local`), and a
second all-to-all returns the outputs to sequence shards.

Cost per rank and layer (forward): (P-1)/P of its L/P tokens x
(2 H K + Hv V + 2 Hv) values out, Hv V back: it grows with L, unlike the
state-passing strategies. Heads (per TP rank) must divide by P: the error
says which. Backward: the same two all-to-alls with the gradients.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from titan_cp.cp.comm import AllToAll, all_gather_list
from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import reassemble, rank_segments
from titan_cp.ops.gated_delta_rule.mixing import GDNMixingInputs, mix_local


def _seq_to_heads(tensors: list[torch.Tensor], cp: CPContext, layer_name: str) -> list[torch.Tensor]:
    """[B, T_local, C_i] sequence shards -> [B, L, C_i / P] full sequences of this rank's head group."""
    P = cp.size
    B, T = tensors[0].shape[:2]
    widths = [t.shape[-1] // P for t in tensors]
    packed = torch.cat([t.reshape(B, T, P, -1) for t in tensors], dim=-1)  # [B, T, P, sum w]
    received = AllToAll.apply(packed.permute(2, 0, 1, 3), cp, layer_name, "alltoall_in")  # [P src, B, T, sum w]
    full = reassemble(list(received.unbind(0)), dim=1, layout=cp.layout)  # [B, L, sum w]
    return list(full.split(widths, dim=-1))


def _heads_to_seq(o_BLC: torch.Tensor, cp: CPContext, layer_name: str) -> torch.Tensor:
    """[B, L, C / P] of this rank's head group -> [B, T_local, C] of all heads."""
    P = cp.size
    shards = torch.stack([rank_segments(o_BLC, 1, r, P, cp.layout) for r in range(P)])  # [P dest, B, T, w]
    received = AllToAll.apply(shards, cp, layer_name, "alltoall_out")  # [P head group, B, T, w]
    return received.permute(1, 2, 0, 3).flatten(2)


def mix_head_parallel(inp: GDNMixingInputs, kernel: str, cp: CPContext, layer_name: str) -> torch.Tensor:
    """Convs + delta rule for this rank's head group on the full sequence. Returns o [B, T_local, Hv, V]."""
    P = cp.size
    H = inp.q_BTC.shape[-1] // inp.head_dim
    Hv = inp.v_BTC.shape[-1] // inp.head_v_dim
    if H % P or Hv % P:
        raise ValueError(
            f"parallelism.cp_exchange = 'alltoall' splits heads across CP ranks, but this rank has "
            f"{H} key heads and {Hv} value heads (model.num_heads / TP, model.num_v_heads / TP) for "
            f"context_parallel_degree = {P}. Heads must divide by CP x TP; use cp_exchange = "
            f"'allgather' or 'logscan', which have no such limit."
        )
    B, T = inp.q_BTC.shape[:2]
    q, k, v = _seq_to_heads([inp.q_BTC, inp.k_BTC, inp.v_BTC], cp, layer_name)
    g, beta = _seq_to_heads([inp.g_BTH, inp.beta_BTH], cp, layer_name)
    starts = None
    if inp.doc_starts_BT is not None:
        starts = reassemble(all_gather_list(inp.doc_starts_BT, cp.group, P), dim=1, layout=cp.layout)
    r = cp.rank

    def head_slice(weight: torch.Tensor) -> torch.Tensor:
        width = weight.shape[0] // P
        return weight[r * width:(r + 1) * width]

    full = replace(
        inp, q_BTC=q, k_BTC=k, v_BTC=v, g_BTH=g, beta_BTH=beta, doc_starts_BT=starts,
        q_conv_weight=head_slice(inp.q_conv_weight),
        k_conv_weight=head_slice(inp.k_conv_weight),
        v_conv_weight=head_slice(inp.v_conv_weight),
    )
    o_BLHV = mix_local(full, kernel)
    o_BTC = _heads_to_seq(o_BLHV.flatten(2), cp, layer_name)
    return o_BTC.reshape(B, T, Hv, inp.head_v_dim)
