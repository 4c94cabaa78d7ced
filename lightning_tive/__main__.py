"""`python -m lightning_tive {fit,validate,test,export,fetch-smollm2} ...`"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point; `fetch-smollm2` is answered before torch and Lightning are imported."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] == "fetch-smollm2":
        from lightning_tive.weights import fetch_main

        fetch_main(words[1:])
        return
    from lightning_tive.cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
