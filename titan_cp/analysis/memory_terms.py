"""The pieces every memory estimate is made of: a named activation term (:class:`ActTerm`, bytes per token)
and the per-rank result (:class:`MemoryEstimate`, static + saved + transient bytes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from titan_cp.analysis.train_setup import Parallelism


@dataclass(frozen=True)
class ActTerm:
    name: str
    elems_per_token: float
    bytes_per_elem: float
    shard: str  # "tp": divided by tp; "sp": by tp under sequence parallel; "rep": replicated
    doc: str

    def bytes_per_token(self, par: Parallelism) -> float:
        div = 1
        if self.shard == "tp" or (self.shard == "sp" and par.sequence_parallel):
            div = par.tp
        return self.elems_per_token * self.bytes_per_elem / div



@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    fsdp_buffers: float
    activations: float  # all layers' saved tensors
    model_activations: float  # saved tensors outside blocks
    loss_phase: float
    backward_phase: float
    tokens_per_rank: int
    layer_activation_bytes: float  # one layer, no AC, after calibration
    layer_terms: dict[str, float] = field(default_factory=dict)  # bytes per layer by term
    grads_at_peak: float | None = None  # gradient bytes alive at the activation peak (None: all of them)

    @property
    def static(self) -> float:
        return self.params + self.grads + self.optimizer + self.fsdp_buffers

    @property
    def transient(self) -> float:
        return max(self.loss_phase, self.backward_phase)

    @property
    def total(self) -> float:
        grads_at_peak = self.grads if self.grads_at_peak is None else self.grads_at_peak
        during_backward = grads_at_peak + self.activations + self.model_activations + self.transient
        return self.params + self.optimizer + self.fsdp_buffers + max(self.grads, during_backward)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(static=self.static, transient=self.transient, total=self.total)
        return out


def _terms_bytes(terms: list[ActTerm], par: Parallelism, tokens: float, calibration: dict[str, float]) -> dict[str, float]:
    return {t.name: calibration.get(t.name, 1.0) * t.bytes_per_token(par) * tokens for t in terms}
