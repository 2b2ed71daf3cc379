"""Real `torchrun train.py` runs on CPU: every layout trains like one rank; checkpoints resume.

All runs share one tiny setup (GDN debug flavor, 2 layers, seq_len 128, global
batch 4 rows, 6 steps, synthetic packed documents whose global batch does not
depend on the data-parallel degree, fp32) and one initialisation: a seed
checkpoint made once on one rank and loaded by every run
(``checkpoint.initial_load_path``), which exercises TorchTitan's seed-checkpoint
path. (Fresh runs with the same seed start from the same weights on every
layout too: ``tests/test_layouts.py``.)

Runs are module-scoped and shared between assertions; the 8-rank layout is
``@pytest.mark.slow``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from titan_cp.metrics import read_metrics_jsonl

STEPS = 6
CKPT_STEP = 3
GLOBAL_BATCH = 4
SEQ_LEN = 128

# Tolerance of a layout's per-step loss against the 1-rank run. Everything is
# fp32 and deterministic; layouts differ only in the order of floating-point
# reductions: TP splits the contraction of o_proj / w2 over ranks, CP folds
# chunk states across ranks in a different association, FSDP/DP
# reduce-scatters gradients in a different order. Each reorder costs a few ulp
# (fp32 eps = 1.2e-7) per accumulation, and 6 AdamW steps at lr 3e-3 barely
# amplify it: measured differences on this setup are <= 1.2e-7 relative (one
# ulp of the loss). rel 1e-5 leaves ~100x headroom for other BLAS builds and
# thread counts while still catching real errors (a wrong shard, a state not
# handed over or leaking across a document start, a dropped gradient all move
# the loss by >= 1e-3).
REL_TOL = 1e-5
# The same run interrupted at CKPT_STEP and resumed on the same layout.
RESUME_REL_TOL = 1e-6

LAYOUTS = {  # run name -> (ranks, train_configs file, extra overrides)
    "cp2": (2, "cp2", []),
    # TorchTitan's "headtail" sharding feeding the model's zigzag fold, end to end
    "cp2_zigzag": (2, "cp2", ["--parallelism.cp_layout", "zigzag"]),
    "tp2": (2, "tp2", []),
    "dp2_cp2": (4, "dp2_cp2", []),
    "cp2_tp2": (4, "cp2_tp2", []),
    "dp2_cp2_tp2": (8, "dp2_cp2_tp2", []),
}
DP = {"dp2_cp2": 2, "dp2_cp2_tp2": 2}

needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by up to 8 ranks
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env["LOG_RANK"] = "all"  # every rank prints its step lines
    return env


def _common_args() -> list[str]:
    return [
        "--model.n_layers", "2",
        "--training.seq_len", str(SEQ_LEN),
        "--training.steps", str(STEPS),
        "--optimizer.lr", "3e-3",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--checkpoint.enable",
        "--checkpoint.interval", str(CKPT_STEP),
        "--checkpoint.last_save_model_only", "false",
        "--comm.trace_buf_size", "0",
        "--debug.enable_structured_logging", "false",
    ]


SYNTHETIC_DATA = [
    "--data.dataset", "synthetic",
    "--data.kind", "pattern",
    "--data.mean_doc_len", "40",  # several document boundaries per row, some across CP shards
]
# The shipped corpus: real packed documents ([BOS] text [EOS], positions restarting at each).
# TorchTitan's text loader splits it by data-parallel rank, so only dp = 1 layouts share its batches.
SHIPPED_DATA = ["--data.dataset", "tiny_corpus"]


class Runner:
    """Launches and caches torchrun runs for the module (shared between assertions)."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, dict[int, dict]] = {}

    def launch(self, name: str, nproc: int, config: str, extra: list[str], data: list[str] = SYNTHETIC_DATA
               ) -> dict[int, dict]:
        if name in self.done:
            return self.done[name]
        dump = self.root / name
        cmd = [
            # --tee 3: every output line carries its rank ("[default<rank>]:")
            "torchrun", "--standalone", f"--nproc_per_node={nproc}", "--tee", "3", str(REPO / "train.py"),
            "--job.config_file", str(REPO / "train_configs" / f"{config}.toml"),
            *_common_args(),
            *data,
            "--job.dump_folder", str(dump),
            *extra,
        ]
        proc = subprocess.run(cmd, check=False, cwd=self.root, env=_env(), capture_output=True, text=True, timeout=900)
        (self.root / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise AssertionError(f"run {name} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
        metrics = dump / "metrics.jsonl"
        self.done[name] = read_metrics_jsonl(str(metrics)) if metrics.exists() else {}
        return self.done[name]

    @property
    def seed_path(self) -> str:
        if "seed" not in self.done:
            self.launch("seed", 1, "debug_cpu", ["--checkpoint.create_seed_checkpoint",
                                                  "--parallelism.data_parallel_shard_degree", "1"])
        return str(self.root / "seed" / "checkpoint" / "step-0")

    def layout(self, name: str, extra: list[str] = (), data: list[str] = SYNTHETIC_DATA) -> dict[int, dict]:
        """A training run from the seed checkpoint; name is 'ref' (1 rank) or a LAYOUTS key."""
        run_name = name if data is SYNTHETIC_DATA else f"{name}_shipped"
        if name == "ref":
            nproc, config, layout_args = 1, "debug_cpu", []
        else:
            nproc, config, layout_args = LAYOUTS[name]
        return self.launch(run_name, nproc, config, [
            "--training.local_batch_size", str(GLOBAL_BATCH // DP.get(config, 1)),
            "--checkpoint.initial_load_path", self.seed_path,
            "--checkpoint.initial_load_model_only", "true",
            *layout_args,
            *extra,
        ], data)

    def resume(self, name: str, from_run: str, nproc: int, config: str) -> dict[int, dict]:
        """Continue ``from_run``'s step-CKPT_STEP checkpoint (full state) on another layout."""
        ckpt = self.root / from_run / "checkpoint" / f"step-{CKPT_STEP}"
        assert ckpt.is_dir(), f"{from_run} saved no step-{CKPT_STEP} checkpoint"
        return self.launch(name, nproc, config, [
            "--training.local_batch_size", str(GLOBAL_BATCH // DP.get(config, 1)),
            "--checkpoint.initial_load_path", str(ckpt),
            "--checkpoint.initial_load_model_only", "false",
        ])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("train_runs"))


def _losses(records: dict[int, dict], steps) -> list[float]:
    missing = [s for s in steps if s not in records]
    assert not missing, f"no loss logged for steps {missing}"
    return [records[s]["loss"] for s in steps]


def _assert_close(got: list[float], want: list[float], rel: float, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert math.isfinite(g), f"{what}: loss {i} is {g}"
        assert abs(g - w) <= rel * abs(w), (
            f"{what}: losses differ beyond rel {rel}:\n got  {got}\n want {want}\n"
            f" rel diffs {[abs(a - b) / abs(b) for a, b in zip(got, want)]}"
        )


# --- layouts ---------------------------------------------------------------------------------


@needs_torchrun
def test_cp2_on_shipped_packed_corpus_matches_single_rank(runs):
    """Issue 10: real packed documents from the shipped corpus, CP=2 vs CP=1 step by step."""
    steps = range(1, STEPS + 1)
    ref = _losses(runs.layout("ref", data=SHIPPED_DATA), steps)
    _assert_close(_losses(runs.layout("cp2", data=SHIPPED_DATA), steps), ref, REL_TOL, "cp2 on tiny_corpus")


@needs_torchrun
def test_single_rank_reference_trains(runs):
    ref = runs.layout("ref")
    losses = _losses(ref, range(1, STEPS + 1))
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"


@needs_torchrun
@pytest.mark.parametrize(
    "layout",
    ["cp2", "cp2_zigzag", "tp2", "dp2_cp2", "cp2_tp2", pytest.param("dp2_cp2_tp2", marks=pytest.mark.slow)],
)
def test_layout_matches_single_rank(runs, layout):
    ref = _losses(runs.layout("ref"), range(1, STEPS + 1))
    extra = ["--metrics.enable_tensorboard"] if layout == "cp2" else []
    got = _losses(runs.layout(layout, extra), range(1, STEPS + 1))
    _assert_close(got, ref, REL_TOL, f"{layout} vs 1 rank")


@needs_torchrun
def test_per_rank_metrics_logged(runs):
    """Per-rank peak memory and CP bytes/step reach the metrics log and TensorBoard."""
    cp2 = runs.layout("cp2", ["--metrics.enable_tensorboard"])
    rec = cp2[2]
    for rank in range(2):
        assert rec[f"memory/peak(GiB)/rank{rank}"] > 0
        assert f"cp/bytes_sent_per_step/rank{rank}" in rec
    assert rec["cp/bytes_sent_per_step/max"] > 0, "CP layers recorded no traffic in titan_cp.cp.comm.comm_stats"
    ref = runs.layout("ref")
    assert ref[2]["cp/bytes_sent_per_step/max"] == 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dirs = sorted((runs.root / "cp2" / "tb").glob("*"))
    assert tb_dirs, "no TensorBoard folder"
    acc = EventAccumulator(str(tb_dirs[-1]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss_metrics/global_avg_loss", "grad_norm", "memory/peak(GiB)/rank1",
                "cp/bytes_sent_per_step/rank0", "cp/bytes_sent_per_step/max"):
        assert tag in tags, f"{tag} not in TensorBoard scalars {sorted(tags)}"
    tb_loss = [e.value for e in acc.Scalars("loss_metrics/global_avg_loss")]
    _assert_close(tb_loss[:STEPS], _losses(cp2, range(1, STEPS + 1)), 1e-6, "TensorBoard vs metrics.jsonl")


# --- checkpoints -----------------------------------------------------------------------------


@needs_torchrun
def test_resume_reproduces_uninterrupted_run(runs):
    ref = runs.layout("ref")
    resumed = runs.resume("resume_ref", "ref", 1, "debug_cpu")
    assert min(resumed) == CKPT_STEP + 1, f"resumed run logged steps {sorted(resumed)}"
    steps = range(CKPT_STEP + 1, STEPS + 1)
    _assert_close(_losses(resumed, steps), _losses(ref, steps), RESUME_REL_TOL, "resumed vs uninterrupted")


@needs_torchrun
@pytest.mark.parametrize("target", ["debug_cpu", "tp2"])
def test_cp2_checkpoint_resumes_on_other_layout(runs, target):
    ref = runs.layout("ref")
    runs.layout("cp2", ["--metrics.enable_tensorboard"])
    nproc = 1 if target == "debug_cpu" else LAYOUTS[target][0]
    resumed = runs.resume(f"resume_cp2_on_{target}", "cp2", nproc, target)
    steps = range(CKPT_STEP + 1, STEPS + 1)
    _assert_close(_losses(resumed, steps), _losses(ref, steps), REL_TOL, f"cp2 checkpoint resumed on {target}")


# --- what the trainer hands the model --------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4])
def test_trainer_sharding_matches_layout(world):
    """TorchTitan's CP input sharding: load balancer None == contiguous, "headtail" == zigzag.

    Runs TorchTitan's own ``prepare_context_parallel_input`` (what the trainer calls in
    ``post_dataloading_process``) as each rank of a fake process group in turn: the
    sharding is local slicing by mesh coordinate, so no real peers are needed.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torchtitan.distributed.context_parallel import prepare_context_parallel_input

    from titan_cp.cp.layout import shard_sequence

    L = 8 * world
    tokens = torch.arange(2 * L).reshape(2, L)
    positions = torch.arange(L).repeat(2, 1)
    assert not dist.is_initialized()
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
            for layout, balancer in (("contiguous", None), ("zigzag", "headtail")):
                inputs, labels, extra = prepare_context_parallel_input(
                    tokens.clone(), tokens.clone() + 1000, {"positions": positions.clone()},
                    mesh, torch.device("cpu"), balancer,
                )
                want = shard_sequence(tokens, 1, rank, world, layout)
                assert torch.equal(inputs, want), (layout, rank, inputs, want)
                assert torch.equal(labels, want + 1000)
                assert torch.equal(extra["positions"], shard_sequence(positions, 1, rank, world, layout))
        finally:
            dist.destroy_process_group()


def test_synthetic_global_batch_independent_of_dp():
    from titan_cp.data import SyntheticDataset

    def rows(dp, lbs, n_batches):
        out = []
        for batch in range(n_batches):
            for rank in range(dp):
                ds = SyntheticDataset(seq_len=64, vocab_size=100, local_batch_size=lbs, dp_rank=rank,
                                      dp_world_size=dp, kind="pattern", mean_doc_len=10, seed=3,
                                      bos_id=0, eos_id=1)
                ds.load_state_dict({"sample_idx": batch * lbs})
                it = iter(ds)
                out += [next(it) for _ in range(lbs)]
        return out

    one, two = rows(1, 4, 2), rows(2, 2, 2)
    assert len(one) == len(two) == 8
    for (x1, y1), (x2, y2) in zip(one, two):
        assert torch.equal(x1["input"], x2["input"]) and torch.equal(y1, y2)
        assert torch.equal(x1["positions"], x2["positions"])


def _check_boundaries(inputs, positions, labels, bos, eos):
    assert positions[0] == 0
    starts = positions == 0
    # every document start (after the row start) is a BOS input; every BOS input starts a document
    assert torch.equal(starts[1:], inputs[1:] == bos)
    # the label before a document start is the previous document's EOS: no label crosses a boundary
    idx = starts[1:].nonzero().flatten() + 1
    assert bool((labels[idx - 1] == eos).all())
    # positions count up by one inside a document
    inside = ~starts[1:]
    assert bool((positions[1:][inside] == positions[:-1][inside] + 1).all())


def test_document_boundaries_of_shipped_corpus_and_synthetic_data():
    """TorchTitan's convention: positions restart at 0 on each document (BOS), labels stop at EOS."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from titan_cp.data import TOKENIZER_PATH, SyntheticDataLoader, tiny_corpus_config

    tok = HuggingFaceTokenizer(tokenizer_path=str(TOKENIZER_PATH))
    assert tok.bos_id is not None and tok.eos_id is not None and tok.get_vocab_size() <= 2048
    for cfg in (tiny_corpus_config(), SyntheticDataLoader.Config(mean_doc_len=30)):
        loader = cfg.build(dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=256, local_batch_size=2)
        batch, labels = next(iter(loader))
        assert batch["input"].shape == batch["positions"].shape == labels.shape == (2, 256)
        n_docs = 0
        for row in range(2):
            _check_boundaries(batch["input"][row], batch["positions"][row], labels[row], tok.bos_id, tok.eos_id)
            n_docs += int((batch["positions"][row] == 0).sum())
        assert n_docs > 2, "expected packed rows with several documents"
