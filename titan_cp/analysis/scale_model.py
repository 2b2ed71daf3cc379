"""Analytic scale model: what each GDN context-parallel exchange costs per layer, next to
the compute it has to hide behind, for P = 2 .. 1024 CP ranks.

Notation (per batch row, per rank, one GDN layer): H key heads, Hv value heads,
K key dim, V value dim, C kernel chunk (64), T = tokens per rank, P CP ranks,
TP tensor-parallel degree (heads split over it: Hv/TP per rank), ``sb`` state
bytes (fp32 = 4), ``ab`` activation bytes (bf16 = 2). Under CP a rank
summarises its shard as S_end = M S_start + S_local (M: K x K, S_local: K x V).

Bytes and rounds (fwd + bwd)
----------------------------
summary  = Hv/TP * K * (K + V) * sb          [S_local | M] of one rank
dstate   = Hv/TP * K * V * sb                a state gradient
halo     = (conv-1) * (2*Dk + Dv)/TP * ab    the conv halo, 1 p2p step each way

allgather   fwd: all-gather of summaries: each rank receives (P-1) * summary;
            bwd: all-gather of dS_start: (P-1) * dstate.
            ring algorithm: P-1 steps, step time = alpha + chunk / bw
            ("tree" / recursive doubling: ceil(log2 P) steps of 2^i chunks).
            fold: rank P-1 applies P-1 predecessors, S <- M_j S + S_j:
            (P-1) * 2 K^2 V flops per head, both directions.
logscan     fwd: exclusive prefix scan with (M2,S2)o(M1,S1) = (M2 M1, M2 S1 + S2):
            ceil(log2 P) rounds, one summary sent and received per round;
            bwd: mirrored suffix scan on (M^T, dS): ceil(log2 P) rounds of one
            summary. Round i talks to the rank 2^i away.
            combine: 2 K^2 (K + V) flops per head per round, both directions.
alltoall    head-parallel (Megatron-style): fwd all-to-all of the pre-conv
            q,k,v,a,b (2 Dk + Dv + 2 Hv values per token) to head-sharded full
            sequence, and of the output o (Dv per token) back; bwd mirrors both.
            Each all-to-all sends (P-1)/P * T * values * ab per rank,
            time = (P-1) alpha + bytes / bw (pairwise exchange).
            Needs H and Hv divisible by P * TP, else infeasible.
ring-attn   reference only (softmax attention of the same width, kv_dim =
            n_kv_heads * head_dim, default = dim): fwd passes K,V around the
            ring, P-1 steps of T * 2 * kv_dim * ab; bwd P-1 steps carrying K,V
            and dK,dV (twice the bytes). Attention's own O(L^2) compute that it
            overlaps with is not modelled.

Links
-----
Ranks are packed ``gpus_per_node`` to a node. A step among P ranks runs over
NVLink-class links (``intra_bw``, ``intra_latency``) while P <= gpus_per_node;
once P spans nodes every step (ring step, scan round at any distance, halo
exchange) has some pair crossing a node boundary, so it takes the per-GPU
inter-node link's time (``inter_bw``, ``inter_latency``). A step moving b bytes
per rank (sent and received at once, full duplex) takes latency + b / bw.
All-to-all splits its bytes into the intra-node share (G-1)/P and the
inter-node share (P-G)/P and takes the slower of the two, plus (P-1) latencies
(pairwise exchange). ``gpus_per_node=1`` makes every hop inter-node.

Compute (fwd + bwd of one block on one rank: T tokens, batch rows)
------------------------------------------------------------------
Matmul FLOPs per token, forward (per rank, divided by TP):
    proj   = 2 dim (2 Dk + 2 Dv + 2 Hv) + 2 Dv dim      q,k,v,g,a,b and o_proj
    conv   = 2 conv (2 Dk + Dv)                         depthwise short convs
    mlp    = 6 dim hidden                               SwiGLU w1, w3, w2
GDN chunk kernel: ``F_gdn(K, V, C) = 6 C K + 4 C V + 6 K V + C^2 / 3`` per token per
value head, forward (derived step by step in ``titan_cp/models/gdn/flops.py``, the
formula the training log's MFU uses too; K = 256, V = 512, C = 64: 1.017 MFLOP).
Backward = ``bwd_factor`` x forward for matmuls (2) and ``kernel_bwd_factor`` x
for the kernel (2.5: it recomputes the state pass). Time = matmul FLOPs /
``matmul_tflops`` + kernel FLOPs / ``kernel_tflops``. Defaults: 400 TFLOP/s
achieved dense bf16 matmul (H100), 85 TFLOP/s for the GDN kernel: FLA PR #691
measured 15.56 ms fwd+bwd for 32K tokens x 64 heads x (K = V = 128) on one
H800, i.e. 1.33 TFLOP under the formula above. Pass a measured rate instead.
Elementwise ops, norms and the loss are left out (they only lengthen compute,
so the crossing points below are conservative).

Summary-exchange CP also costs compute that does not shrink with P: running the
kernel at value width V + K to get M ([v | 0] trick, titan_cp/cp/state_passing.py) and the output
correction (q M) S_start (2 K V flops per token per head): reported as
``cp_compute_overhead``.

"Stops hiding" = the first P where exchange time (comm + fold, fwd + bwd)
exceeds ``hide_fraction`` of the block's compute time (or, for alltoall, where
it becomes infeasible).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from titan_cp.models.gdn.flops import gdn_chunk_flops_per_token
from titan_cp.analysis.shape import SHAPE_SOURCES, Dims

STRATEGIES = ("allgather", "logscan", "alltoall")
REFERENCE = "ring_attn"


def scan_rounds(p: int) -> int:
    """Rounds of a log-depth prefix scan over p ranks: ceil(log2 p) (0 for p = 1)."""
    if p < 1:
        raise ValueError(f"P must be >= 1, got {p}")
    return (p - 1).bit_length()


@dataclass(frozen=True)
class Network:
    inter_bw: float = 50e9  # bytes/s per GPU, inter-node (400 Gb/s NIC per GPU)
    inter_latency: float = 5e-6  # s per step
    intra_bw: float = 300e9  # bytes/s per GPU, NVLink-class
    intra_latency: float = 2e-6
    gpus_per_node: int = 8
    allgather_algo: str = "ring"  # "ring" | "tree"

    def link(self, span: int) -> tuple[float, float]:
        """(bandwidth, latency) of a hop/collective spanning ``span`` consecutive ranks."""
        if span <= self.gpus_per_node:
            return self.intra_bw, self.intra_latency
        return self.inter_bw, self.inter_latency


@dataclass(frozen=True)
class Compute:
    matmul_tflops: float = 400.0
    kernel_tflops: float = 85.0
    fold_tflops: float = 100.0  # small batched K x K matmuls of the fold / combine
    bwd_factor: float = 2.0
    kernel_bwd_factor: float = 2.5
    chunk_size: int = 64


@dataclass(frozen=True)
class Workload:
    batch: int = 1  # rows per rank
    tp: int = 1
    state_bytes: int = 4
    act_bytes: int = 2
    ref_kv_dim: int | None = None  # ring-attention reference kv width; None = dim


@dataclass
class Exchange:
    strategy: str
    feasible: bool = True
    bytes_fwd: float = 0.0  # received per rank
    bytes_bwd: float = 0.0
    steps_fwd: int = 0  # latency-bound steps / rounds of the exchange (the conv halo adds one p2p each way)
    steps_bwd: int = 0
    comm_s: float = 0.0  # fwd + bwd
    fold_s: float = 0.0  # fwd + bwd
    note: str = ""

    @property
    def time_s(self) -> float:
        return self.comm_s + self.fold_s if self.feasible else math.inf


# ----------------------------------------------------------------------------- compute


def layer_flops_per_token(shape: Dims, C: int = 64, tp: int = 1) -> dict[str, float]:
    """Forward FLOPs per token of one block on one rank, by part."""
    d, Dk, Dv, Hv = shape.dim, shape.key_dim, shape.value_dim, shape.Hv
    return {
        "proj": (2 * d * (2 * Dk + 2 * Dv + 2 * Hv) + 2 * Dv * d) / tp,
        "conv": 2 * shape.conv_size * (2 * Dk + Dv) / tp,
        "mlp": 6 * d * shape.hidden / tp,
        "kernel": Hv * gdn_chunk_flops_per_token(shape.K, shape.V, C) / tp,
    }


def layer_compute_s(shape: Dims, tokens: float, comp: Compute = Compute(), wl: Workload = Workload()) -> float:
    """fwd + bwd seconds of one block for ``tokens`` tokens per row on one rank."""
    f = layer_flops_per_token(shape, comp.chunk_size, wl.tp)
    n = tokens * wl.batch
    matmul = (f["proj"] + f["conv"] + f["mlp"]) * n * (1 + comp.bwd_factor) / (comp.matmul_tflops * 1e12)
    kernel = f["kernel"] * n * (1 + comp.kernel_bwd_factor) / (comp.kernel_tflops * 1e12)
    return matmul + kernel


def cp_compute_overhead_s(shape: Dims, tokens: float, comp: Compute = Compute(), wl: Workload = Workload()) -> float:
    """Extra fwd + bwd kernel time of summary CP: width V + K instead of V, plus (q M) S."""
    K, V, C = shape.K, shape.V, comp.chunk_size
    extra = gdn_chunk_flops_per_token(K, V + K, C) - gdn_chunk_flops_per_token(K, V, C) + 2 * K * V
    n = tokens * wl.batch * shape.Hv / wl.tp
    return extra * n * (1 + comp.kernel_bwd_factor) / (comp.kernel_tflops * 1e12)


# ----------------------------------------------------------------------------- exchanges


def summary_bytes(shape: Dims, wl: Workload = Workload()) -> float:
    """[S_local | M] of one rank, all batch rows: Hv/TP * K * (K + V) * state_bytes * batch."""
    return shape.Hv / wl.tp * shape.K * (shape.K + shape.V) * wl.state_bytes * wl.batch


def dstate_bytes(shape: Dims, wl: Workload = Workload()) -> float:
    return shape.Hv / wl.tp * shape.K * shape.V * wl.state_bytes * wl.batch


def halo_bytes(shape: Dims, wl: Workload = Workload()) -> float:
    return (shape.conv_size - 1) * (2 * shape.key_dim + shape.value_dim) / wl.tp * wl.act_bytes * wl.batch


def _halo_s(shape: Dims, P: int, net: Network, wl: Workload) -> float:
    if P <= 1:
        return 0.0
    bw, lat = net.link(P)  # the slowest neighbour hop: inter-node once P spans nodes
    return 2 * (lat + halo_bytes(shape, wl) / bw)  # fwd halo + bwd halo gradient


def _allgather_s(P: int, chunk: float, net: Network) -> float:
    if P <= 1:
        return 0.0
    if net.allgather_algo == "ring":
        bw, lat = net.link(P)
        return (P - 1) * (lat + chunk / bw)
    if net.allgather_algo == "tree":
        bw, lat = net.link(P)
        return scan_rounds(P) * lat + (P - 1) * chunk / bw
    raise ValueError(f"allgather_algo = '{net.allgather_algo}' is not one of ['ring', 'tree']")


def allgather_exchange(shape: Dims, P: int, net: Network = Network(), comp: Compute = Compute(),
                       wl: Workload = Workload()) -> Exchange:
    s, ds = summary_bytes(shape, wl), dstate_bytes(shape, wl)
    steps = 0 if P <= 1 else (P - 1 if net.allgather_algo == "ring" else scan_rounds(P))
    comm = _allgather_s(P, s, net) + _allgather_s(P, ds, net) + _halo_s(shape, P, net, wl)
    fold_flops = 2 * (P - 1) * 2 * shape.K ** 2 * shape.V * shape.Hv / wl.tp * wl.batch
    return Exchange("allgather", True, (P - 1) * s, (P - 1) * ds, steps, steps,
                    comm, fold_flops / (comp.fold_tflops * 1e12))


def logscan_exchange(shape: Dims, P: int, net: Network = Network(), comp: Compute = Compute(),
                     wl: Workload = Workload()) -> Exchange:
    s = summary_bytes(shape, wl)
    r = scan_rounds(P)
    bw, lat = net.link(P)
    comm = 2 * r * (lat + s / bw) + _halo_s(shape, P, net, wl)
    combine_flops = 2 * r * 2 * shape.K ** 2 * (shape.K + shape.V) * shape.Hv / wl.tp * wl.batch
    return Exchange("logscan", True, r * s, r * s, r, r,
                    comm, combine_flops / (comp.fold_tflops * 1e12))


def alltoall_values_per_token(shape: Dims) -> tuple[int, int]:
    """(values in: q,k,v,a,b pre-conv; values out: o) per token."""
    return 2 * shape.key_dim + shape.value_dim + 2 * shape.Hv, shape.value_dim


def _alltoall_s(P: int, bytes_per_rank_total: float, net: Network) -> float:
    """One all-to-all where a rank sends (P-1)/P of ``bytes_per_rank_total``."""
    if P <= 1:
        return 0.0
    per_peer = bytes_per_rank_total / P
    G = min(net.gpus_per_node, P)
    intra = (G - 1) * per_peer / net.intra_bw
    inter = (P - G) * per_peer / net.inter_bw
    lat = net.inter_latency if P > net.gpus_per_node else net.intra_latency
    return (P - 1) * lat + max(intra, inter)


def alltoall_exchange(shape: Dims, P: int, tokens: float, net: Network = Network(),
                      wl: Workload = Workload()) -> Exchange:
    ways = P * wl.tp
    if shape.H % ways or shape.Hv % ways:
        return Exchange("alltoall", False, note=f"heads {shape.H} not divisible by CP*TP = {ways}")
    vin, vout = alltoall_values_per_token(shape)
    n = tokens * wl.batch * wl.act_bytes / wl.tp
    b_in, b_out = n * vin, n * vout
    one_way = _alltoall_s(P, b_in, net) + _alltoall_s(P, b_out, net)
    frac = (P - 1) / P
    return Exchange("alltoall", True, frac * (b_in + b_out), frac * (b_in + b_out),
                    2 * (P > 1), 2 * (P > 1), 2 * one_way, 0.0)


def ring_attention_exchange(shape: Dims, P: int, tokens: float, net: Network = Network(),
                            wl: Workload = Workload()) -> Exchange:
    kv = (wl.ref_kv_dim or shape.dim) / wl.tp
    step = tokens * wl.batch * 2 * kv * wl.act_bytes
    bw, lat = net.link(P)
    steps = max(P - 1, 0)
    comm = steps * (lat + step / bw) + steps * (lat + 2 * step / bw)
    return Exchange(REFERENCE, True, steps * step, steps * 2 * step, steps, steps, comm, 0.0)


# ----------------------------------------------------------------------------- tables


@dataclass
class Row:
    P: int
    tokens_per_rank: float
    global_len: float
    compute_s: float
    cp_compute_overhead_s: float
    exchanges: dict[str, Exchange] = field(default_factory=dict)

    def ratio(self, strategy: str) -> float:
        return self.exchanges[strategy].time_s / self.compute_s


def sweep(shape: Dims, Ps: list[int], *, tokens_per_rank: float | None = None, global_len: float | None = None,
          net: Network = Network(), comp: Compute = Compute(), wl: Workload = Workload()) -> list[Row]:
    """One row per P, either at fixed tokens per rank or at fixed global length (``shape``: Dims or model config)."""
    shape = Dims.of(shape)
    if (tokens_per_rank is None) == (global_len is None):
        raise ValueError("give exactly one of tokens_per_rank, global_len")
    rows = []
    for P in Ps:
        T = tokens_per_rank if tokens_per_rank is not None else global_len / P
        rows.append(Row(
            P, T, T * P, layer_compute_s(shape, T, comp, wl), cp_compute_overhead_s(shape, T, comp, wl),
            {
                "allgather": allgather_exchange(shape, P, net, comp, wl),
                "logscan": logscan_exchange(shape, P, net, comp, wl),
                "alltoall": alltoall_exchange(shape, P, T, net, wl),
                REFERENCE: ring_attention_exchange(shape, P, T, net, wl),
            },
        ))
    return rows


def stops_hiding_at(rows: list[Row], strategy: str, hide_fraction: float) -> tuple[int | None, str]:
    """First P whose exchange exceeds hide_fraction of compute: (P, why), or (None, '') if none."""
    for row in rows:
        ex = row.exchanges[strategy]
        if not ex.feasible:
            return row.P, "infeasible"
        if ex.time_s > hide_fraction * row.compute_s:
            return row.P, f"{100 * row.ratio(strategy):.0f}%"
    return None, ""


def powers_of_two(lo: int = 2, hi: int = 1024) -> list[int]:
    out, p = [], 1
    while p <= hi:
        if p >= lo:
            out.append(p)
        p *= 2
    return out


def run_model(shapes: list[tuple[str, object]], Ps: list[int], tokens_per_rank: int, global_len: int, hide_fraction: float,
              net: Network = Network(), comp: Compute = Compute(), wl: Workload = Workload()) -> dict:
    """Everything the CLI prints, as plain data (the JSON output); ``shapes``: (name, ``GDNModel.Config``)."""
    out = {
        "network": asdict(net), "compute": asdict(comp), "workload": asdict(wl),
        "hide_fraction": hide_fraction, "tokens_per_rank": tokens_per_rank, "global_len": global_len,
        "models": [],
    }
    for name, model in shapes:
        shape = Dims.of(model)
        entry = {"name": name, "source": SHAPE_SOURCES.get(name, ""), "shape": asdict(shape),
                 "summary_bytes": summary_bytes(shape, wl), "modes": {}}
        for mode, kw in (("fixed_tokens_per_rank", {"tokens_per_rank": tokens_per_rank}),
                         ("fixed_global_len", {"global_len": global_len})):
            rows = sweep(shape, Ps, net=net, comp=comp, wl=wl, **kw)
            entry["modes"][mode] = {
                "rows": [
                    {"P": r.P, "tokens_per_rank": r.tokens_per_rank, "global_len": r.global_len,
                     "compute_s": r.compute_s, "cp_compute_overhead_s": r.cp_compute_overhead_s,
                     "exchanges": {k: asdict(e) | {"time_s": e.time_s if e.feasible else None,
                                                   "ratio": (e.time_s / r.compute_s) if e.feasible else None}
                                   for k, e in r.exchanges.items()}}
                    for r in rows
                ],
                "stops_hiding_at": {s: stops_hiding_at(rows, s, hide_fraction)[0] for s in STRATEGIES},
                "_rows": rows,
            }
        out["models"].append(entry)
    return out
