"""`python tests/e2e/build_check.py OUT STRATEGY FINETUNE [TIED_LM_FOLDER]`: a 2-process CPU fit that stops after
set-up and writes, per process, whether it built a skeleton and a digest of its whole weights once the fit began.

With TIED_LM_FOLDER (a causal LM whose lm_head is tied to its embeddings), LLaVA is composed from it and a
random vision tower instead of the tiny config."""

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


def make_module(finetune: str, tied_lm: str | None) -> LlavaModule:
    """The tiny LLaVA, or one composed from a tied LM and a small random tower."""
    if tied_lm is None:
        return LlavaModule(tiny=TinyLlavaConfig(), finetune=finetune)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8}
    return LlavaModule(language_model=tied_lm, vision_config=tower, finetune=finetune)


def write_tied_lm(folder: Path) -> Path:
    """A tiny Llama with lm_head tied to its input embeddings, and the demo tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lightning_tive.data.tokenizer import demo_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(str(demo_tokenizer_path()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Report(L.Callback):
    def __init__(self, out: Path, skeleton: bool):
        self.out, self.skeleton = out, skeleton

    def on_fit_start(self, trainer, pl_module):
        llava = pl_module.llava
        record = {"rank": trainer.global_rank, "built_skeleton": self.skeleton, "digests": weights_digests(pl_module.model),
                  "sharded": pl_module.sharded,
                  "tied": llava.lm_head.weight is llava.model.language_model.get_input_embeddings().weight}
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out, strategy, finetune = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    tied_lm = sys.argv[4] if len(sys.argv) > 4 else None
    torch.manual_seed(0)  # the main LoRA adapter's initial weights come from the global generator
    module = make_module(finetune, tied_lm)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy() if strategy == "fsdp" else "ddp",
        callbacks=[Report(out, module.on_meta)], limit_train_batches=0, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([]))
