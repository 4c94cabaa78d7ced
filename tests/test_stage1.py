"""Stage 1 → stage 2: `freeze_language_model`, `init_from` (weights, source checks, chains), and the
demo's caption pool that is disjoint from the stage-2 mixture."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.demo import ALIGN_TASK, DemoConfig, ensure_demo, image_digest
from lightning_tive.model import LlavaModule, TinyLlavaConfig

STAGE2 = DemoConfig(train_sizes={"color": 30, "shape": 20, "count": 10, "ocr": 10, "text": 6}, val_size=8)
STAGE1 = DemoConfig(train_sizes={ALIGN_TASK: 40}, val_size=4, disjoint_from={"train_sizes": STAGE2.train_sizes, "val_size": 8})


def fit(tmp_path, module, demo, steps=3):
    dm = LlavaDataModule(demo=demo, batch_size=4, max_length=256, output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(module, dm)
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    module = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="full", freeze_vision_tower=False)
    ckpt = fit(tmp, module, STAGE1)
    return ckpt, {k: v.detach().clone() for k, v in module.llava.state_dict().items()}


def test_stage1_trains_everything_and_its_checkpoint_holds_every_weight(stage1):
    ckpt, weights = stage1
    fresh = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="full")
    changed = [k for k, v in fresh.llava.state_dict().items() if not torch.equal(v, weights[k])]
    assert any("vision_tower" in k for k in changed) and any("language_model" in k for k in changed)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert {k.removeprefix("model.") for k in saved} == set(weights)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_init_from_starts_from_the_stage1_weights(stage1, finetune):
    ckpt, weights = stage1
    module = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune=finetune, init_from=str(ckpt))
    got = module.llava.state_dict()
    for key, value in weights.items():
        name = key.replace(".q_proj.", ".q_proj.base_layer.").replace(".v_proj.", ".v_proj.base_layer.")
        target = got.get(key, got.get(name))
        if target is not None:
            assert torch.equal(target, value), key
    # the fine-tuning mode is applied after loading: the vision tower is frozen again
    assert not any(p.requires_grad for p in module.llava.model.vision_tower.parameters())


def test_stage2_checkpoint_rebuilds_from_its_init_from(stage1, tmp_path):
    ckpt, _ = stage1
    module = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="lora", init_from=str(ckpt))
    stage2 = fit(tmp_path, module, STAGE2, steps=2)
    loaded = LlavaModule.load_from_checkpoint(stage2, map_location="cpu")
    want, got = module.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_init_from_another_source_is_refused_naming_the_setting(stage1):
    ckpt, _ = stage1
    with pytest.raises(ValueError, match=r"init_seed=0 there, 1 here"):
        LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="full", init_seed=1, init_from=str(ckpt))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", init_from=str(ckpt) + ".missing")


def test_init_from_a_lora_run_is_refused(tmp_path):
    module = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="lora")
    ckpt = fit(tmp_path, module, STAGE2, steps=1)
    with pytest.raises(ValueError, match="holds LoRA weights"):
        LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="full", init_from=str(ckpt))


def test_init_from_chains_apply_in_order(stage1, tmp_path):
    ckpt, _ = stage1
    middle = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="full", init_from=str(ckpt))
    second = fit(tmp_path, middle, STAGE2, steps=1)  # trains the LM and projector, not the vision tower
    final = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="full", init_from=str(second))
    want, got = middle.llava.state_dict(), final.llava.state_dict()
    # the vision tower (frozen in `middle`, so absent from its checkpoint) comes from stage 1 through the chain
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_freeze_language_model_trains_projector_and_vision_only():
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="full", freeze_language_model=True, freeze_vision_tower=False)
    names = {n for n, _ in module.trainable_parameters()}
    assert names and all("multi_modal_projector" in n or "vision_tower" in n for n in names)
    assert any("vision_tower" in n for n in names)


def test_caption_pool_shares_no_image_with_the_stage2_mixture():
    stage2, stage1 = ensure_demo(STAGE2), ensure_demo(STAGE1)

    def digests(paths):
        out = {}
        for record in json.loads(paths.train_json.read_text()) + json.loads(paths.val_json.read_text()):
            if record.get("image"):
                with Image.open(paths.image_folder / record["image"]) as img:
                    out[record["id"]] = image_digest(img)
        return out

    two, one = digests(stage2), digests(stage1)
    assert len(one) == 44 and len(set(one.values())) == 44  # no repeat inside the pool either
    assert not set(one.values()) & set(two.values())
    assert not set(one) & set(two)
    # a mixture that the same stream would reproduce exactly: every image collides unless redrawn
    same = DemoConfig(train_sizes={ALIGN_TASK: 30}, val_size=0)
    plain = set(digests(ensure_demo(same)).values())
    again = DemoConfig(train_sizes={ALIGN_TASK: 30}, val_size=0, disjoint_from={"train_sizes": {ALIGN_TASK: 30}, "val_size": 0})
    fixed = set(digests(ensure_demo(again)).values())
    assert plain == set(digests(ensure_demo(same)).values()) and len(fixed) == 30
    assert not plain & fixed


def test_init_from_a_checkpoint_written_before_a_config_field_existed(stage1, tmp_path):
    """A tiny config saved without a later field (here vocab_size, default None) is the same build source."""
    ckpt, weights = stage1
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["tiny"].pop("vocab_size", None)
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    module = LlavaModule(tiny=TinyLlavaConfig(), tokenizer="demo", finetune="full", init_from=str(old))
    assert all(torch.equal(module.llava.state_dict()[k], v) for k, v in weights.items())
