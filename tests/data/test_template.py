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


def encode(tokenizer, conversations, has_image, max_length=512, template=None, with_prompts=False):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    (result,) = encode_conversations(
        tokenizer,
        template or VicunaV1Template(),
        [conversations],
        [has_image],
        image_token_id=image_id,
        num_image_tokens=N_IMG,
        max_length=max_length,
        with_prompts=with_prompts,
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


# Expected strings written from LLaVA's rules: conv_vicuna_v1 (system "curious user", roles USER /
# ASSISTANT, sep " ", sep2 "</s>", each message rendered as `role + ": " + message + sep`) and
# preprocess_multimodal (a turn holding <image> becomes "<image>\n" + its stripped text).
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_RENDERINGS = {
    "single-turn": (
        [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
        f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>",
    ),
    "multi-turn": (
        [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Black."},
        ],
        f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Black.</s>",
    ),
    "text-only": (
        [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}],
        f"{SYSTEM} USER: What is 2 plus 3? ASSISTANT: 5</s>",
    ),
    "marker-after-question": (
        [{"from": "human", "value": "What is in the picture?\n<image>"}, {"from": "gpt", "value": "a red circle"}],
        f"{SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT: a red circle</s>",
    ),
    "marker-mid-sentence": (
        [{"from": "human", "value": "  Look at <image> closely. "}, {"from": "gpt", "value": "ok"}],
        f"{SYSTEM} USER: <image>\nLook at  closely. ASSISTANT: ok</s>",
    ),
}


def test_system_prompt_is_conv_vicuna_v1():
    assert VICUNA_SYSTEM == SYSTEM


@pytest.mark.parametrize("name", sorted(LLAVA_RENDERINGS))
def test_vicuna_render_matches_llava(name):
    conv, expected = LLAVA_RENDERINGS[name]
    text, spans = VicunaV1Template().render(conv)
    assert text == expected
    # each supervised span is an answer with its leading space and </s>, starting right after the tag
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    assert [text[s:e] for s, e in spans] == [f" {a}</s>" for a in answers]
    assert all(text[:s].endswith("ASSISTANT:") for s, _ in spans)
    # the record itself is not modified
    assert conv == LLAVA_RENDERINGS[name][0]


ANSWERS = ["Yes", "No", "2", "two", "The red circle is to the left of the blue square."]


def chat_tokenizer(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    return tokenizer


@pytest.mark.parametrize("path", ["vicuna_v1", "chat"])
@pytest.mark.parametrize("has_image", [True, False])
def test_generation_prompt_is_the_same_whatever_the_answer(tokenizer, path, has_image):
    tok = chat_tokenizer(tokenizer) if path == "chat" else tokenizer
    template = TokenizerChatTemplate(tok) if path == "chat" else VicunaV1Template()
    first = ("<image>\n" if has_image else "") + "What is in the picture?"
    prompts = []
    for answer in ANSWERS:
        conv = [{"from": "human", "value": first}, {"from": "gpt", "value": "Two shapes."},
                {"from": "human", "value": "Is the red circle to the left of the blue square?"},
                {"from": "gpt", "value": answer}]
        enc = encode(tok, conv, has_image=has_image, template=template, with_prompts=True)
        prompts.append(enc.prompt_ids.tolist())
        # the prompt is what inference tokenizes: the conversation up to and including the assistant tag
        text, spans = template.render(conv)
        expected = tok(text[: spans[-1][0]], add_special_tokens=template.add_special_tokens)["input_ids"]
        image_id = tok.convert_tokens_to_ids("<image>")
        if has_image:
            k = expected.index(image_id)
            expected = expected[:k] + [image_id] * N_IMG + expected[k + 1 :]
        assert prompts[-1] == expected
        # the whole answer (its first token, space merged or not) is supervised, and the prompt is not
        assert tok.decode(supervised_runs(enc.labels)[-1]) == f" {answer}{tok.eos_token}"
    assert all(p == prompts[0] for p in prompts)
    tail = tok.decode(prompts[0][-4:])
    assert tail.endswith("ASSISTANT:" if path == "vicuna_v1" else "[assistant]")


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
    # without with_prompts no generation prompt is made (training never needs one)
    assert enc.prompt_ids is None


def test_text_only_record_has_no_image_tokens(tokenizer):
    conv = [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]
    enc = encode(tokenizer, conv, has_image=False, with_prompts=True)
    assert tokenizer.convert_tokens_to_ids("<image>") not in enc.input_ids.tolist()
    (run,) = supervised_runs(enc.labels)
    # " 5" splits into a space token and "5": both are the answer's, so both are supervised and the
    # prompt (which once kept the space, and so told the model a digit was coming) ends at the colon
    assert tokenizer.convert_ids_to_tokens(run)[:2] == ["Ġ", "5"]
    assert tokenizer.decode(run) == " 5</s>"
    assert tokenizer.convert_ids_to_tokens(enc.prompt_ids.tolist())[-1] == ":"


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


def test_empty_answer_is_a_bad_record():
    from lightning_tive.data.records import structure_problem

    record = {"id": "e", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}
    assert structure_problem(record) == "empty answer from gpt at turn 1"


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


def test_image_mark_after_the_question_moves_to_the_front_of_its_turn(tokenizer):
    # Some LLaVA-Instruct records put the image after the question; LLaVA moves it to the front.
    conv = [{"from": "human", "value": "What is in the picture?\n<image>"}, {"from": "gpt", "value": "a red circle"}]
    enc = encode(tokenizer, conv, has_image=True, with_prompts=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    where = np.nonzero(enc.input_ids == image_id)[0]
    assert len(where) == N_IMG and (np.diff(where) == 1).all()
    assert tokenizer.decode(enc.input_ids[: where[0]].tolist()).endswith("USER: ")
    after = tokenizer.decode(enc.input_ids[where[-1] + 1 :].tolist())
    assert after == "\nWhat is in the picture? ASSISTANT: a red circle</s>"
    (run,) = supervised_runs(enc.labels)
    assert tokenizer.decode(run) == " a red circle</s>"
    # the prompt is the same sequence up to and including the assistant tag
    prompt = enc.prompt_ids.tolist()
    assert prompt == enc.input_ids[: len(prompt)].tolist()
    assert tokenizer.decode(prompt[where[-1] + 1 :]) == "\nWhat is in the picture? ASSISTANT:"


def test_pad_colour_is_llava_truncated_clip_mean():
    from transformers.models.clip import CLIPImageProcessorPil

    from lightning_tive.data.images import ImageTransform

    # LLaVA: tuple(int(x * 255) for x in image_processor.image_mean); rounding would give (123, 117, 104)
    assert ImageTransform(CLIPImageProcessorPil()).background == (122, 116, 104)
