"""titan_cp's command-line tools; ``titan_cp <command> --help`` (installed) or ``python -m titan_cp.cli.<command>``.

    train     TorchTitan training from a TOML job (``train.py`` in the repository runs the same)
    generate  continue text from a checkpoint (prefill, then O(1) per token from the carried state)
    evaluate  perplexity of a checkpoint on held-out documents (CP-parallel under torchrun)
    convert   DCP checkpoint <-> Hugging Face folder (FLA's format for GDN)
    smoke     the CI smoke run: shipped train_configs, losses vs a one-rank reference, resume
    estimate  per-rank memory of a layout, and the longest sequence that fits a budget
    data-report  documents, tokens and document-length histogram of a dataset (long documents?)
"""

COMMANDS = {
    "train": "titan_cp.cli.train",
    "generate": "titan_cp.cli.generate",
    "evaluate": "titan_cp.cli.evaluate",
    "convert": "titan_cp.cli.convert",
    "smoke": "titan_cp.cli.smoke.__main__",
    "estimate": "titan_cp.cli.estimate",
    "data-report": "titan_cp.cli.data_report",
}
