"""The Qwen3.5 memory estimator against the real models' parameter counts, its dispatch from the public
entry points, and tools.max_context_table against the estimator (the length it reports fits, 2x does not)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from titan_cp.analysis.memory import estimate_memory, max_seq_len
from titan_cp.analysis.qwen3_5_memory import QwenDims, param_counts
from titan_cp.analysis.train_setup import Parallelism, TrainSetup
from titan_cp.library.planning import estimate_cp_memory
from titan_cp.models.qwen3_5.config_registry import DEBUG_SHAPE
from titan_cp.models.qwen3_5.flavors import torchtitan_config
from titan_cp.models.qwen3_5.model import titan_cp_config


@pytest.mark.parametrize("flavor", ["debugmodel", "debugmodel_moe"])
def test_param_count_matches_the_built_model(flavor):
    config = titan_cp_config(torchtitan_config(flavor, **DEBUG_SHAPE))
    model = config.build()
    assert param_counts(QwenDims.of(config))["total"] == sum(p.numel() for p in model.parameters())


def test_layout_dimensions_shrink_what_they_shard():
    config = titan_cp_config(torchtitan_config("35B-A3B"), kernel="triton", cp_layout="zigzag")
    setup = TrainSetup(seq_len=65536, ac="full", cp_layout="zigzag")
    base = estimate_memory(config, setup, Parallelism(dp=8))
    cp = estimate_memory(config, setup, Parallelism(cp=8))
    ep = estimate_memory(config, setup, Parallelism(cp=8, ep=8))
    pp = estimate_memory(config, replace(setup, batch=2, microbatches=2), Parallelism(cp=4, pp=2))
    assert cp.params == pytest.approx(base.params)  # FSDP over dp x cp either way
    assert cp.activations == pytest.approx(base.activations / 8)
    assert ep.fsdp_buffers < cp.fsdp_buffers and ep.params == pytest.approx(cp.params)
    assert pp.params < estimate_memory(config, setup, Parallelism(cp=4)).params
    with pytest.raises(ValueError, match="pp 3"):
        estimate_memory(config, setup, Parallelism(pp=3))


def test_kept_q_transition_is_hv_k_fp32_per_token_and_gdn_layer():
    """``cp_q_transition = 'keep'``: each GDN layer saves q M [T_local, Hv, K] fp32 (Hv / tp under TP);
    nothing without CP or with alltoall; the planning entry point reads it from the model config."""
    config = titan_cp_config(torchtitan_config("debugmodel", **DEBUG_SHAPE), cp_layout="zigzag")
    s = QwenDims.of(config).text
    setup = TrainSetup(seq_len=4096, act_dtype="fp32", cp_layout="zigzag")
    for par in (Parallelism(cp=2), Parallelism(cp=4, tp=2)):
        recompute = estimate_memory(config, setup, par)
        keep = estimate_memory(config, replace(setup, cp_q_transition="keep"), par)
        q_m = 4096 // par.cp * s.n_value_heads // par.tp * s.key_head_dim * 4
        assert keep.layer_terms["gdn:cp_q_transition"] == q_m and "gdn:cp_q_transition" not in recompute.layer_terms
        assert keep.activations - recompute.activations == pytest.approx(QwenDims.of(config).n_gdn * q_m)
    for unused, exchange in ((Parallelism(cp=1), "allgather"), (Parallelism(cp=2), "alltoall")):
        est = estimate_memory(config, replace(setup, cp_q_transition="keep", cp_exchange=exchange), unused)
        assert "gdn:cp_q_transition" not in est.layer_terms
    kept = estimate_cp_memory(replace(config, cp_q_transition="keep"), seq_len=4096, cp=2, act_dtype="fp32")
    assert kept.details_with_cp.layer_terms["gdn:cp_q_transition"] == 2048 * s.n_value_heads * s.key_head_dim * 4


def test_planning_entry_point_takes_qwen3_5():
    config = titan_cp_config(torchtitan_config("2B"), kernel="triton", cp_layout="zigzag")
    est = estimate_cp_memory(config, 131072, 8, activation_checkpointing=True, budget_gib=70)
    assert est.with_cp < est.without_cp and est.max_seq_len_with_cp > est.max_seq_len_without_cp > 0


def test_max_context_table_rows_fit_and_double_does_not():
    from tools.max_context_table import Args, best_rows, model_config, setup_for

    a = Args()
    rows = best_rows("35B-A3B", 16, a)
    best = rows[0]
    assert best.seq_len > 0 and best.par.cp > 1
    budget, model, setup = a.budget_gib * 2**30, model_config("35B-A3B"), setup_for(best.par, a)
    assert estimate_memory(model, replace(setup, seq_len=best.seq_len), best.par).total <= budget
    assert estimate_memory(model, replace(setup, seq_len=2 * best.seq_len), best.par).total > budget
    assert best.seq_len == max(r.seq_len for r in rows)
    assert max_seq_len(budget, model, setup, best.par, multiple_of=256 * best.par.cp) == best.seq_len


@pytest.mark.parametrize("dp,cp,tp,ep", [(2, 2, 2, 1), (1, 4, 2, 4), (2, 2, 2, 8), (1, 8, 1, 8), (2, 4, 1, 2)])
def test_sharded_parameters_match_the_parallelized_model(dp, cp, tp, ep):
    """The static term against titan_cp's own plan: debugmodel_moe parallelized by ``parallelize_qwen3_5_cp``
    (FSDP over dp_shard x cp, TP, EP with TorchTitan's efsdp) on meta tensors under a fake 8-rank process
    group: rank 0's local parameter count equals the estimator's (within FSDP's uneven-shard padding)."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import get_spmd_backend, set_spmd_backend

    from titan_cp.components import compat
    from titan_cp.models.qwen3_5.parallelize import parallelize_qwen3_5_cp

    if dist.is_initialized():
        pytest.skip("needs its own (fake) process group")

    class Cfg:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    compat.apply()
    backend = get_spmd_backend()
    dist.init_process_group("fake", rank=0, world_size=8, store=FakeStore())
    try:
        set_spmd_backend("partial_dtensor")
        dims = ParallelDims(dp_replicate=1, dp_shard=dp, cp=cp, tp=tp, pp=1, ep=ep, world_size=8,
                            spmd_backend="partial_dtensor")
        dims.build_mesh()
        config = titan_cp_config(torchtitan_config("debugmodel_moe", **DEBUG_SHAPE))
        with torch.device("meta"):
            model = config.build()
        parallelize_qwen3_5_cp(
            model, parallel_dims=dims, compile_config=None, ac_config=None, dump_folder="/tmp",
            training=Cfg(mixed_precision_param="float32", mixed_precision_reduce="float32", enable_cpu_offload=False),
            parallelism=Cfg(fsdp_reshard_after_forward="default", enable_sequence_parallel=True))
        local = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
        set_spmd_backend(backend)
    est = estimate_memory(config, TrainSetup(seq_len=1024, param_dtype="fp32"), Parallelism(dp=dp, cp=cp, tp=tp, ep=ep))
    assert est.params / 4 == pytest.approx(local, rel=5e-3)
    assert param_counts(QwenDims.of(config))["total"] / 8 == pytest.approx(local, rel=5e-3)  # every rank holds 1/8
