"""The run's checkpoints: the resumed one checked on every process, and the final model saved when the fit ends.

`ModelCheckpoint` writes checkpoints to resume from every N steps, and its `last.ckpt` lags the end
of training by up to N-1 steps (at LLaVA-1.5-7B's 779 steps and N=500, a model trained on 64% of
its steps). `FinalModel` writes `checkpoints/final.ckpt` when the fit ends: the trainable weights
only, no optimizer state (a file; a folder of shards under FSDP2Strategy), which
`python -m lightning_tive export` turns into a Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_tive.sharding import require_checkpoint_everywhere

FINAL_CHECKPOINT = "final.ckpt"
#: `ckpt_path` values that Lightning resolves to a file or folder itself.
NAMED_CHECKPOINTS = ("last", "best", "hpc")


def resolve_checkpoint_path(trainer: L.Trainer, ckpt_path: str | Path | None) -> Path | None:
    """The checkpoint `fit(ckpt_path=...)` reads, with "last"/"best"/"hpc" resolved the way Lightning resolves them.

    Lightning resolves these names only once it restores, after `setup` and (under FSDP2) `on_fit_start`:
    what runs before must resolve them too. None when "last" finds no checkpoint (Lightning then starts afresh).
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) not in NAMED_CHECKPOINTS:
        return Path(ckpt_path)
    from lightning.pytorch.trainer.states import TrainerFn

    resolved = trainer._checkpoint_connector._parse_ckpt_path(
        TrainerFn.FITTING, str(ckpt_path), model_provided=True, model_connected=True
    )
    return Path(resolved) if resolved else None


class FinalModel(L.Callback):
    """Saves the model as trained at the end of `fit` to `<dirpath>/final.ckpt`, and checks a resumed checkpoint.

    Args:
        dirpath: the folder (default: `<trainer.default_root_dir>/checkpoints`).
        resume_from: the checkpoint this fit resumes from (the CLI sets it from `--ckpt_path`): every
            process checks that it sees it before anything is restored, and all stop together otherwise.
    """

    def __init__(self, dirpath: str | None = None, resume_from: str | None = None) -> None:
        self.dirpath, self.resume_from = dirpath, resume_from

    def path(self, trainer: L.Trainer) -> Path:
        """Where the final model goes."""
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / FINAL_CHECKPOINT

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before any restore: every process must see the checkpoint the fit resumes from."""
        named = self.resume_from or trainer.ckpt_path
        if stage == "fit" and named:
            require_checkpoint_everywhere(resolve_checkpoint_path(trainer, named), trainer.strategy, str(named))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the trained weights (every process takes part: under FSDP each writes its shards)."""
        if trainer.global_step == 0:
            rank_zero_info("[lightning_tive] no training step ran: no final model written")
            return
        path = self.path(trainer)
        trainer.save_checkpoint(path, weights_only=True)
        rank_zero_info(f"[lightning_tive] final model (step {trainer.global_step}) written to {path}")

    def state_dict(self) -> dict[str, Any]:
        """Nothing to resume: the final model is written again at the end."""
        return {}
