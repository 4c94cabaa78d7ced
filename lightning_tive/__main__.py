"""`python -m lightning_tive {fit,validate,test,export,experiment,fetch-smollm2} ...`"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point; `fetch-smollm2` is answered before torch and Lightning are imported."""
    words = sys.argv[1:] if argv is None else argv
    command, rest = (words[0], words[1:]) if words else (None, [])
    if command == "fetch-smollm2":
        from lightning_tive.weights import fetch_main

        fetch_main(rest)
    elif command == "export":
        from lightning_tive.model.export import export_main

        export_main(rest)
    elif command == "experiment":
        from lightning_tive.experiment.protocol import main as experiment_main

        experiment_main(rest)
    else:
        from lightning_tive.cli import run_cli

        run_cli(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
