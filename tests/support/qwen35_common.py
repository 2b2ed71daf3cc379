"""Shared pieces of the Qwen3.5 tests: a tiny shape of TorchTitan's debug model, packed positions, transformers,
and the comparison of a parallel run with its one-rank reference."""

from __future__ import annotations

import math

import torch

# TorchTitan's debugmodel shrunk: 4 layers (3 GDN + 1 gated attention), grouped value heads
# (8 value heads over 4 key heads), GQA attention, partial RoPE on 8 of 16 channels.
TINY_SHAPE = dict(dim=32, n_layers=4, vocab_size=96, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=8,
                  hidden_dim=64, n_key_heads=4, n_value_heads=8, key_head_dim=8, value_head_dim=8,
                  mrope_section=[2, 1, 1], max_seq_len=512, rope_theta=10000.0)


def tiny_config(**fields):
    """Qwen35CPModel.Config of :data:`TINY_SHAPE` (``fields``: kernel, cp_layout, cp_exchange, ...)."""
    from titan_cp.models.qwen3_5.flavors import torchtitan_config
    from titan_cp.models.qwen3_5.model import titan_cp_config

    return titan_cp_config(torchtitan_config("debugmodel", **TINY_SHAPE), **fields)


def tiny_model(seed: int = 0, *, fla_decay: bool = True, dtype=torch.float32, **fields):
    """A tiny Qwen3.5 initialised by TorchTitan's init, with random (non-zero) norm offsets.

    ``fla_decay``: draw ``dt_bias`` like FLA (softplus(dt_bias) = dt in [1e-3, 0.1])
    instead of TorchTitan's / HF's 1.0. With dt_bias = 1 and A up to 16 most
    heads decay by ~e^-20 per token; their A_log / dt_bias gradients are ~1e-11
    and so ill-conditioned that the fp32 one-rank reference itself is 2e-4 off
    its float64 value, so fp32 comparisons at 1e-5 use FLA's decay and
    TorchTitan's init is checked in float64.
    """
    model = tiny_config(**fields).build()
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # TorchTitan zero-inits OffsetRMSNorm: make them count
                p.normal_(0.0, 0.2)
            if fla_decay and name.endswith("dt_bias"):
                dt = p.uniform_(0, 1).mul_(math.log(0.1) - math.log(1e-3)).add_(math.log(1e-3)).exp_()
                dt.add_(torch.log(-torch.expm1(-dt)))
    return model.to(dtype)


def packed_positions(B: int, T: int, starts: dict[int, list[int]]) -> torch.Tensor:
    """Per-document positions [B, T] (TorchTitan's convention): 0 at row start and at every listed start."""
    positions = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        last = 0
        for t in range(T):
            if t in starts.get(b, ()):
                last = t
            positions[b, t] = t - last
    return positions


def hf_causal_lm_class():
    """transformers' ``Qwen3_5ForCausalLM`` on its pure-PyTorch path (FLA's kernels need a GPU).

    transformers picks FLA's kernels when ``fla`` is importable, which it is
    here (TorchTitan's Qwen3.5 imports it); clearing the module globals it
    reads at construction selects ``torch_chunk_gated_delta_rule``, the torch
    causal conv and ``Qwen3_5RMSNormGated``.
    """
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    for name in ("FusedRMSNormGated", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
                 "causal_conv1d_fn", "causal_conv1d_update"):
        setattr(hf, name, None)
    return hf.Qwen3_5ForCausalLM


def hf_config_of_tiny():
    from transformers import Qwen3_5TextConfig

    from titan_cp.models.qwen3_5.flavors import hf_text_config, shape_of

    return Qwen3_5TextConfig(**hf_text_config(shape_of(tiny_config())))


def hf_moe_causal_lm_class():
    """transformers' ``Qwen3_5MoeForCausalLM`` on its pure-PyTorch path (as :func:`hf_causal_lm_class`)."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

    for name in ("FusedRMSNormGated", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
                 "causal_conv1d_fn", "causal_conv1d_update"):
        setattr(hf, name, None)
    return hf.Qwen3_5MoeForCausalLM


def hf_moe_config_of(config):
    """``Qwen3_5MoeTextConfig`` of a TorchTitan MoE Qwen3.5 config (e.g. ``debugmodel_moe`` resized)."""
    from transformers import Qwen3_5MoeTextConfig

    from titan_cp.models.qwen3_5.flavors import hf_text_config, shape_of

    moe = next(layer.moe for layer in config.layers if layer.moe is not None)
    fields = hf_text_config(shape_of(config)) | dict(
        num_experts=moe.num_experts, num_experts_per_tok=moe.router.top_k,
        moe_intermediate_size=moe.routed_experts.inner_experts.hidden_dim,
        shared_expert_intermediate_size=moe.shared_experts.w1.out_features)
    return Qwen3_5MoeTextConfig(**fields)


def one_rank_errors(history, state, ref_history, ref_state) -> dict[str, float]:
    """Relative errors of a parallel run against the one-rank run of the same steps.

    ``history``: per step ``(loss, {name: full gradient})`` (loss None on a rank
    that has none, e.g. a non-last pipeline stage); ``state``: ``{name: full
    tensor}`` after the steps (parameters, expert biases). Keys ``step{i}.loss``,
    ``step{i}.grad.<name>``, ``final.<name>``; every gradient and tensor this
    rank holds is compared, and the reference must have all of them.
    """
    from titan_cp.testing import rel_err

    errors = {}
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(history, ref_history, strict=True)):
        if loss is not None:
            errors[f"step{step}.loss"] = rel_err(loss, ref_loss)
        errors |= {f"step{step}.grad.{n}": rel_err(g, ref_grads[n]) for n, g in grads.items()}
    return errors | {f"final.{n}": rel_err(v, ref_state[n]) for n, v in state.items()}


def assert_within(errors: dict[str, float], tolerance: float, label: str) -> None:
    """Every error of :func:`one_rank_errors` within ``tolerance`` (NaN fails); prints the worst one."""
    worst = max(errors, key=errors.get)
    print(f"{label}: worst {worst} = {errors[worst]:.2e} ({len(errors)} checks)")
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    assert not bad, f"{label}: {bad}"


class _Fields:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def parallel_qwen3_5(config, dims):
    """``config`` built on meta, parallelized by titan_cp's Qwen3.5 ``parallelize_fn`` on ``dims`` (fp32, gloo).

    Then materialised and initialised; FSDP reduces with a plain sum (gloo has no PREMUL_SUM).
    """
    from titan_cp.models.qwen3_5.parallelize import parallelize_qwen3_5_cp

    with torch.device("meta"):
        model = config.build()
    parallelize_qwen3_5_cp(
        model, parallel_dims=dims, compile_config=None, ac_config=None, dump_folder="/tmp",
        training=_Fields(mixed_precision_param="float32", mixed_precision_reduce="float32",
                         enable_cpu_offload=False),
        parallelism=_Fields(fsdp_reshard_after_forward="default"),
    )
    model.to_empty(device="cpu")
    model.init_weights()
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)
    return model


def load_hf_checkpoint(model, path) -> list[str]:
    """TorchTitan's checkpointer's HF load (``to_hf`` -> ``dcp.load`` with the HF reader -> ``from_hf``).

    Works on plain and on parallelized (DTensor) models; returns the model keys the checkpoint did not fill.
    """
    import torch.distributed.checkpoint as dcp

    from titan_cp.models.qwen3_5.state_dict_adapter import Qwen35CPStateDictAdapter

    adapter = Qwen35CPStateDictAdapter(model.config, str(path))
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(str(path)))
    missing, unexpected = model.load_state_dict(adapter.from_hf(hf_state), strict=False)
    assert not unexpected, unexpected
    return list(missing)
