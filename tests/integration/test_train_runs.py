"""Real `torchrun train.py` runs on CPU: every layout trains like one rank; checkpoints resume.

All runs share one tiny setup (GDN debug flavor, 2 layers, seq_len 128, global
batch 4 rows, 6 steps, synthetic packed documents whose global batch does not
depend on the data-parallel degree, fp32) and one initialisation: a seed
checkpoint made once on one rank and loaded by every run
(``checkpoint.initial_load_path``), which exercises TorchTitan's seed-checkpoint
path. (Fresh runs with the same seed start from the same weights on every
layout too: ``tests/integration/test_layouts.py``.)

Runs are module-scoped and shared between assertions; the 8-rank layout is
``@pytest.mark.slow``.
"""

from __future__ import annotations


import pytest
import torch

from tests.support.train_runs import (  # noqa: E402
    CKPT_STEP, LAYOUTS, REL_TOL, RESUME_REL_TOL, SHIPPED_DATA, STEPS, Runner, assert_losses_close, losses_at, needs_torchrun,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("train_runs"))


# --- layouts ---------------------------------------------------------------------------------


@needs_torchrun
def test_cp2_on_shipped_packed_corpus_matches_single_rank(runs):
    """Issue 10: real packed documents from the shipped corpus, CP=2 vs CP=1 step by step."""
    steps = range(1, STEPS + 1)
    ref = losses_at(runs.layout("ref", data=SHIPPED_DATA), steps)
    assert_losses_close(losses_at(runs.layout("cp2", data=SHIPPED_DATA), steps), ref, REL_TOL, "cp2 on tiny_corpus")


@needs_torchrun
def test_single_rank_reference_trains(runs):
    ref = runs.layout("ref")
    losses = losses_at(ref, range(1, STEPS + 1))
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"


@needs_torchrun
@pytest.mark.parametrize(
    "layout",
    ["cp2", "cp2_zigzag", "tp2", "dp2_cp2", "cp2_tp2", pytest.param("dp2_cp2_tp2", marks=pytest.mark.slow)],
)
def test_layout_matches_single_rank(runs, layout):
    ref = losses_at(runs.layout("ref"), range(1, STEPS + 1))
    extra = ["--metrics.enable_tensorboard"] if layout == "cp2" else []
    got = losses_at(runs.layout(layout, extra), range(1, STEPS + 1))
    assert_losses_close(got, ref, REL_TOL, f"{layout} vs 1 rank")


@needs_torchrun
def test_kda_cp2_matches_single_rank(runs):
    """FLA's KDA architecture (train_configs/kda_debug_cp2.toml: CP 2, zigzag, allgather) vs one rank,
    both initialised from --debug.seed alone; the loss falls."""
    steps = range(1, STEPS + 1)
    args = ["--debug.seed", "7", "--training.local_batch_size", "4"]
    ref = losses_at(runs.launch("kda_ref", 1, "kda_debug_cp2", [*args, "--parallelism.context_parallel_degree", "1"]),
                    steps)
    assert ref[-1] < ref[0], f"loss did not fall: {ref}"
    assert_losses_close(losses_at(runs.launch("kda_cp2", 2, "kda_debug_cp2", args), steps), ref, REL_TOL,
                        "kda cp2 vs 1 rank")


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
    assert_losses_close(tb_loss[:STEPS], losses_at(cp2, range(1, STEPS + 1)), 1e-6, "TensorBoard vs metrics.jsonl")


# --- checkpoints -----------------------------------------------------------------------------


@needs_torchrun
def test_resume_reproduces_uninterrupted_run(runs):
    ref = runs.layout("ref")
    resumed = runs.resume("resume_ref", "ref", 1, "debug_cpu")
    assert min(resumed) == CKPT_STEP + 1, f"resumed run logged steps {sorted(resumed)}"
    steps = range(CKPT_STEP + 1, STEPS + 1)
    assert_losses_close(losses_at(resumed, steps), losses_at(ref, steps), RESUME_REL_TOL, "resumed vs uninterrupted")


@needs_torchrun
@pytest.mark.parametrize("target", ["debug_cpu", "tp2"])
def test_cp2_checkpoint_resumes_on_other_layout(runs, target):
    ref = runs.layout("ref")
    runs.layout("cp2", ["--metrics.enable_tensorboard"])
    nproc = 1 if target == "debug_cpu" else LAYOUTS[target][0]
    resumed = runs.resume(f"resume_cp2_on_{target}", "cp2", nproc, target)
    steps = range(CKPT_STEP + 1, STEPS + 1)
    assert_losses_close(losses_at(resumed, steps), losses_at(ref, steps), REL_TOL, f"cp2 checkpoint resumed on {target}")


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

    from titan_cp.cp.layout import rank_segments

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
                want = rank_segments(tokens, 1, rank, world, layout)
                assert torch.equal(inputs, want), (layout, rank, inputs, want)
                assert torch.equal(labels, want + 1000)
                assert torch.equal(extra["positions"], rank_segments(positions, 1, rank, world, layout))
        finally:
            dist.destroy_process_group()


def test_synthetic_global_batch_independent_of_dp():
    from titan_cp.components.data import SyntheticDataset

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

    from titan_cp.components.data import TOKENIZER_PATH, SyntheticDataLoader, tiny_corpus_config

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
