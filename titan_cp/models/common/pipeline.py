"""Pipeline parallelism for titan_cp decoders: TorchTitan's own, plus the start-up checks.

The model spec's ``pipelining_fn`` is TorchTitan's: ``pipeline_llm`` for the
GDN LM, ``pipeline_vlm`` for Qwen3.5 (as TorchTitan's own Qwen3.5 spec; it
puts ``vision_encoder``, when built, into the first stage and calls
``pipeline_llm``). It splits the model into stages by module names
(``tok_embeddings``, ``layers.<i>``, ``norm``, ``lm_head``; pruned units become
None and the model's ``forward`` (:meth:`titan_cp.models.gdn.GDNModel.forward`,
:meth:`titan_cp.models.qwen3_5.model.Qwen35CPModel.forward`) runs what a stage
holds), applies the family's ``parallelize_fn`` (CP, TP, EP, AC, compile,
FSDP/HSDP) to every stage and builds the schedule. A stage holds whole layers
(GDN / attention mixer and FFN / MoE together). Positions (document starts)
reach every stage as model kwargs; under CP each microbatch is sharded along
the sequence before the schedule runs, so every stage sees the same shard
layout and builds the same SequenceInfo. MoE load balancing is per stage:
TorchTitan's hook updates the expert bias of the layers each stage holds,
summing tokens-per-expert over dp x cp as without PP. On its first step (and
on every eval <-> train switch) torch's schedule runs a metadata-inference
forward (``_initialize_pp_stages``: microbatch 0 on the first stage,
placeholder tensors on later ones) through every stage, and TorchTitan's MoE
adds the tokens it routes there to ``tokens_per_expert_E``: one microbatch
too many on the step-0 counts, so the expert bias moved differently from one
rank. :func:`with_exact_moe_counts` wraps a ``pipelining_fn`` so those counts
are put back after the inference. The GDN LM initialises
weights per unit by name (:mod:`titan_cp.models.gdn.init`), so a stage gets
exactly the weights those units have in a one-rank run.

The stage split is configurable through TorchTitan's fields:
``parallelism.pipeline_parallel_layers_per_stage``,
``pipeline_parallel_first_stage_less_layers`` /
``pipeline_parallel_last_stage_less_layers`` (the automatic split), or
``parallelism.module_fqns_per_model_part`` (explicit, e.g.
``[["tok_embeddings", "layers.0"], ["layers.1", "norm", "lm_head"]]``).

:func:`check_pipeline_parallel` rejects, before any process group exists,
what titan_cp does not support, naming the field.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from titan_cp.errors import ConfigError, unknown_choice_message

# Schedules whose stages run whole backward passes. The tests run 1F1B and
# Interleaved1F1B; GPipe and LoopedBFS order the same stage calls differently.
# The zero-bubble schedules (InterleavedZeroBubble, ZBVZeroBubble, DualPipeV)
# split each backward into input- and weight-gradient passes, which titan_cp's
# CP exchanges (collectives inside autograd Functions) are not checked with.
SUPPORTED_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "LoopedBFS")
_SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")


def with_exact_moe_counts(pipelining_fn):
    """``pipelining_fn`` (TorchTitan's ``pipeline_llm`` / ``pipeline_vlm``) whose schedule leaves MoE counts alone.

    The schedule's metadata inference (shapes and dtypes of what stages send,
    found by running the stages once) is not a training forward: every MoE
    layer's ``tokens_per_expert_E`` (the load-balancing hook's input) is
    snapshot before it and restored after it, so the counts the hook reads are
    those of the step's microbatches only, as on one rank.
    """

    @functools.wraps(pipelining_fn)
    def pipelined(model, **kwargs):
        schedule, model_parts, has_first_stage, has_last_stage = pipelining_fn(model, **kwargs)
        moe = [m for part in model_parts for m in part.modules() if hasattr(m, "tokens_per_expert_E")]
        if moe:
            _restore_after_metadata_inference(schedule, moe)
        return schedule, model_parts, has_first_stage, has_last_stage

    return pipelined


def _restore_after_metadata_inference(schedule, moe_modules: list[torch.nn.Module]) -> None:
    """Wrap the schedule's stage initialisation (it runs the inference) to put every ``tokens_per_expert_E`` back.

    The buffers are looked up on each call: ``init_weights`` replaces them after the schedule is built.
    """
    initialize = getattr(schedule, "_initialize_pp_stages", None)
    if initialize is None:  # torch 2.13's name for the step that runs metadata inference
        raise RuntimeError(
            f"{type(schedule).__name__} has no _initialize_pp_stages: this torch's pipeline schedule is not the "
            "one titan_cp keeps MoE tokens-per-expert counts exact under (torch 2.13)."
        )

    def initialize_keeping_counts(*args, **kwargs):
        saved = [m.tokens_per_expert_E.detach().clone() for m in moe_modules]
        try:
            return initialize(*args, **kwargs)
        finally:
            with torch.no_grad():
                for m, value in zip(moe_modules, saved):
                    m.tokens_per_expert_E.copy_(value)

    schedule._initialize_pp_stages = initialize_keeping_counts


def unit_names(model) -> list[str]:
    """The model's units in forward order: what a stage split partitions (``vision_encoder`` first when built)."""
    vision = ["vision_encoder"] if getattr(model, "with_vision", False) else []
    return [*vision, "tok_embeddings", *(f"layers.{i}" for i in range(len(model.layers))), "norm", "lm_head"]


def stage_split(model, parallelism) -> list[list[str]]:
    """The module names of each (virtual) stage: ``module_fqns_per_model_part`` or TorchTitan's automatic split."""
    if parallelism.module_fqns_per_model_part is not None:
        return [list(part) for part in parallelism.module_fqns_per_model_part]
    from torchtitan.distributed.pipeline_parallel import _generate_llm_fqn_per_model_part, _get_pipeline_metadata

    dims = SimpleNamespace(pp=parallelism.pipeline_parallel_degree)
    stages, n_layers, input_weight, output_weight = _get_pipeline_metadata(dims, parallelism, model)
    parts = _generate_llm_fqn_per_model_part(stages, n_layers, input_weight, output_weight)
    if getattr(model, "with_vision", False):  # as TorchTitan's pipeline_vlm
        parts[0].insert(0, "vision_encoder")
    return parts


def check_pipeline_parallel(model, parallelism, local_batch_size: int) -> None:
    """Start-up checks for ``parallelism.pipeline_parallel_degree > 1``; ConfigError names the field."""
    pp = parallelism.pipeline_parallel_degree
    if pp <= 1:
        return
    schedule = parallelism.pipeline_parallel_schedule
    if schedule not in SUPPORTED_SCHEDULES:
        raise ConfigError(
            unknown_choice_message("parallelism.pipeline_parallel_schedule", schedule, SUPPORTED_SCHEDULES)
            + " titan_cp runs the schedules whose stages do whole backward passes; the zero-bubble ones "
            "split backward into input/weight passes, which its CP exchanges are not checked with."
        )
    if parallelism.pipeline_parallel_schedule_csv:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule_csv = {parallelism.pipeline_parallel_schedule_csv!r}: "
            "custom schedule files are not supported by titan_cp; set it to \"\" and pick "
            f"parallelism.pipeline_parallel_schedule from {list(SUPPORTED_SCHEDULES)}."
        )
    tie_field = "tie_embeddings" if hasattr(model, "tie_embeddings") else "enable_weight_tying"
    if getattr(model, tie_field, False):
        raise ConfigError(
            f"model.{tie_field} = true cannot be pipelined: tok_embeddings (first stage) and lm_head "
            f"(last stage) would share one weight across stages. Set model.{tie_field} = false or "
            "parallelism.pipeline_parallel_degree = 1."
        )
    try:
        parts = stage_split(model, parallelism)
    except (ValueError, AssertionError) as e:
        raise ConfigError(
            f"parallelism.pipeline_parallel_degree = {pp} cannot split {len(model.layers)} layers: "
            f"{str(e).rstrip('.')}. "
            "Adjust parallelism.pipeline_parallel_layers_per_stage / pipeline_parallel_first_stage_less_layers "
            "/ pipeline_parallel_last_stage_less_layers, or give parallelism.module_fqns_per_model_part."
        ) from e
    field = ("parallelism.module_fqns_per_model_part" if parallelism.module_fqns_per_model_part is not None
             else "the automatic split (parallelism.pipeline_parallel_layers_per_stage)")
    want = unit_names(model)
    flat = [name for part in parts for name in part]
    if flat != want or any(not part for part in parts):
        raise ConfigError(
            f"{field} = {parts}: the stages must cover {want} in this order, each unit once, no stage empty, "
            "e.g. [[\"tok_embeddings\", \"layers.0\"], [\"layers.1\", \"norm\", \"lm_head\"]] for 2 layers."
        )
    per_rank, rest = divmod(len(parts), pp)
    single = schedule in _SINGLE_STAGE_SCHEDULES
    if rest or (single and per_rank != 1) or (not single and per_rank < 2):
        need = "exactly 1 stage" if single else "2 or more stages"
        raise ConfigError(
            f"{field} gives {len(parts)} stages for parallelism.pipeline_parallel_degree = {pp}; "
            f"parallelism.pipeline_parallel_schedule = {schedule!r} needs {need} per rank "
            f"({pp if single else 2 * pp} in all)."
        )
    microbatches = local_batch_size // parallelism.pipeline_parallel_microbatch_size
    if single and schedule == "1F1B" and microbatches < pp:
        raise ConfigError(
            f"training.local_batch_size / parallelism.pipeline_parallel_microbatch_size = {microbatches} "
            f"microbatches, fewer than the {pp} stages 1F1B needs. Raise training.local_batch_size or lower "
            "parallelism.pipeline_parallel_microbatch_size."
        )
