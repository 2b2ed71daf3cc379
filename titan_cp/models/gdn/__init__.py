"""The GDN language model: config, modules, flavors."""

from titan_cp.models.gdn.flavors import FLAVORS, model_config
from titan_cp.models.gdn.layers import GatedDeltaNet
from titan_cp.models.gdn.model import GDNModel

__all__ = ["FLAVORS", "GDNModel", "GatedDeltaNet", "model_config"]
