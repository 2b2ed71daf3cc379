"""What layout-invariant init costs (titan_cp/models/gdn/init.py), measured unit by unit on CPU.

    python -m benchmarks.init [--flavor 1.3B] [--layers 2]

Every rank builds and initialises every unit of its pipeline stage in full,
then keeps its shard. This measures, for a few units of ``--flavor`` (the
embedding, ``--layers`` blocks, the norm, the lm_head), the time of that full
init and the extra memory it holds (one unsharded unit at a time) next to the
plain in-place init of the same unsharded module (the one-rank baseline), and
extrapolates to the whole model. One process, one thread; ratios from one run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import tyro
from torch import nn

from titan_cp.models.gdn import model_config
from titan_cp.models.gdn.init import init_unit_in_full
from titan_cp.models.gdn.model import GDNModel


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Args:
    flavor: str = "1.3B"
    """the GDN flavor to initialise"""
    layers: int = 2
    """blocks to measure (the rest extrapolated)"""


def main() -> None:
    args = tyro.cli(Args, prog="python -m benchmarks.init", description=__doc__)
    torch.set_num_threads(1)
    config = model_config(args.flavor)
    names = ["tok_embeddings", *(f"layers.{i}" for i in range(args.layers)), "norm", "lm_head"]
    rows = []
    for name in names:
        unit = GDNModel.build_unit(config, name)  # the parallelized unit stands in unsharded (one rank)
        start = time.perf_counter()
        GDNModel.init_unit(config, name, unit)  # baseline: init in place
        in_place = time.perf_counter() - start
        start = time.perf_counter()
        init_unit_in_full(unit, name=name, seed=0, build=lambda n=name: GDNModel.build_unit(config, n),
                          init=lambda full, n=name: GDNModel.init_unit(config, n, full))
        full = time.perf_counter() - start
        rows.append((name, _bytes(unit), in_place, full))
        del unit
    print(f"flavor {args.flavor}: {config.n_layers} layers; per unit (one thread):")
    print(f"{'unit':>16} {'MiB':>8} {'in place s':>11} {'in full s':>10} {'ratio':>6}")
    for name, size, in_place, full in rows:
        print(f"{name:>16} {size / 2**20:8.1f} {in_place:11.3f} {full:10.3f} {full / in_place:6.2f}")
    blocks = [r for r in rows if r[0].startswith("layers.")]
    edges = [r for r in rows if not r[0].startswith("layers.")]
    per_block_in_place = sum(r[2] for r in blocks) / len(blocks)
    per_block_full = sum(r[3] for r in blocks) / len(blocks)
    total_in_place = sum(r[2] for r in edges) + config.n_layers * per_block_in_place
    total_full = sum(r[3] for r in edges) + config.n_layers * per_block_full
    largest = max(r[1] for r in rows)
    print(f"whole model (blocks extrapolated): in place {total_in_place:.1f} s, in full {total_full:.1f} s "
          f"({total_full / total_in_place:.2f}x); extra memory while initialising: the largest unit, "
          f"{largest / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
