"""titan_cp's training entry point: TorchTitan's trainer driven by a TOML file.

    torchrun --nproc_per_node=N train.py --job.config_file train_configs/X.toml [--section.field value ...]

The TOML file (plus command-line overrides) becomes a TorchTitan
``Trainer.Config`` (:mod:`titan_cp.toml_config`), validated before any process
group exists; then TorchTitan's own ``torchtitan.train.main`` runs it (trainer
loop, optimizer, LR schedule, DCP checkpoints, metrics, seed checkpoints),
with the CPU workarounds of :mod:`titan_cp.compat` applied.

TorchTitan's native form works too:
``torchrun -m torchtitan.train --module titan_cp --config gdn_debug [--section.field value]``.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from titan_cp import compat

    compat.apply()
    from titan_cp.toml_config import ConfigError, config_from_args

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        import titan_cp.toml_config as tc

        sections = "Sections" + tc.__doc__.split("Sections", 1)[1]
        print(__doc__.strip() + "\n\n" + sections)
        return 0
    try:
        config = config_from_args(argv)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"titan_cp config error: {e}", file=sys.stderr)
        return 2

    import torchtitan.train as tt_train

    class _ParsedConfig:
        """Stands in for TorchTitan's ConfigManager: the config is already parsed and validated."""

        def parse_args(self, args=None):
            return config

    tt_train.ConfigManager = _ParsedConfig
    from titan_cp.run_logging import init_logger

    tt_train.init_logger = init_logger  # TorchTitan's, then rank-0 logging (titan_cp.run_logging)
    tt_train.main()
    from titan_cp.hf.checkpoints import complete_hf_save

    complete_hf_save(config)  # checkpoint.last_save_in_hf: config.json + tokenizer next to the safetensors
    return 0


if __name__ == "__main__":
    sys.exit(main())
