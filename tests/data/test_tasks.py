"""Task labels: built-in LLaVA-665K sources, precedence, user rules, bad rules."""

from collections import Counter

import pytest

from lightning_tive.data.tasks import (
    LLAVA_665K_TASKS,
    UNKNOWN_TASK,
    TaskLabeller,
    TaskRule,
    first_human_text,
)


def rec(image, *turns, **extra):
    """A LLaVA record; turns alternate human/gpt."""
    conversations = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]
    record = {"id": "x", "conversations": conversations, **extra}
    if image is not None:
        record["image"] = image
    return record


SHORT = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."

# Records shaped like each source of llava_v1_5_mix665k.json.
MIX_665K = {
    "llava_instruct": rec(
        "coco/train2017/000000033471.jpg",
        "<image>\nWhat are the colors of the bus in the image?",
        "The bus in the image is white and red.",
        "What feature can be seen on the back of the bus?",
        "The back of the bus features an advertisement.",
    ),
    "llava_instruct_image_last": rec(
        "coco/train2017/000000052846.jpg",
        "What is the cat doing in the image?\n<image>",
        "The cat is sitting on a laptop keyboard.",
    ),
    "vqav2": rec(
        "coco/train2017/000000184338.jpg",
        "<image>\nIs the sky cloudy?" + SHORT,
        "No",
        "What color is the plane?",
        "White",
    ),
    "okvqa": rec(
        "coco/train2017/000000051606.jpg", "<image>\nWhat sport can you use this for?" + SHORT, "Surfing"
    ),
    "aokvqa": rec(
        "coco/train2017/000000299207.jpg",
        "<image>\nWhat is the man by the bags awaiting?\nA. skateboarder\nB. train\nC. delivery\nD. cab"
        + CHOICE,
        "D",
    ),
    "gqa": rec("gqa/images/2354786.jpg", "<image>\nIs the sky dark?" + SHORT, "Yes"),
    "ocr_vqa": rec(
        "ocr_vqa/images/140031996.jpg", "<image>\nWho wrote this book?" + SHORT, "Mary Engelbreit"
    ),
    "textcaps": rec(
        "textvqa/train_images/011e7e629fb9ae7b.jpg",
        "<image>\nProvide a one-sentence caption for the provided image.\nReference OCR token: FIAT, 500",
        "A small red Fiat 500 is parked on the street.",
    ),
    "refcoco_box": rec(
        "coco/train2017/000000580957.jpg",
        "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: bowl behind the others.",
        "[0.39, 0.06, 0.93, 0.42]",
    ),
    "refcoco_region": rec(
        "coco/train2017/000000580957.jpg",
        "<image>\nPlease provide a short description for this region: [0.12, 0.34, 0.56, 0.78]",
        "Bowl of carrots.",
    ),
    "vg": rec(
        "vg/VG_100K_2/1.jpg",
        "<image>\nPlease provide a short description for this region: [0.12, 0.34, 0.56, 0.78]",
        "A tree with green leaves.",
    ),
    "vg_box": rec(
        "vg/VG_100K/2345678.jpg",
        "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: white clouds.",
        "[0.00, 0.00, 0.99, 0.31]",
    ),
    "sharegpt": rec(
        None,
        "How to tell if a customer segment is well segmented? In 3 bullet points.",
        "1. Homogeneity ...",
    ),
}

EXPECTED = {
    "llava_instruct": "llava_instruct",
    "llava_instruct_image_last": "llava_instruct",
    "vqav2": "vqav2",
    "okvqa": "vqav2",  # documented limit: OK-VQA is indistinguishable from VQAv2
    "aokvqa": "aokvqa",
    "gqa": "gqa",
    "ocr_vqa": "ocr_vqa",
    "textcaps": "textcaps",
    "refcoco_box": "refcoco",
    "refcoco_region": "refcoco",
    "vg": "vg",
    "vg_box": "vg",
    "sharegpt": "sharegpt",
}


@pytest.mark.parametrize("name", sorted(MIX_665K))
def test_builtin_labels_each_llava_665k_source(name):
    assert TaskLabeller().label(MIX_665K[name]) == EXPECTED[name]


def test_builtin_task_names_are_the_documented_ones():
    assert set(EXPECTED.values()) == set(LLAVA_665K_TASKS)


@pytest.mark.parametrize(
    "image, task",
    [
        ("/data/llava/coco/train2017/000000033471.jpg", "llava_instruct"),
        ("./gqa/images/2354786.jpg", "gqa"),
        ("playground/data/ocr_vqa/images/140031996.jpg", "ocr_vqa"),
    ],
)
def test_builtin_matches_source_folder_anywhere_in_path(image, task):
    assert TaskLabeller().label(rec(image, "<image>\nDescribe this.", "ok")) == task


@pytest.mark.parametrize(
    "record",
    [
        rec("sam/images/sa_1.jpg", "<image>\nWhat is this?" + SHORT, "A dog"),
        rec("textvqa/train_images/011e7e629fb9ae7b.jpg", "<image>\nWhat brand is the car?" + SHORT, "fiat"),
        rec("my_coco/train2017/1.jpg", "<image>\nWhat is this?", "A dog"),
    ],
)
def test_unrecognised_records_are_unknown(record):
    assert TaskLabeller().label(record) == UNKNOWN_TASK


def test_record_without_conversations_is_labelled_by_image_alone():
    assert TaskLabeller().label({"id": "x", "image": "coco/train2017/1.jpg"}) == "llava_instruct"
    assert TaskLabeller().label({"id": "x"}) == "sharegpt"


def test_precedence_task_then_dataset_then_rule_then_builtin():
    labeller = TaskLabeller([TaskRule("from_rule", image_regex=r"^coco/")])
    base = MIX_665K["vqav2"]
    assert labeller.label({**base, "task": "t", "dataset": "d"}) == "t"
    assert labeller.label({**base, "dataset": "d"}) == "d"
    assert labeller.label(base) == "from_rule"
    assert labeller.label(MIX_665K["gqa"]) == "gqa"  # rule does not match: built-in decides
    assert TaskLabeller().label(base) == "vqav2"


def test_empty_task_field_falls_through():
    assert TaskLabeller().label({**MIX_665K["gqa"], "task": "", "dataset": None}) == "gqa"


def test_first_matching_user_rule_wins():
    labeller = TaskLabeller(
        [
            {"task": "books", "image_regex": r"ocr_vqa/"},
            {"task": "authors", "prompt_regex": r"Who wrote"},
            {"task": "never", "image_regex": r"ocr_vqa/", "prompt_regex": r"Who wrote"},
        ]
    )
    assert labeller.label(MIX_665K["ocr_vqa"]) == "books"
    reordered = TaskLabeller(list(reversed(labeller.rules)))
    assert reordered.label(MIX_665K["ocr_vqa"]) == "never"


def test_rule_with_both_regexes_needs_both():
    rule = TaskRule("gqa_yesno", image_regex=r"^gqa/", prompt_regex=r"^<image>\nIs ")
    labeller = TaskLabeller([rule])
    assert labeller.label(MIX_665K["gqa"]) == "gqa_yesno"
    assert labeller.label(rec("gqa/images/1.jpg", "<image>\nWhat is on the table?" + SHORT, "cup")) == "gqa"
    assert labeller.label(rec("coco/train2017/1.jpg", "<image>\nIs it sunny?" + SHORT, "yes")) == "vqav2"


def test_image_rule_never_matches_text_only_but_prompt_rule_can():
    text_only = MIX_665K["sharegpt"]
    assert TaskLabeller([TaskRule("any_image", image_regex=r".*")]).label(text_only) == "sharegpt"
    assert TaskLabeller([TaskRule("segments", prompt_regex=r"segment")]).label(text_only) == "segments"


def test_prompt_rule_sees_only_the_first_human_turn():
    labeller = TaskLabeller([TaskRule("plane", prompt_regex=r"plane")])
    assert labeller.label(MIX_665K["vqav2"]) == "vqav2"  # "plane" is in the second question
    assert first_human_text(MIX_665K["vqav2"]) == "<image>\nIs the sky cloudy?" + SHORT


def test_label_all_keeps_order_and_counts_unknown():
    records = [
        MIX_665K["gqa"],
        MIX_665K["sharegpt"],
        rec("sam/images/sa_1.jpg", "<image>\nWhat?", "x"),
        MIX_665K["gqa"],
        {**MIX_665K["gqa"], "task": "mine"},
        rec("wikiart/images/1.jpg", "<image>\nWho painted this?", "x"),
    ]
    labels, counts = TaskLabeller().label_all(records)
    assert labels == ["gqa", "sharegpt", UNKNOWN_TASK, "gqa", "mine", UNKNOWN_TASK]
    assert counts == Counter({"gqa": 2, UNKNOWN_TASK: 2, "sharegpt": 1, "mine": 1})


def test_multi_image_record_uses_first_image():
    record = rec(["gqa/images/1.jpg", "coco/train2017/1.jpg"], "<image>\n<image>\nSame?", "No")
    assert TaskLabeller().label(record) == "gqa"


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"task": "a"}, "TaskRule(task='a') needs image_regex or prompt_regex"),
        ({"task": "b", "image_regex": "coco/("}, "TaskRule(task='b'): invalid image_regex 'coco/('"),
        ({"task": "c", "prompt_regex": "[unclosed"}, "TaskRule(task='c'): invalid prompt_regex '[unclosed'"),
        ({"task": "", "image_regex": "x"}, "non-empty task name"),
        ({"task": "d", "image_regx": "x"}, "unknown key(s) ['image_regx']"),
        ({"image_regex": "x"}, "has no 'task'"),
        ("coco", "must be a TaskRule or a dict"),
    ],
)
def test_bad_rules_raise_clear_errors(rule, message):
    with pytest.raises(ValueError) as err:
        TaskLabeller([rule])
    assert message in str(err.value)
