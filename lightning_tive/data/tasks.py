"""Task labels for LLaVA-format records.

A record's task comes from, first match wins:
1. its `task` field; 2. its `dataset` field; 3. user rules (`TaskRule`, first match wins);
4. the built-in LLaVA-665K labeller (image folder + prompt pattern); 5. `"unknown"`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

UNKNOWN_TASK = "unknown"

LLAVA_665K_TASKS: tuple[str, ...] = (
    "llava_instruct",
    "vqav2",
    "aokvqa",
    "gqa",
    "ocr_vqa",
    "textcaps",
    "refcoco",
    "vg",
    "sharegpt",
)

# Prompt markers of the LLaVA-1.5 mix, exactly as its records spell them.
SHORT_ANSWER_MARK = "Answer the question using a single word or phrase."
CHOICE_MARK = "Answer with the option's letter from the given choices directly."
REGION_MARKS = (
    "Please provide the bounding box coordinate of the region this sentence describes",
    "Please provide a short description for this region",
)
CAPTION_MARK = "Provide a one-sentence caption for the provided image."

# The mix's image folders; matched as a path component so that absolute or prefixed paths work too.
_SOURCE_FOLDER = re.compile(r"(?:^|/)(coco|gqa|ocr_vqa|textvqa|vg)/")


def _compile(rule_task: str, name: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"TaskRule(task={rule_task!r}): {name} must be a string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"TaskRule(task={rule_task!r}): invalid {name} {pattern!r}: {err}") from err


@dataclass
class TaskRule:
    """Label records whose image path and/or first human turn match (re.search); all given regexes must match."""

    task: str
    image_regex: str | None = None
    prompt_regex: str | None = None
    _image: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _prompt: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"TaskRule needs a non-empty task name, got task={self.task!r}")
        if self.image_regex is None and self.prompt_regex is None:
            raise ValueError(f"TaskRule(task={self.task!r}) needs image_regex or prompt_regex (or both)")
        self._image = _compile(self.task, "image_regex", self.image_regex)
        self._prompt = _compile(self.task, "prompt_regex", self.prompt_regex)

    def matches(self, image: str | None, prompt: str) -> bool:
        """Whether this rule labels a record with this image path (None: text-only) and first human turn."""
        if self._image is not None and (image is None or self._image.search(image) is None):
            return False
        return self._prompt is None or self._prompt.search(prompt) is not None


_RULE_KEYS = frozenset(f.name for f in fields(TaskRule) if f.init)


def _as_rule(rule: TaskRule | Mapping) -> TaskRule:
    if isinstance(rule, TaskRule):
        return rule
    if isinstance(rule, Mapping):
        extra = sorted(set(rule) - _RULE_KEYS)
        if extra:
            raise ValueError(
                f"task rule {dict(rule)!r} has unknown key(s) {extra}; allowed: {sorted(_RULE_KEYS)}"
            )
        if "task" not in rule:
            raise ValueError(f"task rule {dict(rule)!r} has no 'task'")
        return TaskRule(**rule)
    raise ValueError(f"a task rule must be a TaskRule or a dict, got {rule!r}")


def first_human_text(record: Mapping) -> str:
    """The first human turn's text, or '' when there is none."""
    for turn in record.get("conversations") or ():
        if turn.get("from") == "human":
            return turn.get("value") or ""
    return ""


def llava_665k_task(image: str | None, prompt: str) -> str:
    """Built-in labeller for the stock llava_v1_5_mix665k.json sources; UNKNOWN_TASK if none fits."""
    if not image:
        return "sharegpt"
    found = _SOURCE_FOLDER.search(image)
    if found is None:
        return UNKNOWN_TASK
    folder = found.group(1)
    if folder == "coco":
        # Order matters: region prompts and choices never carry the short-answer mark, but be explicit.
        if any(mark in prompt for mark in REGION_MARKS):
            return "refcoco"
        if CHOICE_MARK in prompt:
            return "aokvqa"
        if SHORT_ANSWER_MARK in prompt:
            return "vqav2"
        return "llava_instruct"
    if folder == "textvqa":
        return "textcaps" if CAPTION_MARK in prompt else UNKNOWN_TASK
    # gqa/, ocr_vqa/ and vg/ each hold exactly one source in the mix.
    return folder


class TaskLabeller:
    """Assigns a task name to each LLaVA record: task field > dataset field > user rules > LLaVA-665K > unknown."""

    def __init__(self, rules: Iterable[TaskRule | Mapping] = ()) -> None:
        self.rules: tuple[TaskRule, ...] = tuple(_as_rule(rule) for rule in rules)

    def label(self, record: Mapping) -> str:
        """The task of one record."""
        for key in ("task", "dataset"):
            value = record.get(key)
            if value:
                return str(value)
        image = record.get("image") or None
        if isinstance(image, (list, tuple)):  # multi-image variants: the first image decides
            image = image[0] if image else None
        prompt = first_human_text(record)
        for rule in self.rules:
            if rule.matches(image, prompt):
                return rule.task
        return llava_665k_task(image, prompt)

    def label_all(self, records: Iterable[Mapping]) -> tuple[list[str], Counter]:
        """Labels for all records, in order, and how many records each task has."""
        labels = [self.label(record) for record in records]
        return labels, Counter(labels)
