"""The CLI's set-up, in process: torch threads, and the run folder's derived paths."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_tive.callback import TIVESelectionCallback
from lightning_tive.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_torch_threads_and_run_folder_paths_are_applied(tmp_path):
    before = torch.get_num_threads()
    try:
        cli = run_cli(["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / "smoke.yaml"),
                       "--trainer.default_root_dir", str(tmp_path), "--torch_threads", "1"], run=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    tive = next(c for c in cli.trainer.callbacks if isinstance(c, TIVESelectionCallback))
    assert tive.config.output_dir == str(tmp_path / "tive") and tive.config.ratio == 0.15
    assert cli.datamodule.output_dir == str(tmp_path)
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert Path(cli.trainer.logger.save_dir) == tmp_path
