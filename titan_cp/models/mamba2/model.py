"""The Mamba-2 LM is titan_cp's GDN LM (:class:`titan_cp.models.gdn.model.GDNModel`) with 'M' layers.

transformers' ``Mamba2ForCausalLM``: embeddings -> n x (RMSNorm -> Mamba2Mixer -> residual) -> RMSNorm
-> lm_head. In the GDN LM that is ``layer_pattern = "M"`` (the mixer:
:class:`titan_cp.models.gdn.mamba2_layer.Mamba2Mixer`, transformers' names) with ``hidden_dim = 0``
(blocks without an MLP), so the family shares the GDN LM's init, FLOP count, decoding
(titan_cp/models/gdn/decode.py, the Mamba-2 step) and CP wiring. Hybrids with softmax
attention ('A' letters) train the same way but have no transformers format.
"""

from __future__ import annotations

from titan_cp.models.gdn.mamba2_layer import Mamba2Mixer
from titan_cp.models.gdn.model import GDNModel as Mamba2Model

__all__ = ["Mamba2Mixer", "Mamba2Model"]
