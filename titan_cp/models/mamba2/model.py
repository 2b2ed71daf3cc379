"""The Mamba-2 LM: titan_cp's GDN LM (:class:`titan_cp.models.gdn.model.GDNModel`) with 'M' layers.

transformers' ``Mamba2ForCausalLM``: embeddings -> n x (RMSNorm -> Mamba2Mixer -> residual) -> RMSNorm
-> lm_head. In the GDN LM that is ``layer_pattern = "M"`` (the mixer:
:class:`titan_cp.models.gdn.mamba2_layer.Mamba2Mixer`, transformers' names) with ``hidden_dim = 0``
(blocks without an MLP), so the family shares the GDN LM's init, FLOP count, decoding
(titan_cp/models/gdn/decode.py, the Mamba-2 step) and CP wiring. Its Config only adds
``hf_config()``, transformers' config.json (what TorchTitan's HF save and titan_cp's HF folder
writer put next to the safetensors). Hybrids with softmax attention ('A' letters) train the
same way but have no transformers format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from titan_cp.models.gdn.mamba2_layer import Mamba2Mixer
from titan_cp.models.gdn.model import GDNModel


class Mamba2Model(GDNModel):
    @dataclass(kw_only=True, slots=True)
    class Config(GDNModel.Config):
        def hf_config(self, **extra) -> dict:
            """transformers' ``Mamba2Config`` dict (titan_cp.models.mamba2.hf_config; ConfigError if the
            shape has no transformers format)."""
            from titan_cp.models.mamba2.hf_config import hf_config_from_model

            return hf_config_from_model(self, **extra)

        @classmethod
        def of(cls, config: GDNModel.Config) -> "Mamba2Model.Config":
            """The same field values as a Mamba-2 Config."""
            return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


__all__ = ["Mamba2Mixer", "Mamba2Model"]
