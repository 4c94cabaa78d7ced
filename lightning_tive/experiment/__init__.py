"""The demo experiments (`python -m lightning_tive experiment`): protocol.py runs them, runs.py builds each run
through the CLI, stats.py compares runs and selections, results.py writes docs/<results>.{md,png,json}."""
