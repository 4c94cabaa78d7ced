"""Checkpoints written by the pre-split `model.py` (tests/fixtures/README.md) load, resume and export today."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.demo import DemoConfig
from lightning_tive.model import LlavaModule

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MODES = ("full", "lora")
# tests/fixtures/pre_split.yaml's data section, which the resume must see again.
FIXTURE_DEMO = DemoConfig(train_sizes={"color": 6, "text": 6}, val_size=2)


def fixture_checkpoint(mode: str) -> dict:
    return torch.load(FIXTURES / f"pre_split_{mode}.ckpt", map_location="cpu", weights_only=True)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"values differ from the checkpoint's for {different}"


@pytest.mark.parametrize("mode", MODES)
def test_load_from_checkpoint_restores_the_trainable_weights_exactly(mode):
    saved = fixture_checkpoint(mode)
    module = LlavaModule.load_from_checkpoint(FIXTURES / f"pre_split_{mode}.ckpt", map_location="cpu")
    trainable = dict(module.trainable_parameters())
    assert sorted(trainable) == saved["lightning_tive_trainable"]
    assert_same_tensors({n: p.detach() for n, p in trainable.items()}, saved["state_dict"])
    assert module.hparams["finetune"] == mode and module.hparams["tiny"] == saved["hyper_parameters"]["tiny"]
    # the checkpoint hook writes the same file layout again
    rewritten = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(rewritten)
    assert_same_tensors(rewritten["state_dict"], saved["state_dict"])
    assert rewritten["lightning_tive_trainable"] == saved["lightning_tive_trainable"]


class ResumeProbe(L.Callback):
    """The trainable weights and optimizer state as training resumes, before its first new step."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.trainable_parameters()}
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())  # the live tensors step on
        self.global_step = trainer.global_step


@pytest.mark.parametrize("mode", MODES)
def test_fit_resumes_from_the_checkpoint_with_its_weights_and_optimizer_state(mode, tmp_path):
    saved = fixture_checkpoint(mode)
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    module = LlavaModule(**hparams)
    dm = LlavaDataModule(demo=FIXTURE_DEMO, batch_size=4, max_length=128, output_dir=str(tmp_path))
    probe = ResumeProbe()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=saved["global_step"] + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=[probe],
    )
    trainer.fit(module, dm, ckpt_path=FIXTURES / f"pre_split_{mode}.ckpt")
    assert probe.global_step == saved["global_step"] and trainer.global_step == saved["global_step"] + 1
    assert_same_tensors(probe.weights, saved["state_dict"])
    want_state = saved["optimizer_states"][0]["state"]
    got_state = probe.optimizer_state["state"]
    assert sorted(got_state) == sorted(want_state)
    for index, slots in want_state.items():
        assert_same_tensors(got_state[index], slots)
    # one more optimizer step ran on the restored state (at lr 0: the saved schedule had ended)
    steps = {int(slots["step"]) for slots in trainer.optimizers[0].state_dict()["state"].values()}
    assert steps == {int(slots["step"]) + 1 for slots in want_state.values()}


def merged_lora_weights(saved: dict) -> dict[str, torch.Tensor]:
    """The exported (merged) LLaVA weights a LoRA checkpoint implies: its base rebuilt, plus B @ A * alpha / r."""
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    base = LlavaModule(**{**hparams, "finetune": "full"}).llava.state_dict()
    scale = hparams["lora"]["alpha"] / hparams["lora"]["r"]
    want = {}
    for key, value in saved["state_dict"].items():
        name = key.removeprefix("model.base_model.model.")
        if ".lora_A." in name:
            target = name.replace(".lora_A.default.weight", ".weight")
            lora_b = saved["state_dict"][key.replace(".lora_A.", ".lora_B.")]
            want[target] = base[target] + (lora_b @ value) * scale
        elif ".lora_B." not in name:
            want[name] = value
    return want


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_export_command_writes_the_checkpoint_weights(mode, tmp_path):
    from transformers import LlavaForConditionalGeneration

    saved = fixture_checkpoint(mode)
    out = tmp_path / "export"
    command = [sys.executable, "-m", "lightning_tive", "export", "--ckpt_path",
               str(FIXTURES / f"pre_split_{mode}.ckpt"), "--output_dir", str(out), "--dtype", "float32"]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    if mode == "full":
        want = {key.removeprefix("model."): value for key, value in saved["state_dict"].items()}
    else:
        want = merged_lora_weights(saved)
    assert want and not any("lora" in name for name in exported)
    assert_same_tensors({name: exported[name] for name in want}, want)
