"""benchmarks/memory_probes.AllocationTracker on CPU: the allocation-only profiler log gives the peak that
``torch.profiler.profile(profile_memory=True)`` (every aten op recorded too) gives, and known byte counts."""

from __future__ import annotations

import torch
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.family_memory import FamilyMemoryArgs
from benchmarks.memory_probes import AllocationTracker
from benchmarks.model_steps import chunked_loss_backward, make_batch

CPU = torch.device("cpu")
MiB = 1 << 20


def test_cpu_peak_of_known_allocations():
    with AllocationTracker(CPU) as tracker:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a
        tracker.mark_forward_done()
        c = torch.empty(3 * MiB, dtype=torch.uint8)
        del b, c
    assert tracker.peak_delta == 5 * MiB  # b + c
    assert tracker.after_forward == 2 * MiB  # b, live at the mark
    assert tracker.n_events == 6  # 3 allocations + 3 frees


def _step(model, inputs, labels, mark=lambda: None):
    h = model.tok_embeddings(inputs)
    seq = model.sequence_info(inputs, None)
    for block in model.layers.values():
        h = block(h, seq)
    h = model.norm(h)
    mark()
    chunked_loss_backward(model, h, labels, 4, inputs.numel())


def _profiler_peak(model, inputs, labels) -> int:
    """The reference: torch.profiler's full log (op events included), its '[memory]' events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, inputs, labels)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def test_cpu_peak_equals_torch_profiler_on_a_family_step():
    torch.set_num_threads(1)
    for family in ("kda", "mamba2"):
        args = FamilyMemoryArgs(dim=32, n_layers=2, num_heads=2, head_dim=16, vocab_size=64).model(family)
        model = args.build(CPU, None, 256)
        inputs, labels = make_batch(64, 256, 1, 0, 1, "contiguous", CPU)
        _step(model, inputs, labels)  # warm-up: lazily built buffers and caches out of the comparison
        model.zero_grad(set_to_none=True)
        reference = _profiler_peak(model, inputs, labels)
        model.zero_grad(set_to_none=True)
        with AllocationTracker(CPU) as tracker:
            _step(model, inputs, labels, tracker.mark_forward_done)
        assert reference > 1 << 16, family
        assert tracker.peak_delta == reference, (family, tracker.peak_delta, reference)  # same allocations
        assert 0 < tracker.after_forward < tracker.peak_delta, family
