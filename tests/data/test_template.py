"""Conversation template, supervised-only labels, and image-token expansion on exact token spans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tive.data.images import expand_to_square, image_token_count
from lightning_tive.data.template import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    EncodingProblem,
    TokenizerChatTemplate,
    VicunaV1Template,
    encode_conversations,
)

N_IMG = 16


def encode(tokenizer, conversations, has_image, max_length=512, template=None):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    (result,) = encode_conversations(
        tokenizer,
        template or VicunaV1Template(),
        [conversations],
        [has_image],
        image_token_id=image_id,
        num_image_tokens=N_IMG,
        max_length=max_length,
    )
    return result


def supervised_runs(labels: np.ndarray) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    if current:
        runs.append(current)
    return runs


def test_vicuna_render_matches_llava_v1():
    conv = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Black."},
    ]
    text, spans = VicunaV1Template().render(conv)
    assert text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Black.</s>"
    )
    assert [text[s:e] for s, e in spans] == ["A cat.</s>", "Black.</s>"]


def test_multi_turn_image_labels_supervise_exactly_answers_and_eos(tokenizer):
    conv = [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the square?"},
        {"from": "gpt", "value": "blue square"},
    ]
    enc = encode(tokenizer, conv, has_image=True)
    eos = tokenizer.eos_token_id
    expected = [
        tokenizer.encode(" red", add_special_tokens=False) + [eos],
        tokenizer.encode(" blue square", add_special_tokens=False) + [eos],
    ]
    assert supervised_runs(enc.labels) == expected  # these words are single tokens with their space
    # every supervised label equals its input id; everything else is ignored
    sup = enc.labels != IGNORE_INDEX
    assert (enc.labels[sup] == enc.input_ids[sup]).all()
    assert sup.sum() == sum(len(r) for r in expected)
    # the image token is expanded in place to a contiguous unsupervised block
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    where = np.nonzero(enc.input_ids == image_id)[0]
    assert len(where) == N_IMG and (np.diff(where) == 1).all()
    assert (enc.labels[where] == IGNORE_INDEX).all()
    # collapsing the block gives exactly the tokenizer's ids for the rendered text
    text, _ = VicunaV1Template().render(conv)
    collapsed = np.concatenate([enc.input_ids[: where[0] + 1], enc.input_ids[where[-1] + 1 :]])
    assert collapsed.tolist() == tokenizer(text)["input_ids"]
    # the first token is BOS and it is not supervised
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == IGNORE_INDEX
    # generation prompt ends right before the last answer
    assert enc.input_ids[enc.answer_start : enc.answer_start + len(expected[1])].tolist() == expected[1]


def test_text_only_record_has_no_image_tokens(tokenizer):
    conv = [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]
    enc = encode(tokenizer, conv, has_image=False)
    assert tokenizer.convert_tokens_to_ids("<image>") not in enc.input_ids.tolist()
    (run,) = supervised_runs(enc.labels)
    # " 5" splits into a space token (part of the prompt) and "5": only the answer's own token is supervised
    assert tokenizer.decode(run) == "5</s>"
    assert enc.input_ids[enc.answer_start - 1] == tokenizer.convert_tokens_to_ids("Ġ")


def test_truncation_never_cuts_image_tokens(tokenizer):
    conv = [{"from": "human", "value": "<image>\n" + "describe " * 5}, {"from": "gpt", "value": "ok"}]
    text, _ = VicunaV1Template().render(conv)
    prefix = len(tokenizer(text.split("<image>")[0])["input_ids"])
    with pytest.raises(EncodingProblem, match="cut the image"):
        raise encode(tokenizer, conv, has_image=True, max_length=prefix + N_IMG - 1)


def test_truncation_that_leaves_no_supervised_token_is_a_problem(tokenizer):
    conv = [{"from": "human", "value": "<image>\n" + "word " * 40}, {"from": "gpt", "value": "answer"}]
    result = encode(tokenizer, conv, has_image=True, max_length=80)
    assert isinstance(result, EncodingProblem) and "no supervised token" in str(result)


def test_truncation_keeps_a_prefix_with_supervised_tokens(tokenizer):
    long_answer = " ".join(["red circle"] * 40)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": long_answer}]
    full = encode(tokenizer, conv, has_image=True)
    cut = encode(tokenizer, conv, has_image=True, max_length=len(full.input_ids) - 10)
    assert len(cut.input_ids) == len(full.input_ids) - 10
    assert (cut.input_ids == full.input_ids[:-10]).all() and (cut.labels == full.labels[:-10]).all()
    assert cut.answer_start == full.answer_start


def test_empty_answer_is_a_problem(tokenizer):
    # "</s>" alone is still supervised, as in LLaVA; only a span that tokenizes to nothing fails
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]
    enc = encode(tokenizer, conv, has_image=False)
    assert supervised_runs(enc.labels) == [[tokenizer.eos_token_id]]


def test_tokenizer_chat_template_marks_each_assistant_message(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    conv = [
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "no"},
    ]
    template = TokenizerChatTemplate(tokenizer)
    text, spans = template.render(conv)
    assert [text[s:e] for s, e in spans] == [" yes</s>", " no</s>"]
    enc = encode(tokenizer, conv, has_image=False, template=template)
    assert enc.input_ids[0] == tokenizer.bos_token_id  # written by the template, not added twice
    assert (enc.input_ids == tokenizer.bos_token_id).sum() == 1
    decoded = [tokenizer.decode(run) for run in supervised_runs(enc.labels)]
    assert decoded == [" yes</s>", " no</s>"]


def test_image_token_count_matches_vision_features(tiny_module, processor):
    from lightning_tive.data.images import ImageTransform

    count = image_token_count(processor)
    assert count == (64 // 16) ** 2
    from PIL import Image

    pixels = ImageTransform(processor.image_processor)(Image.new("RGB", (50, 30), (255, 0, 0)))
    assert tuple(pixels.shape) == (3, 64, 64)
    with torch.no_grad():
        features = tiny_module.llava.model.get_image_features(pixel_values=pixels[None])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    features = features[0] if isinstance(features, (list, tuple)) else features
    assert features.reshape(-1, features.shape[-1]).shape[0] == count
    assert tiny_module.llava.config.image_seq_length == count


def test_llava15_processor_implies_576_image_tokens(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    assert image_token_count(processor) == 576


def test_expand_to_square_pads_with_background_centred():
    from PIL import Image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((20, 20)) == (255, 0, 0)
    assert square.getpixel((20, 9)) == (1, 2, 3) and square.getpixel((20, 10)) == (255, 0, 0)


def test_image_mark_after_the_question_is_expanded_where_it_stands(tokenizer):
    # Some LLaVA-Instruct records put the image after the question.
    conv = [{"from": "human", "value": "What is in the picture?\n<image>"}, {"from": "gpt", "value": "a red circle"}]
    enc = encode(tokenizer, conv, has_image=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    where = np.nonzero(enc.input_ids == image_id)[0]
    assert len(where) == N_IMG and (np.diff(where) == 1).all()
    assert tokenizer.decode(enc.input_ids[: where[0]].tolist()).endswith("USER: What is in the picture?\n")
    assert tokenizer.decode(enc.input_ids[where[-1] + 1 : enc.answer_start].tolist()) == " ASSISTANT:"
    (run,) = supervised_runs(enc.labels)
    assert tokenizer.decode(run).strip() == "a red circle</s>"
    assert enc.answer_start > where[-1]
