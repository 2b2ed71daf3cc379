"""The GDN language model: config, modules, flavors."""

from titan_cp.model.flavors import FLAVORS, model_config
from titan_cp.model.layers import GatedDeltaNet
from titan_cp.model.model import GDNModel

__all__ = ["FLAVORS", "GDNModel", "GatedDeltaNet", "model_config"]
