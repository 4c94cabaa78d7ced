"""The demo experiments: the same command as `python -m lightning_tive experiment` (lightning_tive/experiment/).

    python scripts/experiment.py                      # the demo protocol: 5 seeds
    python scripts/experiment.py --quick              # a tiny pool, 1 seed, 1 epoch: minutes; writes to --work
    python scripts/experiment.py --preset smollm2     # the SmolLM2 protocol
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_tive.experiment.protocol import main  # noqa: E402

if __name__ == "__main__":
    main()
