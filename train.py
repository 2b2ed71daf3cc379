"""titan_cp's documented training entry: ``python train.py --nproc_per_node=N --job.config_file X.toml``.

The code is :mod:`titan_cp.cli.train` (also ``titan_cp train`` once installed);
this file only runs it, so the repository-root command keeps working.
"""

import sys

from titan_cp.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
