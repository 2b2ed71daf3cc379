"""The KDA LM is titan_cp's GDN LM (:class:`titan_cp.models.gdn.model.GDNModel`) with 'K' layers.

One decoder for every linear family: ``layer_pattern`` picks the mixer per layer
(``K`` = :class:`titan_cp.models.gdn.layers.KimiDeltaAttention`, FLA's parameterisation
and names; ``A`` = softmax attention), so the KDA model shares the GDN LM's init,
FLOP count, decoding (titan_cp/models/gdn/decode.py, the KDA step) and CP wiring.
"""

from __future__ import annotations

from titan_cp.models.gdn.layers import KimiDeltaAttention
from titan_cp.models.gdn.model import GDNModel as KDAModel

__all__ = ["KDAModel", "KimiDeltaAttention"]
