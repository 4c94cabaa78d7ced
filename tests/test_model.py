"""LlavaModule: the three build paths, the trainable sets of each mode, per-example loss, export."""

from __future__ import annotations

import math
import re

import lightning as L
import numpy as np
import pytest
import torch

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.demo import DemoConfig
from lightning_tive.model import LlavaModule, TinyLlavaConfig, WarmupCosineLR, per_example_nll

SMALL_DEMO = DemoConfig(train_sizes={"color": 8, "text": 6, "caption": 4, "count": 6}, val_size=2)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def demo_dm(processor):
    dm = LlavaDataModule(demo=SMALL_DEMO, max_length=256, batch_size=6)
    dm.attach_processor(processor)
    dm.setup("fit")
    return dm


def test_tiny_build_is_reproducible_from_its_seed():
    a = LlavaModule(tiny=TinyLlavaConfig(), finetune="full")
    b = LlavaModule(tiny=TinyLlavaConfig(), finetune="full")
    c = LlavaModule(tiny=TinyLlavaConfig(), finetune="full", init_seed=1)
    sa, sb, sc = state(a), state(b), state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_pretrained_round_trip_loads_same_weights_and_processor(tmp_path):
    from transformers import AutoProcessor

    tiny = LlavaModule(tiny=TinyLlavaConfig(), finetune="full", init_seed=3)
    tiny.llava.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = LlavaModule(pretrained=str(tmp_path), finetune="full")
    want, got = tiny.llava.state_dict(), loaded.llava.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.tokenizer.get_vocab() == tiny.processor.tokenizer.get_vocab()
    assert processor.patch_size == tiny.processor.patch_size


def test_composed_from_lm_clip_and_original_projector_file(tmp_path, tokenizer):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.models.clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
    )
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    clip = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         image_size=64, patch_size=16)
    )
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp_path / "clip")
    projector = {
        "model.mm_projector.0.weight": torch.randn(48, 32),
        "model.mm_projector.0.bias": torch.randn(48),
        "model.mm_projector.2.weight": torch.randn(48, 48),
        "model.mm_projector.2.bias": torch.randn(48),
    }
    torch.save(projector, tmp_path / "mm_projector.bin")

    module = LlavaModule(
        language_model=str(tmp_path / "lm"),
        vision_tower=str(tmp_path / "clip"),
        projector_path=str(tmp_path / "mm_projector.bin"),
        finetune="full",
    )
    llava = module.llava
    assert llava.config.vision_feature_layer == -2 and llava.config.vision_feature_select_strategy == "default"
    assert torch.equal(llava.model.multi_modal_projector.linear_1.weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(llava.model.multi_modal_projector.linear_2.bias, projector["model.mm_projector.2.bias"])
    assert torch.equal(llava.lm_head.weight, lm.lm_head.weight)
    assert torch.equal(llava.model.language_model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(
        llava.model.vision_tower.encoder.layers[2].self_attn.q_proj.weight,
        clip.encoder.layers[2].self_attn.q_proj.weight,
    )
    assert not any(p.is_meta for p in llava.parameters())
    # it runs on a real image record: image tokens match the tower's patches
    dm = LlavaDataModule(demo=DemoConfig(train_sizes={"color": 2}, val_size=0), max_length=256)
    dm.attach_processor(module.processor)
    dm.setup("fit")
    batch = next(iter(dm.pool_dataloader(batch_size=2)))
    assert module.per_example_loss(batch).isfinite().all()


def test_bad_projector_keys_are_refused(tmp_path):
    from lightning_tive.model import load_llava_projector

    torch.save({"model.mm_projector.1.weight": torch.zeros(2, 2)}, tmp_path / "p.bin")
    with pytest.raises(KeyError, match="unexpected projector key"):
        load_llava_projector(tmp_path / "p.bin")


LORA_NAME = re.compile(
    r"model\.base_model\.model\.model\.language_model\.layers\.\d+\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_[AB]\.default\.weight"
)
PROJECTOR = re.compile(r".*multi_modal_projector\.linear_[12]\.(weight|bias)")


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_trainable_parameters_are_exactly_the_intended_set(mode):
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune=mode)
    names = [n for n, _ in module.trainable_parameters()]
    assert not any("vision_tower" in n for n in names)
    assert sum(bool(PROJECTOR.fullmatch(n)) for n in names) == 4
    rest = [n for n in names if not PROJECTOR.fullmatch(n)]
    layers = module.llava.config.text_config.num_hidden_layers
    if mode == "full":
        lm = {n for n, _ in module.named_parameters() if ".language_model." in n or ".lm_head." in n}
        assert set(rest) == lm
    else:
        assert all(LORA_NAME.fullmatch(n) for n in rest), rest
        assert len(rest) == layers * 7 * 2
    if mode == "qlora":
        import bitsandbytes as bnb

        q_proj = module.llava.model.language_model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
        assert not isinstance(module.llava.model.vision_tower.encoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_a_training_step_leaves_the_vision_tower_untouched(mode, demo_dm):
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune=mode)
    demo_dm.attach_processor(module.processor)
    vision_before = {k: v.clone() for k, v in module.llava.model.vision_tower.state_dict().items()}
    trainable_before = {n: p.detach().clone() for n, p in module.trainable_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in module.trainable_parameters()], lr=1e-2)
    batch = next(iter(demo_dm.pool_dataloader(batch_size=6)))
    module.training_step(batch, 0).backward()
    optimizer.step()
    after = module.llava.model.vision_tower.state_dict()
    assert all(torch.equal(vision_before[k], after[k]) for k in vision_before)
    changed = [n for n, p in module.trainable_parameters() if not torch.equal(trainable_before[n], p)]
    assert any("lora_A" in n for n in changed) and any("multi_modal_projector" in n for n in changed)


def test_per_example_loss_equals_batch_of_one(tiny_module, demo_dm):
    demo_dm.attach_processor(tiny_module.processor)
    tiny_module.eval()
    indices = np.arange(demo_dm.pool_size)[::2]
    batch = next(iter(demo_dm.pool_dataloader(indices, batch_size=len(indices))))
    assert batch["pixel_values"].shape[0] < len(indices)  # a mixed image/text-only, padded batch
    with torch.no_grad():
        batched = tiny_module.per_example_loss(batch)
        singles = torch.cat(
            [tiny_module.per_example_loss(next(iter(demo_dm.pool_dataloader([i], batch_size=1)))) for i in indices]
        )
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    # and the training loss is the token mean over the batch, not the mean of example means
    with torch.no_grad():
        total, count = per_example_nll(tiny_module(batch).logits, batch["labels"])
    torch.testing.assert_close(tiny_module.training_step(batch, 0), total.sum() / count.sum())


@pytest.mark.parametrize("mode, chunk", [("lora", 5), ("lora", 4096), ("full", 7)])
def test_chunked_loss_equals_the_full_logits_reference(tiny_module, demo_dm, mode, chunk):
    module = tiny_module if mode == "lora" else LlavaModule(tiny=TinyLlavaConfig(), finetune="full")
    demo_dm.attach_processor(module.processor)
    module.eval()
    indices = np.arange(demo_dm.pool_size)[1::2]
    batch = next(iter(demo_dm.pool_dataloader(indices, batch_size=len(indices))))
    batch["labels"][2] = -100  # an example with no supervised token
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] != -100).sum() > 3 * 5
    params = [p for _, p in module.trainable_parameters()]
    weights = torch.linspace(0.5, 2.0, len(indices))  # a different weight per example: per-example gradients

    total, count = per_example_nll(module(batch).logits, batch["labels"])
    want = total / count.clamp(min=1)
    want_grads = torch.autograd.grad((weights * want).sum(), params, allow_unused=True)

    vocab = module.llava.lm_head.out_features
    saved, head_calls = [], []
    handle = module.llava.lm_head.register_forward_pre_hook(lambda *a: head_calls.append(1))
    before = module.nll_chunk_tokens
    module.nll_chunk_tokens = chunk
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            got = module.per_example_loss(batch)
        forward_calls = len(head_calls)
        got_grads = torch.autograd.grad((weights * got).sum(), params, allow_unused=True)
        step_loss = module.training_step(batch, 0)
    finally:
        module.nll_chunk_tokens = before
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got[2] == 0 and count[2] == 0
    assert sum(g is not None for g in want_grads) > 0
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
    torch.testing.assert_close(step_loss, total.sum() / count.sum(), rtol=1e-6, atol=1e-6)
    # The logits never outlive their chunk: nothing vocabulary-wide is saved for backward outside
    # the checkpointed chunks, and each chunk's head runs again in backward.
    assert not any(shape and shape[-1] == vocab for shape in saved)
    chunks = math.ceil(int(count.sum()) / chunk)
    assert forward_calls == chunks and len(head_calls) == 2 * chunks + chunks  # + training_step's forward


def test_warmup_cosine_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=100, warmup_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] and max(lrs) == pytest.approx(1.0, abs=0.02)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_fit_checkpoint_export_round_trip_generates_the_same_tokens(tmp_path, demo_dm):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lightning_tive.model.export import export_checkpoint

    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    dm = LlavaDataModule(demo=SMALL_DEMO, max_length=256, batch_size=6, output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert set(saved) == {n for n, _ in module.trainable_parameters()}  # frozen weights are not duplicated
    lora_b = [p for n, p in module.trainable_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # training moved LoRA off its zero init

    module.eval()
    batch = next(iter(dm.val_dataloader()))
    expected = module.generate_answers(batch, max_new_tokens=6)
    out = export_checkpoint(str(ckpt), str(tmp_path / "export"), dtype="float32")
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        generated = model.generate(
            input_ids=batch["prompt_ids"], attention_mask=batch["prompt_attention_mask"],
            pixel_values=batch["pixel_values"], max_new_tokens=6, do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    got = [t.strip() for t in processor.tokenizer.batch_decode(generated[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)]
    assert got == expected


def test_generation_on_a_text_only_batch_is_greedy_decoding_of_each_prompt(tiny_module, demo_dm):
    from lightning_tive.data.dataset import LlavaCollator

    demo_dm.attach_processor(tiny_module.processor)
    text_task = demo_dm.task_names.index("text")
    indices = [i for i in range(demo_dm.pool_size) if demo_dm.pool_task_ids[i] == text_task][:3]
    dataset = demo_dm._dataset_for(demo_dm.pool, with_prompts=True)
    items = [dataset[i] for i in indices]
    batch = LlavaCollator(tiny_module.processor.tokenizer.pad_token_id, generation=True)(items)
    assert batch["pixel_values"] is None and batch["has_prompt"].all()
    tiny_module.eval()
    answers = tiny_module.generate_answers(batch, max_new_tokens=3)
    tokenizer = tiny_module.processor.tokenizer
    for item, answer in zip(items, answers, strict=True):
        ids = item["prompt_ids"][None]  # one prompt, unpadded: argmax step by step
        for _ in range(3):
            with torch.no_grad():
                logits = tiny_module.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if ids[0, -1].item() == tokenizer.eos_token_id:
                break
        new = ids[0, item["prompt_ids"].shape[0] :].tolist()
        assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="with_prompts=True"):
        LlavaCollator(tokenizer.pad_token_id, generation=True)([demo_dm._dataset[i] for i in indices])


def test_checkpoint_from_another_configuration_is_refused(tiny_module):
    checkpoint = {"lightning_tive_trainable": [n for n, _ in tiny_module.trainable_parameters()] + ["model.extra.weight"]}
    with pytest.raises(ValueError, match="trains 1 parameters this model does not have"):
        tiny_module.on_load_checkpoint(checkpoint)
    checkpoint["lightning_tive_trainable"].pop()
    tiny_module.on_load_checkpoint(checkpoint)  # the same trainable set loads


# ---------------------------------------------------------------- a pretrained LM + a random CLIP tower
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 64, "patch_size": 16}


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_random_vision_tower_is_rebuilt_from_its_seed(lm_folder):
    a = LlavaModule(language_model=lm_folder, vision_config=TOWER, finetune="lora")
    b = LlavaModule(language_model=lm_folder, vision_config=TOWER, finetune="lora")
    c = LlavaModule(language_model=lm_folder, vision_config=TOWER, finetune="lora", init_seed=1)
    for part in ("vision_tower", "multi_modal_projector"):
        sa, sb, sc = (getattr(m.llava.model, part).state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    tower = a.llava.model.vision_tower.config
    assert (tower.hidden_size, tower.num_hidden_layers, tower.image_size, tower.patch_size) == (32, 2, 64, 16)
    assert a.processor.image_processor.crop_size == {"height": 64, "width": 64}
    assert a.processor.patch_size == 16 and a.llava.config.image_seq_length == 16
    assert a.llava.lm_head.weight is a.llava.model.language_model.embed_tokens.weight  # tying survives


@pytest.mark.parametrize("tied", [True, False])
def test_resize_embeddings_keeps_pretrained_rows_and_is_deterministic(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_tive.model import resize_embeddings

    lms = []
    for seed in (0, 1):  # the global RNG state must not matter
        torch.manual_seed(0)
        lm = LlamaForCausalLM(
            LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
        )
        before_in, before_out = lm.get_input_embeddings().weight.clone(), lm.lm_head.weight.clone()
        torch.manual_seed(seed)
        resize_embeddings(lm, 42)
        embed, head = lm.get_input_embeddings().weight, lm.lm_head.weight
        assert embed.shape == (42, 16) and head.shape == (42, 16) and lm.config.vocab_size == 42
        assert torch.equal(embed[:40], before_in) and torch.equal(head[:40], before_out)
        assert (head is embed) == tied
        lms.append(lm)
    assert torch.equal(lms[0].lm_head.weight, lms[1].lm_head.weight)
    assert torch.equal(lms[0].get_input_embeddings().weight[40], before_in.mean(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vision_config": TOWER}, "need a `language_model`"),
        ({"language_model": "x"}, "exactly one vision source"),
        ({"language_model": "x", "vision_tower": "y", "vision_config": TOWER}, "exactly one vision source"),
        ({"tiny": {}, "vision_config": TOWER}, "give exactly one of"),
        ({"pretrained": "p", "gguf_file": "f.gguf"}, "give both"),
        ({"tiny": {}, "gguf_file": "f.gguf"}, "give both"),
        ({"tiny": {}, "projector_path": "p.bin"}, "`projector_path` is for the composed path"),
        ({"language_model": "x", "vision_config": TOWER, "tokenizer": "demo"}, "`tokenizer` is for the `tiny` path"),
        ({"language_model": "x", "vision_config": {**TOWER, "num_hidden_layers": 1}}, "second-to-last"),
    ],
)
def test_inconsistent_build_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlavaModule(**kwargs)


def _fit_and_checkpoint(module, tmp_path, steps=2):
    dm = LlavaDataModule(demo=SMALL_DEMO, max_length=256, batch_size=4, output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def test_random_tower_checkpoints_frozen_rebuilt_trained_saved(tmp_path, lm_folder):
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731
    # LoRA: the frozen random tower is not in the checkpoint and comes back identical from init_seed.
    lora = LlavaModule(language_model=lm_folder, vision_config=TOWER, finetune="lora", init_seed=5,
                       optimizer=optimizer, lr_scheduler=None)
    ckpt = _fit_and_checkpoint(lora, tmp_path / "lora")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("vision_tower" in k for k in saved)
    loaded = LlavaModule.load_from_checkpoint(ckpt, map_location="cpu")
    want, got = state(lora), state(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # Full fine-tuning with a training tower: the tower is saved, and the loaded module has its trained weights.
    full = LlavaModule(language_model=lm_folder, vision_config=TOWER, finetune="full", freeze_vision_tower=False,
                       optimizer=optimizer, lr_scheduler=None)
    initial = {k: v.clone() for k, v in full.llava.model.vision_tower.state_dict().items()}
    ckpt = _fit_and_checkpoint(full, tmp_path / "full")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    tower_keys = [k for k in saved if ".vision_tower." in k]
    assert tower_keys and not all(torch.equal(saved[k], initial[k.split(".vision_tower.")[1]]) for k in tower_keys)
    loaded = LlavaModule.load_from_checkpoint(ckpt, map_location="cpu")
    want, got = state(full), state(loaded)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_qlora_eval_forward_keeps_the_4bit_layout_and_training_gradients(demo_dm):
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="qlora", lora={"dropout": 0.0})
    demo_dm.attach_processor(module.processor)
    batch = next(iter(demo_dm.pool_dataloader(batch_size=4)))
    q_proj = module.llava.model.language_model.layers[0].self_attn.q_proj
    packed = q_proj.base_layer.weight.data.clone()

    def lora_grad() -> float:
        module.zero_grad()
        module.training_step(batch, 0).backward()
        return q_proj.lora_B["default"].weight.grad.abs().sum().item()

    module.train()
    before = lora_grad()
    module.eval()
    with torch.no_grad():
        module.per_example_loss(batch)  # validation-like: eval mode, no gradients
    module.train()
    assert torch.equal(q_proj.base_layer.weight.data, packed)
    assert not getattr(q_proj.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    assert lora_grad() == pytest.approx(before, rel=1e-4)


def test_an_all_skipped_batch_is_a_zero_loss_step_over_every_trainable_weight(tiny_module):
    loss = tiny_module.training_step({"pool_index": torch.tensor([], dtype=torch.long)}, 0)
    assert loss.item() == 0.0 and loss.requires_grad
    params = [p for _, p in tiny_module.trainable_parameters()]
    grads = torch.autograd.grad(loss, params)
    assert len(grads) == len(params) and all(torch.count_nonzero(g) == 0 for g in grads)


def test_a_text_only_batch_gives_every_trainable_weight_a_gradient(demo_dm):
    """Under DDP a process whose batch has no image must still all-reduce the projector's gradients."""
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora")
    demo_dm.attach_processor(module.processor)
    text = demo_dm.task_names.index("text")
    indices = [i for i in range(demo_dm.pool_size) if demo_dm.pool_task_ids[i] == text][:3]
    batch = next(iter(demo_dm.pool_dataloader(indices, batch_size=3)))
    assert batch["pixel_values"] is None
    loss = module.training_step(batch, 0)
    names = [n for n, _ in module.trainable_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in module.trainable_parameters()], allow_unused=True)
    missing = [n for n, g in zip(names, grads, strict=True) if g is None]
    assert missing == []
    projector = [g for n, g in zip(names, grads, strict=True) if "multi_modal_projector" in n]
    assert projector and all(torch.count_nonzero(g) == 0 for g in projector)
    # and the loss is the batch's token-mean NLL, unchanged by the zero term
    total, count = module.batch_nll(batch)
    torch.testing.assert_close(loss, total.sum() / count.sum())


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_every_submodule_trains_in_training_mode(mode, tmp_path):
    """Loaded with from_pretrained (QLoRA, pretrained folders), a model comes up in eval mode: LoRA dropout off."""
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune=mode)
    assert [n for n, m in module.named_modules() if not m.training] == []
    if mode == "full":  # and a pretrained folder, fine-tuned with LoRA
        module.llava.save_pretrained(tmp_path)
        module.processor.save_pretrained(tmp_path)
        loaded = LlavaModule(pretrained=str(tmp_path), finetune="lora")
        assert [n for n, m in loaded.named_modules() if not m.training] == []


def test_export_reads_the_final_model_of_a_run_folder_in_bfloat16_without_optimizer_state(tmp_path, demo_dm):
    import json

    from transformers import LlavaForConditionalGeneration

    from lightning_tive.checkpoints import FinalModel
    from lightning_tive.model.export import export_checkpoint

    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    dm = LlavaDataModule(demo=SMALL_DEMO, max_length=256, batch_size=6, output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[FinalModel()],
        enable_checkpointing=False,
    )
    trainer.fit(module, dm)
    final = tmp_path / "checkpoints" / "final.ckpt"
    saved = torch.load(final, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in saved and saved["global_step"] == 2
    assert set(saved["state_dict"]) == {n for n, _ in module.trainable_parameters()}
    out = export_checkpoint(tmp_path, tmp_path / "hf")  # the run folder stands for its final model
    assert (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = LlavaForConditionalGeneration.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}
    merged = {n.removeprefix("base_model.model."): p for n, p in module.model.merge_and_unload().named_parameters()}
    for name, param in exported.named_parameters():
        torch.testing.assert_close(param, merged[name].detach().to(torch.bfloat16), rtol=0, atol=0)


def test_a_trained_projector_stays_float32_on_a_bfloat16_base_and_its_lr_2e5_update_survives(tmp_path, demo_dm):
    tiny = LlavaModule(tiny=TinyLlavaConfig(), finetune="full")
    tiny.llava.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    module = LlavaModule(pretrained=str(tmp_path), finetune="lora", torch_dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in module.trainable_parameters()}
    assert set(dtypes.values()) == {torch.float32} and any("multi_modal_projector" in n for n in dtypes)
    assert module.llava.model.language_model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    demo_dm.attach_processor(module.processor)
    batch = next(iter(demo_dm.pool_dataloader(range(6), batch_size=6)))
    projector = module.llava.model.multi_modal_projector
    before = {n: p.detach().clone() for n, p in projector.named_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in module.trainable_parameters()], lr=2e-5, weight_decay=0.0)
    module.per_example_loss(batch).mean().backward()  # no autocast: the projector casts its bf16 input
    optimizer.step()
    moved = {n: (p.detach() != before[n]).float().mean().item() for n, p in projector.named_parameters()}
    assert min(moved.values()) > 0.9, moved
    # the same step on bfloat16 weights rounds most of it away
    weight = before["linear_1.weight"]
    step = (projector.linear_1.weight.detach() - weight).to(torch.bfloat16)
    assert ((weight.to(torch.bfloat16) + step) != weight.to(torch.bfloat16)).float().mean() < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(module.per_example_loss(batch)).all()


def test_a_later_process_builds_a_skeleton_with_no_weight_anywhere(monkeypatch):
    """A process the launcher ranks 1 holds LLaVA's structure on the meta device, LoRA adapters included."""
    from lightning_tive.tive_config import ReferenceLora

    created_on = []  # every Linear's weight is drawn where it is created: none may be drawn on the CPU
    reset = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: created_on.append(self.weight.device.type) or reset(self))
    monkeypatch.setenv("LOCAL_RANK", "1")
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora")
    module.reserve_reference_adapter(ReferenceLora(r=4, alpha=8), seed=0)
    assert created_on and set(created_on) == {"meta"}
    params = dict(module.named_parameters())
    assert all(p.is_meta for p in params.values()) and any(".lora_A.tive_reference." in n for n in params)
    monkeypatch.setenv("LOCAL_RANK", "0")
    real = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora")
    real.reserve_reference_adapter(ReferenceLora(r=4, alpha=8), seed=0)
    assert {n: p.shape for n, p in real.named_parameters()} == {n: p.shape for n, p in params.items()}
