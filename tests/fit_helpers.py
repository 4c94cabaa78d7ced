"""A small select-then-train fit on the tiny model, shared by the callback, strategy and reliability tests."""

from __future__ import annotations

import lightning as L

from lightning_tive.callback import TIVESelectionCallback
from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.demo import DemoConfig
from lightning_tive.model import LlavaModule, TinyLlavaConfig
from lightning_tive.tive_config import ReferenceLora

DEMO = DemoConfig(train_sizes={"color": 24, "shape": 12, "count": 8, "text": 10, "caption": 6}, val_size=2)
POOL = sum(DEMO.train_sizes.values())
BATCH = 6


class SimulatedKill(RuntimeError):
    """Stands in for a kill in the middle of valuation (Lightning swallows KeyboardInterrupt)."""


class Probe(L.Callback):
    """Records what training actually sees, and the main weights before the first step."""

    def __init__(self):
        self.seen: list[int] = []
        self.weights_at_setup: dict | None = None
        self.weights_at_train_start: dict | None = None

    def setup(self, trainer, pl_module, stage):
        self.weights_at_setup = {n: p.detach().clone() for n, p in pl_module.trainable_parameters()}

    def on_fit_start(self, trainer, pl_module):  # runs after TIVE's on_fit_start (callback order)
        self.weights_at_train_start = {n: p.detach().clone() for n, p in pl_module.trainable_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += batch["pool_index"].tolist()


def run_fit(tmp_path, finetune="lora", max_epochs=1, ckpt_path=None, logger=False, demo=DEMO, precision="32-true",
            datamodule=None, callbacks=(), **tive_kwargs):
    settings = dict(
        ratio=0.25, warmup_ratio=0.3, warmup_epochs=1, warmup_lr=1e-3, projector="kronecker", proj_dim=64,
        reference_lora=ReferenceLora(r=4, alpha=8, dropout=0.0), output_dir=str(tmp_path / "tive"), seed=3,
        chunk_size=16,
    )
    settings.update(tive_kwargs)
    tive = TIVESelectionCallback(**settings)
    probe = Probe()
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune=finetune)
    dm = datamodule or LlavaDataModule(demo=demo, batch_size=BATCH, max_length=256, output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=logger, enable_progress_bar=False, precision=precision,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[tive, probe, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
                   *callbacks],
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, tive, probe, dm
