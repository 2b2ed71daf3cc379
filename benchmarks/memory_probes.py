"""The two measurements of benchmarks/memory.py: bytes saved for backward (a saved-tensor tally) and the
allocator's peak (a tracked allocator), plus how an out-of-memory error looks on each device."""

from __future__ import annotations

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (TP / EP parameters), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s memory: ``t``, or the inner tensors of a wrapper subclass (DTensor,
    the asynchronous collectives' result), unwrapped recursively."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
        return [x for i in inner if isinstance(i, torch.Tensor) for x in plain_tensors(i)]
    return [t]


class SavedTensorTally:
    """Bytes of the distinct storages autograd saves while active (parameters excluded).

    With ``layer_kind`` (block -> name), a storage also counts for the decoder
    block (``model.layers``) whose forward first saved it: :attr:`by_kind`.
    """

    def __init__(self, model, layer_kind=None):
        self.params = {local_tensor(p).untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self.owner: dict[int, str] = {}
        self.current = None
        self.kinds = {}
        self._hooks = []
        if layer_kind is not None:
            for name, block in model.layers.items():
                self.kinds[name] = layer_kind(block)
                self._hooks += [block.register_forward_pre_hook(lambda m, a, n=name: setattr(self, "current", n)),
                                block.register_forward_hook(lambda m, a, o: setattr(self, "current", None))]

    def _pack(self, t):
        for plain in plain_tensors(t):
            storage = plain.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.params:
                self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())
                self.owner.setdefault(ptr, self.current)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self._hooks:
            h.remove()

    @property
    def by_kind(self) -> dict[str, list[int]]:
        """kind -> [number of layers, saved bytes of those layers]."""
        out = {kind: [list(self.kinds.values()).count(kind), 0] for kind in set(self.kinds.values())}
        for ptr, nbytes in self.storages.items():
            if self.owner[ptr] is not None:
                out[self.kinds[self.owner[ptr]]][1] += nbytes
        return out

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


class AllocationTracker:
    """Peak bytes allocated during a region: CUDA allocator stats, or the CPU profiler's allocation events.

    CPU: the profiler runs with ``profile_memory`` and records, of the RecordFunction scopes, only
    USER_SCOPE (the forward mark). The CPU allocator reports every allocation and free to it whatever
    the scopes, so the peak is the same one ``torch.profiler.profile(profile_memory=True)`` gives, without
    an event per aten op: that log (5 events per allocation for the KDA segment kernel) held 3.5-6 GB
    per rank at L 8K, P 2, where this one holds about one event per allocation or free.
    """

    MARK = "benchmark_memory::forward_done"

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            from torch._C._profiler import RecordScope, _ExperimentalConfig
            from torch.autograd import ProfilerActivity, ProfilerConfig, ProfilerState, _enable_profiler, _prepare_profiler

            # (state, record_shapes, profile_memory, with_stack, with_flops, with_modules, experimental)
            config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
            _prepare_profiler(config, {ProfilerActivity.CPU})
            _enable_profiler(config, {ProfilerActivity.CPU}, {RecordScope.USER_SCOPE})
        return self

    def mark_forward_done(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.after_forward = torch.cuda.memory_allocated(self.device) - self.base
        else:
            with torch.profiler.record_function(self.MARK):
                pass

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_delta = torch.cuda.max_memory_allocated(self.device) - self.base
            self.peak_absolute = torch.cuda.max_memory_allocated(self.device)
            return
        from torch._C._profiler import _EventType
        from torch.autograd import _disable_profiler

        results = _disable_profiler()
        if exc[0] is not None:
            return
        allocs, mark = [], None
        stack = list(results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                if str(fields.device).startswith("cpu"):
                    allocs.append((node.start_time_ns, fields.alloc_size))
            elif node.name == self.MARK:
                mark = node.start_time_ns
            stack.extend(node.children)
        allocs.sort()
        running = peak = 0
        self.after_forward = None
        for t, size in allocs:
            if mark is not None and self.after_forward is None and t > mark:
                self.after_forward = running
            running += size
            peak = max(peak, running)
        if self.after_forward is None:
            self.after_forward = running
        self.peak_delta = peak
        self.peak_absolute = None
        self.n_events = len(allocs)


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() or \
        "can't allocate memory" in text or "DefaultCPUAllocator" in text
