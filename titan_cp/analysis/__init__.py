"""Analysis without running a model: FLOPs, per-rank memory, CP exchange costs at scale.

- ``flops``: the one FLOP count of the chunked gated delta rule and of a GDN model
  (the training log's MFU and the scale model both use it);
- ``shape``: sizes read from ``GDNModel.Config`` and named shapes (340M, 1.3B, 7B-like);
- ``memory``: the analytic per-rank memory estimate under FSDP x TP x CP;
- ``profiles``: what each GDN kernel really saves, as estimator settings;
- ``scale_model``: per-layer exchange time of each CP strategy against compute, P = 2 .. 1024.

Submodules are imported by name (``from titan_cp.analysis.memory import estimate_memory``);
this package imports nothing itself so that the model can use ``flops`` without a cycle.
"""
