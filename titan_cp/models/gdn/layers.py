"""The modules of a GDN language model: norms, SwiGLU, the Gated DeltaNet and KDA layers, the block.

Parameter names of :class:`GatedDeltaNet` follow FLA's ``fla.layers.GatedDeltaNet``
one-to-one (q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, q_conv1d, k_conv1d,
v_conv1d, A_log, dt_bias, o_norm, o_proj); the block and model names are
TorchTitan's and differ from FLA's (the renames: :mod:`titan_cp.models.gdn.state_dict_adapter`).

Tensor names carry their layout: B batch, T (local) sequence length, D model
dim, H key heads, Hv value heads, K key head dim, V value head dim.

Under tensor parallelism the projections are head-sharded and the layer sees
only its local heads: head counts are always read from tensor shapes, never
from the config. Under context parallelism T is this rank's shard and all
sequence mixing goes through :func:`titan_cp.cp.mix_sequence`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from titan_cp.cp import CPContext, mix_sequence
from titan_cp.models.common.sequence import SequenceInfo
from titan_cp.cp.kernel_cp import kernel_over_shards, short_conv_over_shards
from titan_cp.ops import kda
from titan_cp.ops.gated_delta_rule.mixing import GDNMixingInputs, causal_short_conv, gdn_gates, l2norm
from titan_cp.models.common.dtensor import local_tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) in float32 (float64 for float64 inputs: half types are upcast, nothing is downcast)."""
        x_f = x.to(torch.promote_types(x.dtype, torch.float32))
        return x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_n = self.normalize(x)
        return (x_n * local_tensor(self.weight).to(x_n.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """FLA's FusedRMSNormGated (norm before gate): RMSNorm(o) * w * act(gate), act = silu
    (``activation='swish'``, GDN) or sigmoid (``'sigmoid'``, KDA)."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "swish"):
        super().__init__(dim, eps)
        self.activation = {"swish": F.silu, "sigmoid": torch.sigmoid}[activation]

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Shared by all heads; under TP each rank holds some heads, so its weight grad is partial.
        weight = local_tensor(self.weight, grad_is_partial=True)
        x_n = self.normalize(x)
        return (x_n * weight.to(x_n.dtype) * self.activation(gate.to(x_n.dtype))).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), TorchTitan's FeedForward naming."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)


class ShortConv(nn.Module):
    """Depthwise causal conv weights (FLA's ShortConvolution, no bias, SiLU applied by the caller).

    Only holds ``weight`` [C, 1, W]; the convolution itself (with the CP halo and
    document resets) is :func:`titan_cp.ops.gated_delta_rule.mixing.causal_short_conv`.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default init (what FLA's ShortConvolution uses).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))


def init_log_decay(A_log: torch.Tensor, dt_bias: torch.Tensor, A_min: float) -> None:
    """FLA's decay init, in place (so it works on sharded DTensor parameters too):
    A_log = log U(A_min, 16), dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 0.1] (floor 1e-4)."""
    with torch.no_grad():
        A_log.uniform_(A_min, 16).log_()
        dt_min, dt_max, dt_floor = 1e-3, 0.1, 1e-4
        dt = dt_bias.uniform_(0, 1)
        dt.mul_(math.log(dt_max) - math.log(dt_min)).add_(math.log(dt_min)).exp_().clamp_(min=dt_floor)
        dt.add_(torch.log(-torch.expm1(-dt)))  # inverse softplus


class DeltaRuleLayer(nn.Module):
    """What the Gated DeltaNet and KDA layers share, with FLA's names for both.

        q, k = l2norm(silu(conv(x W_q))), l2norm(silu(conv(x W_k)))   [B, T, H, K]   q_proj, k_proj, q_conv1d, k_conv1d
        v    = silu(conv(x W_v))                                       [B, T, Hv, V]  v_proj, v_conv1d
        g    = -exp(A_log) * softplus(a + dt_bias)                     A_log [Hv], dt_bias [Hv * dt_width]
        y    = o_proj(RMSNorm(o) * act(gate))                          o_norm (act = ``gate_activation``), o_proj

    A subclass adds its gate projections (``gate_linears``: what makes a, beta and the output gate,
    ``g_proj`` among them) and the sequence mixing; ``A_MIN`` is the low end of its A_log init.
    ``mixes_sequence`` marks it for the CP coverage guard (parallelize.py); ``self.cp`` (set by the
    parallelize function, None without CP) decides how the convs and the kernel cross shard boundaries.
    """

    A_MIN = 0.0
    mixes_sequence = True

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, expand_v: float, num_v_heads: int | None,
                 conv_size: int, norm_eps: float, kernel: str, dt_width: int, gate_activation: str):
        super().__init__()
        num_v_heads = num_v_heads or num_heads
        head_v_dim = int(head_dim * expand_v)
        if head_v_dim != head_dim * expand_v:
            raise ValueError(
                f"model.expand_v = {expand_v} times model.head_dim = {head_dim} is not an integer; "
                "pick expand_v so that head_dim * expand_v is whole."
            )
        if num_v_heads % num_heads != 0:
            raise ValueError(
                f"model.num_v_heads = {num_v_heads} must be a multiple of model.num_heads = {num_heads}."
            )
        self.head_dim, self.head_v_dim = head_dim, head_v_dim
        self.num_heads, self.num_v_heads = num_heads, num_v_heads
        self.kernel = kernel
        key_dim, value_dim = num_heads * head_dim, num_v_heads * head_v_dim
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.q_conv1d = ShortConv(key_dim, conv_size)
        self.k_conv1d = ShortConv(key_dim, conv_size)
        self.v_conv1d = ShortConv(value_dim, conv_size)
        self.A_log = nn.Parameter(torch.empty(num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_v_heads * dt_width))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps, activation=gate_activation)
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.cp: CPContext | None = None
        self.layer_name = ""

    def gate_linears(self) -> tuple[nn.Linear, ...]:
        raise NotImplementedError

    def init_weights(self, init_std: float) -> None:
        """FLA's init for A_log / dt_bias / convs (biases zero); TorchTitan's truncated normals for linears."""
        for linear in (self.q_proj, self.k_proj, self.v_proj, *self.gate_linears()):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.trunc_normal_(self.o_proj.weight, mean=0.0, std=init_std)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.reset_parameters()
        init_log_decay(self.A_log, self.dt_bias, self.A_MIN)

    def output(self, o_BTHV: torch.Tensor, x_BTD: torch.Tensor) -> torch.Tensor:
        """The token-local part after sequence mixing (also used by decoding): the gated RMSNorm per
        value head with the subclass's ``g_proj(x)`` as the gate, then o_proj."""
        B, T, _ = x_BTD.shape
        y_BTHV = self.o_norm(o_BTHV, self.g_proj(x_BTD).view(B, T, -1, self.head_v_dim))
        return self.o_proj(y_BTHV.reshape(B, T, -1))


class GatedDeltaNet(DeltaRuleLayer):
    """FLA's Gated DeltaNet layer, with context parallelism (:class:`DeltaRuleLayer` has the shared part).

        beta = sigmoid(x W_b)                                          [B, T, Hv]
        g    = -exp(A_log) * softplus(x W_a + dt_bias)                 [B, T, Hv]
        o    = gated_delta_rule(q, k, v, g, beta)   (q, k repeated to Hv heads)
        y    = o_proj(RMSNorm(o) * silu(x W_g))
    """

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, expand_v: float, num_v_heads: int | None,
                 conv_size: int, norm_eps: float, kernel: str):
        super().__init__(dim=dim, num_heads=num_heads, head_dim=head_dim, expand_v=expand_v,
                         num_v_heads=num_v_heads, conv_size=conv_size, norm_eps=norm_eps, kernel=kernel,
                         dt_width=1, gate_activation="swish")
        self.a_proj = nn.Linear(dim, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(dim, self.num_v_heads, bias=False)
        self.g_proj = nn.Linear(dim, self.num_v_heads * self.head_v_dim, bias=False)

    def gate_linears(self) -> tuple[nn.Linear, ...]:
        return self.a_proj, self.b_proj, self.g_proj

    def mixing_inputs(self, x_BTD: torch.Tensor, doc_starts_BT: torch.Tensor | None = None) -> GDNMixingInputs:
        """The token-local part before sequence mixing: projections, beta, g (also used by decoding)."""
        g_BTH, beta_BTH = gdn_gates(self.a_proj(x_BTD), self.b_proj(x_BTD), local_tensor(self.A_log),
                                    local_tensor(self.dt_bias))
        return GDNMixingInputs(
            q_BTC=self.q_proj(x_BTD),
            k_BTC=self.k_proj(x_BTD),
            v_BTC=self.v_proj(x_BTD),
            g_BTH=g_BTH,
            beta_BTH=beta_BTH,
            q_conv_weight=local_tensor(self.q_conv1d.weight),
            k_conv_weight=local_tensor(self.k_conv1d.weight),
            v_conv_weight=local_tensor(self.v_conv1d.weight),
            head_dim=self.head_dim,
            head_v_dim=self.head_v_dim,
            doc_starts_BT=doc_starts_BT,
        )

    def forward(self, x_BTD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        inputs = self.mixing_inputs(x_BTD, seq.doc_starts)
        o_BTHV = mix_sequence(inputs, kernel=self.kernel, cp=self.cp, layer_name=self.layer_name)
        return self.output(o_BTHV, x_BTD)


class KimiDeltaAttention(DeltaRuleLayer):
    """FLA's Kimi Delta Attention layer (``fla.layers.KimiDeltaAttention``, same parameter names), with CP.

        q, k, v as GDN's (:class:`DeltaRuleLayer`)
        g    = -exp(A_log) * softplus(f_proj(x) + dt_bias)             [B, T, Hv, K] (per key channel)
        beta = sigmoid(x W_b)                                          [B, T, Hv]
        o    = kda(q, k, v, g, beta)    S_t = (I - beta_t k_t k_t^T) diag(exp g_t) S_{t-1} + beta_t k_t v_t^T
        y    = o_proj(RMSNorm(o) * sigmoid(g_proj(x)))

    f_proj and g_proj are FLA's low-rank pairs (D -> V -> Hv K, and D -> V -> Hv V with a bias);
    A_log [Hv], dt_bias [Hv K]. The convs are GDN's (:func:`causal_short_conv`, halo under CP),
    the gates GDN's :func:`gdn_gates` broadcast per key channel; the kernel is ``titan_cp.ops.kda``
    per ``kernel``, over CP shards by :func:`titan_cp.cp.kernel_cp.kernel_over_shards` (every
    exchange and layout). Grouped value heads (Hv > H) repeat q, k as GDN does.
    """

    A_MIN = 1.0  # FLA's KDA: A_log = log U(1, 16)

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, expand_v: float, num_v_heads: int | None,
                 conv_size: int, norm_eps: float, kernel: str):
        super().__init__(dim=dim, num_heads=num_heads, head_dim=head_dim, expand_v=expand_v,
                         num_v_heads=num_v_heads, conv_size=conv_size, norm_eps=norm_eps, kernel=kernel,
                         dt_width=head_dim, gate_activation="sigmoid")
        Hv, V = self.num_v_heads, self.head_v_dim
        self.f_proj = nn.Sequential(nn.Linear(dim, V, bias=False), nn.Linear(V, Hv * head_dim, bias=False))
        self.b_proj = nn.Linear(dim, Hv, bias=False)
        self.g_proj = nn.Sequential(nn.Linear(dim, V, bias=False), nn.Linear(V, Hv * V, bias=True))

    def gate_linears(self) -> tuple[nn.Linear, ...]:
        return self.b_proj, *self.f_proj, *self.g_proj

    def conv_input(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-conv q | k | v [B, T, 2 H K + Hv V] (local heads under TP) and the three conv weights
        as one [C, 1, W]."""
        x_BTC = torch.cat([self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)], dim=-1)
        weight = torch.cat([local_tensor(c.weight) for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d)])
        return x_BTC, weight

    def heads(self, y_BTC: torch.Tensor, x_BTD: torch.Tensor):
        """Post-conv channels -> q, k [B, T, Hv, K] (L2-normalised), v [B, T, Hv, V], g [B, T, Hv, K], beta."""
        B, T, _ = x_BTD.shape
        f_BTHK = self.f_proj(x_BTD).view(B, T, -1, self.head_dim)
        # Local channels: v has Hv_local V, q and k H_local K each with H_local = Hv_local H / Hv.
        cv = f_BTHK.shape[2] * self.head_v_dim
        ck = (y_BTC.shape[-1] - cv) // 2
        q, k, v = y_BTC.split([ck, ck, cv], dim=-1)
        q, k = (l2norm(t.reshape(B, T, -1, self.head_dim)) for t in (q, k))
        v = v.reshape(B, T, -1, self.head_v_dim)
        if (groups := v.shape[2] // q.shape[2]) > 1:
            q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
        A_log, dt_bias = local_tensor(self.A_log), local_tensor(self.dt_bias)
        g, beta = gdn_gates(f_BTHK, self.b_proj(x_BTD), A_log[:, None], dt_bias.view(-1, self.head_dim))
        return q, k, v, g, beta

    def forward(self, x_BTD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        x_BTC, weight = self.conv_input(x_BTD)
        if self.cp is None or self.cp.size == 1:
            y_BTC = causal_short_conv(x_BTC, weight, doc_starts_BT=seq.doc_starts)
        else:
            y_BTC = short_conv_over_shards(x_BTC, weight, None, seq.doc_starts, self.cp, self.layer_name)
        q, k, v, g, beta = self.heads(y_BTC, x_BTD)
        o_BTHV = kernel_over_shards(q, k, v, g, beta, kernel=kda.get_kernel(self.kernel),
                                    segment_kernel=kda.get_segment_kernel(self.kernel), cp=self.cp,
                                    name=self.layer_name, doc_starts=seq.doc_starts)
        return self.output(o_BTHV, x_BTD)


class GDNBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + SwiGLU(norm(x)); with ``hidden_dim`` 0 no MLP
    (``feed_forward`` / ``ffn_norm`` None: transformers' Mamba-2 block, norm -> mixer -> residual)."""

    def __init__(self, layer_id: int, mixer: nn.Module, dim: int, hidden_dim: int, norm_eps: float, n_layers: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = mixer
        self.ffn_norm = RMSNorm(dim, norm_eps) if hidden_dim else None
        self.feed_forward = SwiGLU(dim, hidden_dim) if hidden_dim else None
        # TorchTitan's depth-scaled init for output projections.
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    def forward(self, x: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), seq)
        return h if self.feed_forward is None else h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        if self.feed_forward is not None:
            self.ffn_norm.reset_parameters()
            self.feed_forward.init_weights(self.init_std)
