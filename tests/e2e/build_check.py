"""`python tests/e2e/build_check.py OUT STRATEGY FINETUNE`: a 2-process CPU fit that stops after set-up and writes,
per process, whether it built a skeleton and a digest of its whole weights once the fit began."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_tive.model import LlavaModule, TinyLlavaConfig
from lightning_tive.model.materialize import named_tensors
from lightning_tive.sharding import FSDP2Strategy, full


def weights_digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every parameter's and buffer's bytes, whole (DTensors gathered: every process calls it)."""
    out = {}
    for name, tensor in sorted(named_tensors(model).items()):
        value = full(tensor.detach()).cpu().contiguous()
        out[name] = hashlib.sha256(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"").hexdigest()
    return out


class Report(L.Callback):
    def __init__(self, out: Path, skeleton: bool):
        self.out, self.skeleton = out, skeleton

    def on_fit_start(self, trainer, pl_module):
        record = {"rank": trainer.global_rank, "built_skeleton": self.skeleton, "digests": weights_digests(pl_module.model),
                  "sharded": pl_module.sharded}
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out, strategy, finetune = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)  # the main LoRA adapter's initial weights come from the global generator
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune=finetune)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy() if strategy == "fsdp" else "ddp",
        callbacks=[Report(out, module.on_meta)], limit_train_batches=0, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([]))
