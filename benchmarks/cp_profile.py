"""Which operators a CP rank's step spends beyond its shard alone (torch.profiler, self CPU time).

Each of P = 2 ranks builds the model (``--model gdn | qwen3_5``, the debug shapes of
benchmarks/model_steps.py, state passing with ``--q_transition``), warms up, then profiles
``--steps`` training steps (forward + chunked loss + backward) under CP and the same number
with ``cp = None`` on the same shard. Per rank it prints the operators (aten ops and autograd
nodes, by self CPU time per step) whose time grows most from the shard alone to the CP step.
An autograd node's self time includes the time it waits inside its collectives (the other
rank's skew), so a large entry for an exchange is a synchronisation point, not only work.

    python -m benchmarks.cp_profile --model qwen3_5 --seq_len 2048 --q_transition keep
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import tyro

from benchmarks.model_steps import ModelFlags, launch, make_batch, train_step
from benchmarks.timing import set_cp


@dataclass
class Args:
    model: Literal["gdn", "qwen3_5"] = "qwen3_5"
    seq_len: int = 2048
    """global L (each rank profiles its L / 2 tokens)"""
    q_transition: Literal["recompute", "keep"] = "keep"
    steps: int = 3
    """profiled steps per mode (after 2 warm-up steps)"""
    top: int = 12


def _rank(rank, P, device, args: Args):
    margs = ModelFlags(model=args.model, q_transition=args.q_transition).model_args()
    model = margs.build(device, dist.group.WORLD, args.seq_len)
    x, y = make_batch(model.lm_head.weight.shape[0], args.seq_len, 1, rank, P, margs.layout, device)

    def step():
        model.zero_grad(set_to_none=True)
        dist.barrier()
        train_step(model, x, y, 8, args.seq_len, hidden=margs.hidden)

    per_mode = {}
    for mode, degree in (("cp", P), ("alone", 1)):
        set_cp(model, margs, degree)
        for _ in range(2):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        ms = collections.Counter()
        for event in prof.key_averages():
            ms[event.key] += event.self_cpu_time_total / args.steps / 1e3
        per_mode[mode] = dict(ms)
    return per_mode


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv, prog="python -m benchmarks.cp_profile", description=__doc__)
    for rank, res in enumerate(launch(_rank, 2, (args,))):
        cp, alone = res["cp"], res["alone"]
        grown = {k: cp.get(k, 0.0) - alone.get(k, 0.0) for k in set(cp) | set(alone)}
        print(f"rank {rank}: self CPU ms per step, CP {sum(cp.values()):.1f}, shard alone {sum(alone.values()):.1f}")
        for name, extra in sorted(grown.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {extra:+8.2f} ms  {name}  (CP {cp.get(name, 0.0):.2f}, alone {alone.get(name, 0.0):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
