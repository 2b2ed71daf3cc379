"""titan_cp's training entry point: TorchTitan's trainer driven by a TOML file.

    python train.py --nproc_per_node=N --job.config_file train_configs/X.toml [--section.field value ...]
    torchrun --nproc_per_node=N train.py --job.config_file train_configs/X.toml [--section.field value ...]
    titan_cp train --nproc_per_node=N --job.config_file X.toml    (installed: the same, from anywhere)
    python -m titan_cp.cli.train ...                              (the same)

The TOML file and the overrides become arguments for TorchTitan's own
``ConfigManager`` (:mod:`titan_cp.train.toml_config`: ``--module titan_cp.train.toml_config
--config toml_job`` + ``--section.field value``), and the parsed config is
checked (:mod:`titan_cp.models.common.preflight`) before any process group exists. A bad
config prints one line, ``titan_cp config error: <field>: <problem and fix>``
(rank 0 only), and exits with code 2. Then TorchTitan's ``torchtitan.train.main``
runs the job with the same arguments (trainer loop, optimizer, LR schedule,
DCP checkpoints, metrics), with the CPU workarounds of :mod:`titan_cp.components.compat`.

With ``--nproc_per_node=N`` (no torchrun), ``train.py`` is its own launcher:
it checks the config once for N ranks, then starts them through torchrun's own
machinery (``torch.distributed.run``, ``--standalone``), and a failed rank is
reported in one line (exit code = the rank's). Under ``torchrun`` a bad config
still exits every rank with code 2, but torchrun adds its ChildFailedError
report and exits with 1; use the first form for clean errors.

TorchTitan's native form works too:
``torchrun -m torchtitan.train --module titan_cp.models.gdn --config gdn_debug [--section.field value]``
(``--module titan_cp.models.qwen3_5 --config qwen3_5_debug`` for Qwen3.5; ``--module titan_cp`` has both).
"""

from __future__ import annotations

import os
import sys

LAUNCHER_FLAGS = ("--nproc_per_node", "--nproc-per-node")


def split_launcher_args(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N of ``--nproc_per_node N``, the other arguments)."""
    nproc, rest, i = None, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in LAUNCHER_FLAGS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} {value!r}: give the number of ranks, e.g. {name}=2")
            nproc = int(value)
        else:
            rest.append(argv[i])
        i += 1
    return nproc, rest


def _launch(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` ranks of this script with torchrun's machinery; one line if one fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "titan_cp.cli.train",
                                         *argv])
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        print(f"titan_cp: rank {failure.rank} failed first (exit code {failure.exitcode}); "
              f"its output is above.", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from titan_cp.components import compat

    compat.apply()
    from titan_cp.train.toml_config import ConfigError, job_from_args

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        import titan_cp.train.toml_config as tc

        print(__doc__.strip() + "\n\n" + "Sections" + tc.__doc__.split("Sections", 1)[1])
        return 0
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    try:
        nproc, argv = split_launcher_args(argv)
        job = job_from_args(argv)
        config = job.build(world_size=nproc if nproc and not under_torchrun else None)
    except (ConfigError, ValueError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"titan_cp config error: {e}", file=sys.stderr)
        return 2
    if nproc and not under_torchrun:
        return _launch(nproc, argv)

    import torchtitan.train as tt_train

    from titan_cp.components.run_logging import init_logger

    tt_train.init_logger = init_logger  # TorchTitan's, then rank-0 logging (titan_cp.components.run_logging)
    job.activate()
    sys.argv = [sys.argv[0], *job.manager_args()]  # TorchTitan's ConfigManager parses exactly these
    tt_train.main()
    from titan_cp.models.gdn.hf_folder import complete_hf_save

    complete_hf_save(config)  # checkpoint.last_save_in_hf: config.json + tokenizer next to the safetensors
    return 0


if __name__ == "__main__":
    sys.exit(main())
