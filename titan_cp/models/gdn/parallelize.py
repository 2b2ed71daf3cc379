"""parallelize_gdn: the GDN LM's TP plan inside the common CP -> TP -> AC -> compile -> FSDP pipeline.

(The mesh, CP and FSDP parts: :mod:`titan_cp.models.common.parallelize`.)

The mesh comes from TorchTitan's ParallelDims: ``tp`` (tensor parallel),
``cp`` (context parallel) and ``fsdp`` (= dp_shard x cp: CP ranks hold the
same weights, so FSDP shards over them too and reduces their gradients);
with ``dp_replicate`` > 1, HSDP over ``["dp_replicate", "fsdp"]``
(:func:`apply_fsdp`). Under pipeline parallelism TorchTitan calls this once
per stage (titan_cp/models/common/pipeline.py); a stage may lack ``tok_embeddings``,
``norm`` or ``lm_head``. ``apply_cp``, ``apply_tp``, ``apply_compile`` and
``apply_fsdp`` are the reusable pieces.

Layout of a GDN block under TP (degree t; H key heads, Hv value heads):

    attention_norm           replicated
    q_proj, k_proj           colwise   -> H/t heads x K
    v_proj, g_proj           colwise   -> Hv/t heads x V
    a_proj, b_proj           colwise   -> Hv/t heads
    q/k/v_conv1d.weight      Shard(0)  (channels = the heads above)
    A_log, dt_bias           Shard(0)  (Hv/t heads)
    o_norm.weight            replicated (per head_v_dim, shared by all heads)
    o_proj                   rowwise   (all-reduce back to the full dim)
    ffn_norm                 replicated
    feed_forward.w1 / w3     colwise,  w2 rowwise
    KDA layers: q/k/v_proj, b_proj, f_proj.1, g_proj.1 colwise (heads); f_proj.0, g_proj.0 (D -> V)
                colwise with the output gathered; convs, A_log, dt_bias Shard(0); o_proj rowwise
    attention layers (hybrid): wq/wk/wv colwise, wo rowwise
    Mamba-2 layers: head-parallel (H/t heads, the B/C groups they read; models/gdn/mamba2_layer.py):
                in_proj, conv1d replicated (each rank reads its rows of z | x | B | C | dt; gradient summed
                over TP); dt_bias, A_log, D, norm.weight Shard(0); out_proj rowwise; the gated norm's
                mean of squares all-reduced over TP
    tok_embeddings           rowwise (vocab-sharded), lm_head colwise (logits gathered)

Under TP every layer sees only its local heads; GDN needs nothing else because
heads never interact. Under CP every sequence-mixing layer gets a
:class:`~titan_cp.cp.context.CPContext` on the ``cp`` mesh dim: GDN layers
pass chunk states (cp/state_passing.py) or go head-parallel (cp/head_parallel.py);
attention layers run ring attention. TorchTitan's own SDPA context
parallelism is never applied. A sequence-mixing module titan_cp does not know
makes the run refuse to start (never silently without CP).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from titan_cp.models.common.parallelize import parallelize_decoder, shard_param


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """The TP layout in the module docstring (no sequence parallelism); skips units a pipeline stage lacks."""
    edges = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    edges = {name: style for name, style in edges.items() if getattr(model, name, None) is not None}
    if edges:
        parallelize_module(model, tp_mesh, edges)
    for block in model.layers.values():
        mixer = block.attention
        if getattr(mixer, "f_proj", None) is not None:  # KDA
            plan = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj", "b_proj", "f_proj.1",
                                                         "g_proj.1")}
            # The low-rank halves D -> V: weight split over V, output gathered (the heads need all of it).
            plan.update({name: ColwiseParallel(output_layouts=Replicate()) for name in ("f_proj.0", "g_proj.0")})
            plan["o_proj"] = RowwiseParallel()
            for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
                shard_param(conv, "weight", tp_mesh, Shard(0))
            for name in ("A_log", "dt_bias"):  # [Hv], [Hv K] head-major
                shard_param(mixer, name, tp_mesh, Shard(0))
            shard_param(mixer.o_norm, "weight", tp_mesh, Replicate())
        elif getattr(mixer, "q_conv1d", None) is not None:  # Gated DeltaNet
            plan = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")}
            plan["o_proj"] = RowwiseParallel()
            for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
                shard_param(conv, "weight", tp_mesh, Shard(0))
            for name in ("A_log", "dt_bias"):
                shard_param(mixer, name, tp_mesh, Shard(0))
            shard_param(mixer.o_norm, "weight", tp_mesh, Replicate())
        elif getattr(mixer, "ssm_state_size", None) is not None:  # Mamba-2
            plan = {"out_proj": RowwiseParallel()}
            shard_param(mixer.in_proj, "weight", tp_mesh, Replicate())
            for name in ("weight", "bias"):
                shard_param(mixer.conv1d, name, tp_mesh, Replicate())
            for name in ("dt_bias", "A_log", "D"):
                shard_param(mixer, name, tp_mesh, Shard(0))
            shard_param(mixer.norm, "weight", tp_mesh, Shard(0))
        else:  # softmax attention
            plan = {name: ColwiseParallel() for name in ("wq", "wk", "wv")}
            plan["wo"] = RowwiseParallel()
        parallelize_module(mixer, tp_mesh, plan)
        shard_param(block.attention_norm, "weight", tp_mesh, Replicate())
        if block.feed_forward is not None:  # blocks without an MLP (model.hidden_dim = 0) have neither
            parallelize_module(
                block.feed_forward,
                tp_mesh,
                {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()},
            )
            shard_param(block.ffn_norm, "weight", tp_mesh, Replicate())
    if model.norm is not None:
        shard_param(model.norm, "weight", tp_mesh, Replicate())


def parallelize_gdn(model: nn.Module, **kwargs):
    """TorchTitan's ``parallelize_fn`` for GDN models (see the module docstring)."""
    return parallelize_decoder(model, apply_tp_fn=apply_tp, **kwargs)
