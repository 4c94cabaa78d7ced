"""A fit killed in the middle of an epoch and resumed from its last checkpoint trains exactly what an
uninterrupted fit trains: the same examples in the same order, and the same weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from fit_helpers import DEMO

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.model import LlavaModule, LoraSettings, TinyLlavaConfig

BATCH, EPOCHS, SAVE_EVERY, KILL_AT = 6, 2, 3, 14  # 60 examples: 10 steps per epoch; killed mid epoch 2


class Killed(RuntimeError):
    """Stands in for a kill (Lightning swallows KeyboardInterrupt)."""


class Seen(L.Callback):
    """The pool indices of every training batch, by global step; raises at `kill_at`."""

    def __init__(self, kill_at: int | None = None):
        self.batches: dict[int, list[int]] = {}
        self.kill_at = kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at:
            raise Killed(f"killed at step {self.kill_at}")
        self.batches[trainer.global_step] = batch["pool_index"].tolist()


def fit(tmp_path, kill_at=None, ckpt_path=None):
    torch.manual_seed(0)
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    dm = LlavaDataModule(demo=DEMO, batch_size=BATCH, max_length=256, output_dir=str(tmp_path), group_by_length=True,
                         shuffle_seed=7)
    seen = Seen(kill_at)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=SAVE_EVERY
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[seen, checkpoints],
    )
    try:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    except Killed:
        pass
    return seen.batches, module


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_trains_what_an_uninterrupted_fit_trains(tmp_path):
    whole, uninterrupted = fit(tmp_path / "whole")
    assert len(whole) == EPOCHS * 10
    killed, _ = fit(tmp_path / "run", kill_at=KILL_AT)
    assert max(killed) == KILL_AT - 1
    saved = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    resumed_from = saved["global_step"]
    assert resumed_from == 12
    assert saved["LlavaDataModule"]["order"] == {"seed": 7, "epoch": 1, "batches_done": 2}
    resumed, module = fit(tmp_path / "run", ckpt_path=tmp_path / "run" / "ckpt" / "last.ckpt")
    assert min(resumed) == resumed_from
    combined = {**{s: b for s, b in killed.items() if s < resumed_from}, **resumed}
    assert combined == whole
    final = dict(module.trainable_parameters())
    for name, param in uninterrupted.trainable_parameters():
        torch.testing.assert_close(final[name], param, rtol=0, atol=1e-6, msg=name)


def test_last_names_the_newest_last_checkpoint_before_lightning_resolves_it(tmp_path):
    from lightning_tive.checkpoints import FinalModel, resolve_checkpoint_path

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[checkpoints], default_root_dir=tmp_path)
    check = FinalModel(resume_from="last")
    assert resolve_checkpoint_path(trainer, "last") is None
    check.setup(trainer, None, "fit")  # no last checkpoint anywhere: Lightning starts afresh, as it does
    (tmp_path / "ckpt").mkdir()
    torch.save({"global_step": 3}, tmp_path / "ckpt" / "last.ckpt")
    assert resolve_checkpoint_path(trainer, "last") == tmp_path / "ckpt" / "last.ckpt"
    check.setup(trainer, None, "fit")  # the CLI's `--ckpt_path last` resolves here too
    assert resolve_checkpoint_path(trainer, tmp_path / "x.ckpt") == tmp_path / "x.ckpt"
    with pytest.raises(FileNotFoundError, match=r"x.ckpt is not visible to process\(es\) \[0\]"):
        FinalModel(resume_from=str(tmp_path / "x.ckpt")).setup(trainer, None, "fit")
