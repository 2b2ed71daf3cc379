"""Which model-config fields a model uses (titan_cp.train.config_reads): an override nothing reads is refused.

A toy model pins the rule for every field type (int, float, bool, str; read
while building, read at run time through the held config, copied by
``dataclasses.replace`` only). Then every registered ``[model]`` family (a new
one is covered without edits here): an override of a field its default flavor
never reads is a ConfigError naming ``model.<field>``, and overriding every
field it does read is accepted (no false positive).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from titan_cp.errors import ConfigError
from titan_cp.models.registry import MODEL_FAMILIES, family_config
from titan_cp.train.config_reads import used_fields
from titan_cp.train.toml_config import build_config


class _Toy(nn.Module):
    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config:
        width: int = 4
        eps: float = 1e-6
        bias: bool = True
        act: str = "relu"
        late_scale: float = 1.0  # read in forward only, through the held config
        spare_int: int = 1
        spare_float: float = 0.5
        spare_bool: bool = False
        spare_str: str = "x"
        hold: bool = True

        def build(self):
            return _Toy(dataclasses.replace(self))  # as TorchTitan's build(): a copy reads every field

    def __init__(self, config):
        super().__init__()
        self.lin = nn.Linear(config.width, config.width, bias=config.bias)
        self.eps, self.act = config.eps, config.act
        if config.hold:
            self.config = config

    def forward(self, x):
        return self.lin(x) * self.config.late_scale


def test_build_reads_and_held_config_reads_are_the_used_fields():
    assert used_fields(_Toy.Config()) == {"width", "eps", "bias", "act", "hold", "late_scale"}
    # a model holding no config cannot read one at run time
    assert used_fields(_Toy.Config(hold=False)) == {"width", "eps", "bias", "act", "hold"}
    assert "__getattribute__" not in vars(_Toy.Config)  # the recorder is removed after the build
    assert _Toy.Config().build()(torch.ones(2, 4)).shape == (2, 4)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 1.0
    return None  # str / None / sub-configs: no generic other valid value


@pytest.mark.parametrize("family", sorted(MODEL_FAMILIES))
def test_every_family_refuses_an_unread_override_and_accepts_every_read_one(family):
    spec = family_config(family).model_spec
    model = spec.model
    used = used_fields(model, spec)
    assert used is not None
    scalars = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
               if isinstance(getattr(model, f.name), (bool, int, float, str)) and f.name not in ("param_init",)}
    base = [("model", "name", family), ("training", "seq_len", 128)]
    # every field the model reads, set to its own value: accepted (same model, so still valid)
    read = [("model", k, v) for k, v in scalars.items() if k in used]
    assert read, family
    build_config({}, base + read, world_size=2, check_runtime=False)
    # the first field it never reads that has a value to change to: refused, naming it
    unread = [(k, _changed(v)) for k, v in scalars.items() if k not in used and _changed(v) is not None]
    if not unread:
        pytest.skip(f"{family}: every scalar field is read")
    key, value = unread[0]
    with pytest.raises(ConfigError, match=rf"model\.{key} = .* is not read by model\.name = '{family}'"):
        build_config({}, base + [("model", key, value)], world_size=2, check_runtime=False)
