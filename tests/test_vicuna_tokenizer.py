"""A vicuna-7b-v1.5-style language-model folder: Llama's SentencePiece `tokenizer.model` and no tokenizer.json.

`lmsys/vicuna-7b-v1.5` ships only `tokenizer.model` (+ tokenizer_config.json, special_tokens_map.json).
transformers turns it into a fast tokenizer when loading, and that conversion needs the `sentencepiece`
and `protobuf` packages: without them it falls back to a tiktoken reader and fails, on every rank, at
start. Both are dependencies in pyproject.toml; this module imports sentencepiece at the top (it also
trains the model with it), so a missing package fails here rather than on the GPUs.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece  # a dependency (see above), never optional: the import fails this module when missing
import torch
from PIL import Image

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.template import IGNORE_INDEX, VICUNA_SYSTEM, build_template, encode_conversations
from lightning_tive.model import LlavaModule

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 64, "patch_size": 16}
WORDS = ("what color is the shape square circle triangle red green blue yellow how many shapes are there one two "
         "three four describe image briefly small on a white background read text written left right top bottom "
         "USER ASSISTANT yes no").split()
CONVERSATION = [
    {"from": "human", "value": "What color is the square?\n<image>"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "How many circles are there?"},
    {"from": "gpt", "value": "three"},
]


def added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def vicuna_tokenizer_config(legacy: bool) -> dict:
    """lmsys/vicuna-7b-v1.5's tokenizer_config.json (Llama-2's, saved by transformers 4.31 in FastChat)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **added_token("<s>")},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **added_token("</s>")},
        "legacy": legacy,
        "model_max_length": 4096,
        "pad_token": None,  # no pad token: LLaVA pads vicuna with <unk>
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **added_token("<unk>")},
    }


def write_vicuna_folder(folder, legacy: bool = False) -> sentencepiece.SentencePieceProcessor:
    """tokenizer.model trained as Llama's (BPE, byte fallback, split digits, no normalisation), its configs, and
    a tiny random LlamaForCausalLM with vicuna's special-token ids; no tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [VICUNA_SYSTEM] + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(400)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=480,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(vicuna_tokenizer_config(legacy), indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": added_token("<s>"), "eos_token": added_token("</s>"), "unk_token": added_token("<unk>")}
    ))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=sp.vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )).save_pretrained(folder)
    assert not (folder / "tokenizer.json").exists()  # the conversion from tokenizer.model is what is tested
    return sp


@pytest.fixture(scope="module")
def vicuna_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vicuna") / "lm"
    return folder, write_vicuna_folder(folder)


@pytest.mark.parametrize("legacy", [False, True])
def test_auto_tokenizer_converts_tokenizer_model_and_round_trips(tmp_path, legacy):
    from transformers import AutoTokenizer

    sp = write_vicuna_folder(tmp_path / "lm", legacy=legacy)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert type(tokenizer).__name__ == "LlamaTokenizer" and len(tokenizer) == sp.vocab_size()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None
    # Text that starts with a space is left out: there transformers' Metaspace and SentencePiece's dummy prefix
    # differ by one "▁"; the conversation templates never start with one.
    for text in ("What color is the square?", "how many: 42 shapes\nin ünïcode 🙂", "two  spaces  "):
        ids = tokenizer(text)["input_ids"]
        assert ids == [1, *sp.encode(text)]  # <s>, then the pieces SentencePiece itself gives
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("Red.</s>USER")["input_ids"].count(2) == 1  # </s> in text is the eos token


def test_llava_module_builds_on_it_tokenises_vicuna_v1_and_trains(vicuna_folder, tmp_path):
    folder, sp = vicuna_folder
    module = LlavaModule(language_model=str(folder), vision_config=TOWER, finetune="lora")
    tokenizer = module.processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)  # LLaVA-1.5 pads vicuna with <unk>
    assert image_id == sp.vocab_size() and module.llava.config.image_token_index == image_id
    assert module.llava.get_input_embeddings().weight.shape[0] == sp.vocab_size() + 1

    template = build_template("vicuna_v1", tokenizer)
    [example] = encode_conversations(tokenizer, template, [CONVERSATION], [True], image_token_id=image_id,
                                     num_image_tokens=module.llava.config.image_seq_length, max_length=512,
                                     with_prompts=True)
    ids, labels = example.input_ids, example.labels
    assert ids[0] == 1 and (ids == image_id).sum() == module.llava.config.image_seq_length == 16
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    runs = np.split(supervised, np.flatnonzero(np.diff(supervised) > 1) + 1)
    assert [tokenizer.decode(ids[run]) for run in runs] == ["Red.</s>", "three</s>"]  # each answer and its </s>
    prompt = tokenizer.decode(example.prompt_ids[np.asarray(example.prompt_ids) != image_id])
    assert prompt.endswith("How many circles are there? ASSISTANT:")

    # Through the data module from a LLaVA-format file: one image record, one text-only record.
    Image.new("RGB", (48, 64), (200, 30, 30)).save(tmp_path / "square.png")
    records = [{"id": "a", "image": "square.png", "conversations": CONVERSATION},
               {"id": "b", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}]
    (tmp_path / "pool.json").write_text(json.dumps(records))
    datamodule = LlavaDataModule(train_path=str(tmp_path / "pool.json"), image_folder=str(tmp_path), max_length=256,
                                 batch_size=2, output_dir=str(tmp_path))
    datamodule.attach_processor(module.processor)
    datamodule.setup("fit")
    batch = next(iter(datamodule.pool_dataloader(batch_size=2)))
    assert (batch["input_ids"][1] == 0).any()  # the shorter example is padded with <unk>
    loss = module.per_example_loss(batch)
    assert loss.shape == (2,) and loss.isfinite().all()
    loss.mean().backward()
    grads = [p.grad for name, p in module.named_parameters() if "lora_" in name and p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_pyproject_declares_what_the_conversion_needs():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    dependencies = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in dependencies}
    assert {"sentencepiece", "protobuf"} <= names, sorted(names)
