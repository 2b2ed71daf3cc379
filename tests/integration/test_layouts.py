"""Every TorchTitan layout trains the same model: HSDP, pipeline parallel, CP, TP, 4D.

Real ``torchrun train.py`` runs on CPU (the setup of ``test_train_runs``: debug
GDN, 2 layers, seq_len 128, global batch 4 rows of synthetic packed documents,
6 AdamW steps, fp32), each started from nothing but ``--debug.seed`` (no seed
checkpoint: initialisation is layout-invariant, ``titan_cp/models/gdn/init.py``).
One launch per layout serves every check on it:

- the loss of every step equals the 1-rank run's (metrics.jsonl, exact repr);
- the final parameters equal the 1-rank run's (the step-6 DCP checkpoints,
  loaded in full): losses are all-reduced and cannot show replicas that drift
  apart, the parameters can;
- the grad norm printed by every rank is the same at every step (HSDP replicas
  that skip their all-reduce print different norms);
- step-1 loss equal on every layout (cp1 = the reference, cp2, tp2,
  dp_replicate 2, pp 2, ...): the same seed gives the same weights;
- ``max_loss >= loss`` at every step.

Tolerances (fp32, deterministic kernels). Layouts only reorder floating-point
reductions: CP folds chunk states across ranks in another association, TP
splits the contractions of o_proj / w2 / lm_head, FSDP / HSDP reduce-scatter
and all-reduce gradients in another order, PP sums microbatch gradients one
microbatch at a time. Each reorder costs a few ulp (fp32 eps 1.2e-7) per
accumulation.

- Losses: rel 1e-5 (as test_train_runs; measured <= ~2e-7).
- Parameters, per tensor: mean |difference| / mean |parameter| <= 1e-4
  (measured <= 4e-6) and max |difference| <= 1e-4 (measured <= 2.5e-5, one
  entry of 8192). AdamW amplifies the rounding of a near-zero gradient: its
  update lr * g / (|g| + eps) changes by up to lr / eps = 1.5e5 (lr 1.5e-3 at
  step 1, eps 1e-8) times the gradient's rounding error, so a 1e-10 difference
  of a gradient that nearly cancels moves that one entry by 1.5e-5; every other
  entry agrees to a few ulp. A real layout error moves whole tensors: replicas
  that skip their gradient all-reduce, a wrong shard or a lost microbatch give
  differences of ~lr = 3e-3 per entry per step (mean ratio ~1e-2 and up).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.support.train_runs import REPO, STEPS, SYNTHETIC_DATA, Runner, assert_losses_close, losses_at, needs_torchrun

REL_TOL = 1e-5
PARAM_MEAN_REL_TOL = 1e-4
PARAM_ATOL = 1e-4
GLOBAL_BATCH = 4

# name -> (ranks, data-parallel degree (batch split), layout overrides on train_configs/debug_cpu.toml)
LAYOUTS: dict[str, tuple[int, int, list[str]]] = {
    "ref": (1, 1, []),
    "cp2": (2, 1, ["--parallelism.context_parallel_degree", "2"]),
    "tp2": (2, 1, ["--parallelism.tensor_parallel_degree", "2"]),
    "dp_replicate2": (2, 2, ["--parallelism.data_parallel_replicate_degree", "2"]),
    "dp_replicate2_cp2": (4, 2, ["--parallelism.data_parallel_replicate_degree", "2",
                                 "--parallelism.context_parallel_degree", "2"]),
    "pp2": (2, 1, ["--parallelism.pipeline_parallel_degree", "2"]),
    # two virtual stages per rank: [tok_embeddings] [layers.0] | [layers.1] [norm, lm_head]
    "pp2_cp2": (4, 1, ["--parallelism.pipeline_parallel_degree", "2",
                       "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                       "--parallelism.context_parallel_degree", "2"]),
    # 4D: PP x FSDP (over the cp ranks) x TP x CP
    "pp2_cp2_tp2": (8, 1, ["--parallelism.pipeline_parallel_degree", "2",
                           "--parallelism.context_parallel_degree", "2",
                           "--parallelism.tensor_parallel_degree", "2"]),
}
FAST = ["cp2", "tp2", "dp_replicate2", "dp_replicate2_cp2", "pp2", "pp2_cp2"]
ALL = FAST + [pytest.param("pp2_cp2_tp2", marks=pytest.mark.slow)]
SEED = 7  # not TorchTitan's default: the init must follow --debug.seed


class LayoutRun:
    """One finished run: its metrics.jsonl records, console log and dump folder."""

    def __init__(self, root: Path, name: str, records: dict[int, dict]):
        self.name = name
        self.records = records
        self.dump = root / name
        self.log = (root / f"{name}.log").read_text()

    def grad_norms_by_rank(self) -> dict[int, dict[int, str]]:
        """{rank: {step: grad norm as printed}} from the ``[default<rank>]:``-prefixed console lines."""
        out: dict[int, dict[int, str]] = {}
        pattern = re.compile(r"^\[default(\d+)\]:.*step:\s*(\d+)\S*\s+loss:.*grad_norm:\s*([-\d.]+)")
        for line in self.log.splitlines():
            match = pattern.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
            if match:
                rank, step, norm = match.groups()
                out.setdefault(int(rank), {})[int(step)] = norm
        return out

    def final_params(self) -> dict[str, torch.Tensor]:
        """The model parameters of the last checkpoint, in full (DCP -> one torch.save file)."""
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = self.dump / "final_state.pt"
        if not out.exists():
            dcp_to_torch_save(self.dump / "checkpoint" / f"step-{STEPS}", out)
        state = torch.load(out, weights_only=False)
        # top-level tensors are the model's parameters (optimizer, train_state, ... are dicts)
        params = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        assert params, f"{self.name}: no parameters in {sorted(state)[:10]}"
        return params


class Layouts:
    def __init__(self, root: Path):
        self.runner = Runner(root)
        self.root = root

    def run(self, name: str) -> LayoutRun:
        nproc, dp, overrides = LAYOUTS[name]
        records = self.runner.launch(name, nproc, "debug_cpu", [
            "--training.local_batch_size", str(GLOBAL_BATCH // dp),
            "--debug.seed", str(SEED),
            *overrides,
        ], SYNTHETIC_DATA)
        return LayoutRun(self.root, name, records)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Layouts:
    return Layouts(tmp_path_factory.mktemp("layouts"))


@needs_torchrun
@pytest.mark.parametrize("name", ALL)
def test_layout_trains_like_one_rank(layouts, name):
    ref, run = layouts.run("ref"), layouts.run(name)
    steps = range(1, STEPS + 1)
    assert_losses_close(losses_at(run.records, steps), losses_at(ref.records, steps), REL_TOL, f"{name} vs 1 rank")

    want, got = ref.final_params(), run.final_params()
    assert sorted(got) == sorted(want)
    worst = {}
    for k in want:
        diff = (got[k] - want[k]).abs()
        mean_rel, largest = (diff.mean() / want[k].abs().mean()).item(), diff.max().item()
        if not (mean_rel <= PARAM_MEAN_REL_TOL and largest <= PARAM_ATOL):
            worst[k] = f"mean rel {mean_rel:.1e}, max {largest:.1e}"
    assert not worst, f"{name}: final parameters differ from 1 rank: {worst}"



@needs_torchrun
@pytest.mark.parametrize("name", ALL)
def test_every_rank_prints_the_same_grad_norm(layouts, name):
    """The symptom of replicas that train apart: ranks log different grad norms."""
    norms = layouts.run(name).grad_norms_by_rank()
    nproc = LAYOUTS[name][0]
    assert sorted(norms) == list(range(nproc)), f"{name}: grad norms printed by ranks {sorted(norms)}"
    for rank, by_step in norms.items():
        assert sorted(by_step) == list(range(1, STEPS + 1)), f"{name}: rank {rank} printed steps {sorted(by_step)}"
        assert by_step == norms[0], f"{name}: rank {rank} grad norms {by_step} != rank 0's {norms[0]}"


@needs_torchrun
@pytest.mark.parametrize("name", ALL)
def test_max_loss_is_at_least_the_loss(layouts, name):
    """max_loss (the worst rank's mean) can never be below the mean over all ranks."""
    records = layouts.run(name).records
    for step in range(1, STEPS + 1):
        loss, max_loss = records[step]["loss"], records[step]["max_loss"]
        assert math.isfinite(max_loss) and max_loss >= loss * (1 - 1e-6), (
            f"{name} step {step}: max_loss {max_loss} < loss {loss}")


@needs_torchrun
def test_same_seed_same_first_loss_on_every_layout(layouts):
    """No seed checkpoint: the step-1 loss (the initial weights) is the same on every layout."""
    first = {name: layouts.run(name).records[1]["loss"] for name in ["ref", "cp2", "tp2", "dp_replicate2", "pp2"]}
    assert_losses_close(list(first.values()), [first["ref"]] * len(first), REL_TOL, f"step-1 losses {first}")


# --- in process: init and start-up checks ----------------------------------------------------


def _init_on_ranks(rank, world, dp_shard, tp):
    """Each rank: meta model, parallelize_gdn (FSDP / TP, full AC), to_empty, init; return full params."""
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import FullAC

    from titan_cp.components import compat
    from titan_cp.models.gdn import model_config
    from titan_cp.models.gdn.parallelize import parallelize_gdn

    compat.apply()
    dims = ParallelDims(dp_replicate=1, dp_shard=dp_shard, cp=1, tp=tp, pp=1, ep=1, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    cfg = model_config("debug", layer_pattern="GA", attn_head_dim=16, init_seed=SEED)
    with torch.device("meta"):
        model = cfg.build()
    training = SimpleNamespace(mixed_precision_param="float32", mixed_precision_reduce="float32",
                               enable_cpu_offload=False)
    parallelism = SimpleNamespace(fsdp_reshard_after_forward="default")
    parallelize_gdn(model, parallel_dims=dims, training=training, parallelism=parallelism,
                    compile_config=None, ac_config=FullAC.Config(), dump_folder="/tmp")
    model.to_empty(device="cpu")
    torch.manual_seed(rank)  # the global RNG differs per rank: the init must not depend on it
    model.init_weights()
    from titan_cp.models.gdn.init import canonical_name

    return {canonical_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def test_init_is_the_same_on_tp_with_activation_checkpointing():
    """TP-sharded, AC-wrapped ranks with differently seeded global RNGs initialise the one-rank weights."""
    from titan_cp.testing import run_on_ranks
    from titan_cp.models.gdn import model_config

    cfg = model_config("debug", layer_pattern="GA", attn_head_dim=16, init_seed=SEED)
    reference = cfg.build()
    reference.init_weights()
    want = dict(reference.named_parameters())
    for rank, got in enumerate(run_on_ranks(_init_on_ranks, 2, args=(1, 2), timeout=600)):
        assert sorted(got) == sorted(want)
        for name, tensor in got.items():
            assert torch.equal(tensor, want[name]), f"rank {rank}: {name} differs from the one-rank init"
    other = model_config("debug", layer_pattern="GA", attn_head_dim=16, init_seed=SEED + 1).build()
    other.init_weights()
    assert not torch.equal(other.layers["0"].attention.q_proj.weight, want["layers.0.attention.q_proj.weight"])


def _pp_config(**settings):
    """debug_cpu.toml on 2 ranks with pp 2, plus ``{"section.key": TOML value}`` settings, validated."""
    from titan_cp.train.toml_config import build_config, load_toml

    values = load_toml(REPO / "train_configs" / "debug_cpu.toml")
    values["parallelism"]["pipeline_parallel_degree"] = 2
    for key, value in settings.items():
        section, field = key.split(".")
        values.setdefault(section, {})[field] = value
    return build_config(values, source="debug_cpu.toml", world_size=2)


@pytest.mark.parametrize("overrides,field", [
    ({"parallelism.pipeline_parallel_schedule": "ZBVZeroBubble"}, "parallelism.pipeline_parallel_schedule"),
    ({"parallelism.pipeline_parallel_schedule_csv": "s.csv"}, "parallelism.pipeline_parallel_schedule_csv"),
    ({"model.tie_embeddings": True}, "model.tie_embeddings"),
    ({"parallelism.pipeline_parallel_schedule": "Interleaved1F1B", "model.n_layers": 1},
     "parallelism.pipeline_parallel_degree"),
    ({"training.local_batch_size": 1}, "training.local_batch_size"),
])
def test_pipeline_settings_titan_cp_cannot_run_are_rejected_at_start_up(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        _pp_config(**overrides)


def test_pipeline_stage_split_is_configurable():
    """TorchTitan's automatic split and an explicit one; a split that reorders units is refused."""
    from titan_cp.models.common.pipeline import stage_split
    from titan_cp.models.common.preflight import validate

    config = _pp_config()
    assert stage_split(config.model_spec.model, config.parallelism) == [
        ["tok_embeddings", "layers.0"], ["layers.1", "norm", "lm_head"]]
    parts = [["tok_embeddings"], ["layers.0", "layers.1", "norm", "lm_head"]]
    config.parallelism.module_fqns_per_model_part = parts
    validate(config, world_size=2)
    assert stage_split(config.model_spec.model, config.parallelism) == parts
    config.parallelism.module_fqns_per_model_part = [["tok_embeddings", "layers.1"], ["layers.0", "norm", "lm_head"]]
    with pytest.raises(ValueError, match=re.escape("parallelism.module_fqns_per_model_part")):
        validate(config, world_size=2)
