"""The offline demo tokenizer: round trips, special tokens, offsets, determinism, reload, cache."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lightning_tive.data import tokenizer as demo_tok
from lightning_tive.data.demo import COLORS, DEMO_TASKS, SHAPES
from lightning_tive.data.tokenizer import (
    TOKENIZER_VERSION,
    VICUNA_SYSTEM,
    build_demo_tokenizer,
    demo_tokenizer_path,
)

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}

ROUND_TRIP_TEXTS = [
    "What color is the shape?",
    "The image shows two shapes on a white background: a red circle in the top left corner and "
    "an orange star at the bottom.",
    "Is the blue square to the left of the pink triangle?\nAnswer the question using a single word or phrase.",
    "What is 17 plus 8?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines",
    "Crème brûlée, naïve façade, Ångström",
    "猫が好きです。你好，世界！",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "Zoë's Ωmega ≤ ∞ — “quoted”",
    "",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return build_demo_tokenizer(folder), folder


@pytest.fixture(scope="module")
def tok(built):
    return built[0]


def test_demo_text_encodes_compactly_without_unknown_tokens(tok):
    """The small vocabulary covers the demo: no <unk>, and its words take few pieces each."""
    from lightning_tive.data.demo import DemoConfig, ensure_demo

    records = json.loads(ensure_demo(DemoConfig(train_sizes={t: 20 for t in DEMO_TASKS}, val_size=0)).train_json.read_text())
    text = " ".join(turn["value"] for r in records for turn in r["conversations"]).replace("<image>", "")
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert len(ids) / len(text.split()) < 1.6


def test_special_tokens_have_fixed_single_ids(tok):
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert tok.image_token == "<image>"
    for token, token_id in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok(token, add_special_tokens=False).input_ids == [token_id]
    assert "<image>" in tok.all_special_tokens


def test_bos_prepended_and_no_eos_appended(tok):
    ids = tok("red").input_ids
    assert ids[0] == SPECIAL_IDS["<s>"]
    assert ids[1:] == tok("red", add_special_tokens=False).input_ids
    assert SPECIAL_IDS["</s>"] not in ids


def test_special_tokens_inside_text_are_never_split(tok):
    text = f"{VICUNA_SYSTEM} USER: <image>\nWhat color is the shape? ASSISTANT: red</s>USER: Thanks ASSISTANT: ok</s>"
    ids = tok(text).input_ids
    assert ids.count(SPECIAL_IDS["<image>"]) == 1
    assert ids.count(SPECIAL_IDS["</s>"]) == 2
    assert ids[-1] == SPECIAL_IDS["</s>"]
    assert tok.decode(ids) == "<s>" + text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<image>", "").replace("</s>", "")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert all(0 <= i < len(tok) for i in ids)
    if not any(s in text for s in SPECIAL_IDS):
        assert tok.decode(ids) == text


def test_demo_words_are_single_tokens(tok):
    # Guards drift between the demo's words and the tokenizer's frozen corpus.
    for word in [*COLORS, *SHAPES, "shape", "image", "USER", "ASSISTANT"]:
        assert len(tok(" " + word, add_special_tokens=False).input_ids) == 1, word


def test_digits_are_split_like_llama(tok):
    tokens = tok.convert_ids_to_tokens(tok("12 plus 345", add_special_tokens=False).input_ids)
    assert tokens == ["1", "2", "Ġplus", "Ġ", "3", "4", "5"]


def test_offsets_cover_the_text(tok):
    text = "USER: <image>\nWhat color is the shape? ASSISTANT: red</s>"
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc.offset_mapping
    assert len(offsets) == len(enc.input_ids)
    assert offsets[0] == (0, 0)  # the prepended <s> covers no text
    assert "".join(text[s:e] for s, e in offsets[1:]) == text
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    # Byte-level: a token's span includes its leading space.
    assert text[slice(*offsets[tokens.index("Ġred")])] == " red"
    assert text[slice(*offsets[enc.input_ids.index(SPECIAL_IDS["<image>"])])] == "<image>"


def test_offsets_of_multibyte_characters_stay_in_character_units(tok):
    text = "é😀你"
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    assert sorted({o for o in offsets}) == [(0, 1), (1, 2), (2, 3)]


def test_padding_is_right_with_pad_id(tok):
    batch = tok(["red", "a blue square"], padding=True)
    short, long = batch.input_ids
    assert len(short) == len(long)
    assert short[-1] == SPECIAL_IDS["<pad>"]
    assert batch.attention_mask[0][-1] == 0


def test_building_twice_gives_identical_files(built, tmp_path):
    _, first = built
    build_demo_tokenizer(tmp_path)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (first / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_auto_tokenizer_reload_behaves_the_same(built):
    tok, folder = built
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded.is_fast
    for text in ROUND_TRIP_TEXTS + ["USER: <image>\nHi ASSISTANT: yes</s>"]:
        assert reloaded(text).input_ids == tok(text).input_ids
    assert reloaded.image_token == "<image>"
    assert [reloaded.convert_tokens_to_ids(t) for t in SPECIAL_IDS] == list(SPECIAL_IDS.values())
    assert reloaded.pad_token_id == SPECIAL_IDS["<pad>"]


def test_demo_tokenizer_path_uses_env_cache_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_TIVE_CACHE", str(tmp_path))
    path = demo_tokenizer_path()
    assert path == tmp_path / f"tokenizer-v{TOKENIZER_VERSION}"
    assert (path / "tokenizer.json").is_file()
    (path / "sentinel").write_text("kept")
    assert demo_tokenizer_path() == path
    assert (path / "sentinel").read_text() == "kept"  # reused, not rebuilt
    assert AutoTokenizer.from_pretrained(path)("red").input_ids[0] == SPECIAL_IDS["<s>"]


def test_demo_tokenizer_path_survives_losing_the_race(tmp_path, monkeypatch):
    final = tmp_path / f"tokenizer-v{TOKENIZER_VERSION}"
    real_build = demo_tok.build_demo_tokenizer

    def build_then_lose(save_dir):
        real_build(save_dir)
        real_build(final)  # another process finishes first

    monkeypatch.setattr(demo_tok, "build_demo_tokenizer", build_then_lose)
    assert demo_tokenizer_path(tmp_path) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # temp folder cleaned up
    assert (final / "tokenizer.json").is_file()


def test_demo_tokenizer_path_refuses_an_incomplete_cache_folder(tmp_path):
    final = tmp_path / f"tokenizer-v{TOKENIZER_VERSION}"
    final.mkdir()
    (final / "tokenizer_config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="incomplete"):
        demo_tokenizer_path(tmp_path)
