"""Layout-invariant initialisation: the same seed gives the same weights on every layout.

A parallelized model holds only its part of each parameter (FSDP / TP shards,
pipeline stages hold some layers), and the CPU RNG is not sharding-invariant:
initialising the shards in place gives different weights for cp1, cp2, tp2, ...
Instead the model is initialised *unit by unit* (``tok_embeddings``, each
``layers.<i>``, ``norm``, ``lm_head``):

1. build the unit unsharded on the parameters' device (on meta, then ``to_empty``);
2. initialise it with the global RNG seeded by ``unit_seed(seed, unit name)``,
   so its numbers depend on nothing but the seed and the unit's name (not on
   the other units, their order, or which pipeline stage holds them);
3. copy each parameter's local part into the sharded parameter
   (``distribute_tensor(full, mesh, placements, src_data_rank=None)``: every
   rank slices its own shard, no communication).

Cost: every rank generates every parameter of its pipeline stage in full,
once, one unit at a time. Extra memory is one unit (the largest of the
embedding, the lm_head and one block); time is one RNG fill of the stage's
parameters (``benchmarks/init.py`` measures it for the 1.3B flavor).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Path components that wrappers insert into parameter names (activation
# checkpointing, torch.compile); FSDP2 inserts none.
_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod")


def unit_seed(seed: int, unit_name: str) -> int:
    """A 63-bit seed that depends only on (``seed``, ``unit_name``)."""
    digest = hashlib.sha256(f"{seed}:{unit_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def canonical_name(name: str) -> str:
    """A parameter name without wrapper path components (``_checkpoint_wrapped_module``, ``_orig_mod``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG of ``device`` (and the CPU) seeded with ``seed``; restored afterwards."""
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(seed)
        yield


def parameter_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.to_local().device if isinstance(p, DTensor) else p.device
    return torch.device("cpu")


@torch.no_grad()
def copy_full_into(target: nn.Module, full: nn.Module) -> None:
    """Copy every parameter of the unsharded ``full`` into its (possibly sharded) twin in ``target``."""
    full_params = dict(full.named_parameters())
    seen = set()
    for name, param in target.named_parameters():
        key = canonical_name(name)
        source = full_params[key]
        seen.add(key)
        if isinstance(param, DTensor):
            shard = distribute_tensor(source, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(source)
    missing = set(full_params) - seen
    if missing:
        raise RuntimeError(f"layout-invariant init: {sorted(missing)} not found in the parallelized unit")


def init_unit_in_full(
    target: nn.Module,
    *,
    name: str,
    seed: int,
    build: Callable[[], nn.Module],
    init: Callable[[nn.Module], None],
) -> None:
    """Initialise ``target`` (one unit, maybe sharded) as ``init(build())`` would, seeded by (seed, name)."""
    device = parameter_device(target)
    with torch.device("meta"):
        full = build()
    full.to_empty(device=device)
    with seeded_rng(unit_seed(seed, name), device):
        init(full)
    copy_full_into(target, full)
