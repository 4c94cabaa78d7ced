"""Conversation templates and encoding: token ids, supervised-only labels, image-token expansion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

IGNORE_INDEX = -100
IMAGE_MARK = "<image>"
# LLaVA's `conv_vicuna_v1`, the `--version v1` that LLaVA-1.5 trains with (not `conv_llava_v1`).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def place_image_first(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA's `preprocess_multimodal`: a turn holding `<image>` becomes `<image>\n` + its stripped text."""
    out = []
    for turn in conversations:
        value = turn["value"]
        if IMAGE_MARK in value:
            value = (IMAGE_MARK + "\n" + value.replace(IMAGE_MARK, "").strip()).strip()
        out.append({**turn, "value": value})
    return out


class ConversationTemplate(Protocol):
    """Renders a conversation to text and says which characters are supervised.

    Each span starts right after the assistant tag, so `text[:spans[-1][0]]` is the generation
    prompt of the last answer exactly as inference renders it, whatever the answer.
    """

    add_special_tokens: bool

    def render(self, conversations: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Return the full text and the sorted [start, end) character spans of assistant answers."""
        ...


@dataclass(frozen=True)
class VicunaV1Template:
    """LLaVA-1.5's `v1` template: `<system> USER: {q} ASSISTANT: {a}</s>USER: ...`.

    Rendered as LLaVA's `Conversation.get_prompt` (separator style TWO) renders it. Each answer
    with its leading space and the `</s>` that closes it is supervised, as in LLaVA's `preprocess_v1`;
    the generation prompt ends in `ASSISTANT:`, as at inference.
    """

    system: str = VICUNA_SYSTEM
    user: str = "USER"
    assistant: str = "ASSISTANT"
    end_of_turn: str = "</s>"
    add_special_tokens: bool = True  # the tokenizer adds <s>, which is never supervised

    def render(self, conversations: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render and return the supervised spans (` answer</s>`, from right after `ASSISTANT:`)."""
        parts = [self.system, " "]
        length = len(self.system) + 1
        spans: list[tuple[int, int]] = []
        for turn in place_image_first(conversations):
            if turn["from"] == "human":
                piece = f"{self.user}: {turn['value']} {self.assistant}:"
            else:
                piece = f" {turn['value']}{self.end_of_turn}"
                spans.append((length, length + len(piece)))
            parts.append(piece)
            length += len(piece)
        return "".join(parts), spans


@dataclass
class TokenizerChatTemplate:
    """Uses the tokenizer's own chat template; each assistant message (and its end marker) is supervised."""

    tokenizer: Any
    add_special_tokens: bool = False  # chat templates write their own BOS

    def render(self, conversations: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render incrementally, so each assistant span is what its message appended."""
        messages = [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in place_image_first(conversations)
        ]
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = self.tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not upto.startswith(prefix):
                raise ValueError("the tokenizer's chat template is not prefix-stable; it cannot mark answers")
            spans.append((len(prefix), len(upto)))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return text, spans


TEMPLATES = {"vicuna_v1": VicunaV1Template}


def build_template(name: str, tokenizer: Any) -> ConversationTemplate:
    """Template by name: `vicuna_v1` (LLaVA-1.5) or `chat` (the tokenizer's chat template)."""
    if name == "vicuna_v1":
        return VicunaV1Template()
    if name == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template")
        return TokenizerChatTemplate(tokenizer)
    raise ValueError(f"unknown conversation template {name!r}; choose 'vicuna_v1' or 'chat'")


@dataclass
class EncodedExample:
    """One example ready for the collator."""

    input_ids: np.ndarray  # int64 [T], image tokens expanded
    labels: np.ndarray  # int64 [T], IGNORE_INDEX where unsupervised
    # The last answer's generation prompt, tokenized on its own (image tokens expanded); None when
    # not asked for or longer than max_length.
    prompt_ids: np.ndarray | None = None


class EncodingProblem(ValueError):
    """The record cannot be encoded within the limits (the reason is the message)."""


def supervised_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """True for tokens whose character range overlaps a supervised span (vectorised)."""
    if len(offsets) == 0 or not spans:
        return np.zeros(len(offsets), dtype=bool)
    starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((e for _, e in spans), dtype=np.int64, count=len(spans))
    tok_start, tok_end = offsets[:, 0], offsets[:, 1]
    span_idx = np.searchsorted(starts, tok_end, side="left") - 1
    valid = (span_idx >= 0) & (tok_end > tok_start)
    return valid & (ends[np.clip(span_idx, 0, None)] > tok_start)


def expand_image_token(ids: np.ndarray, image_token_id: int, num_image_tokens: int) -> tuple[np.ndarray, int | None]:
    """Replace the one image token by `num_image_tokens` copies; returns the ids and its position."""
    where = np.nonzero(ids == image_token_id)[0]
    if len(where) == 0:
        return ids, None
    pos = int(where[0])
    block = np.full(num_image_tokens, image_token_id, dtype=np.int64)
    return np.concatenate([ids[:pos], block, ids[pos + 1 :]]), pos


def finish_encoding(
    ids: Sequence[int],
    offsets: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    *,
    has_image: bool,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
    prompt_ids: Sequence[int] | None = None,
) -> EncodedExample:
    """Mask labels, expand the one image token to `num_image_tokens`, and truncate safely.

    Raises EncodingProblem when truncation would cut image tokens or leave no supervised token.
    """
    ids_arr = np.asarray(ids, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = supervised_mask(offs, spans)
    labels = np.where(mask, ids_arr, IGNORE_INDEX)
    if not mask.any():
        raise EncodingProblem("no supervised (assistant) token after tokenization")
    found = int((ids_arr == image_token_id).sum())
    if found != (1 if has_image else 0):
        raise EncodingProblem(f"expected {1 if has_image else 0} image token(s) after tokenization, found {found}")
    ids_arr, pos = expand_image_token(ids_arr, image_token_id, num_image_tokens)
    if pos is not None:
        labels = np.concatenate([labels[:pos], np.full(num_image_tokens, IGNORE_INDEX, dtype=np.int64), labels[pos + 1 :]])
        if pos + num_image_tokens > max_length:
            raise EncodingProblem(
                f"image tokens end at {pos + num_image_tokens} > max_length={max_length}; "
                "truncation would cut the image"
            )
    if len(ids_arr) > max_length:
        ids_arr, labels = ids_arr[:max_length], labels[:max_length]
        if not (labels != IGNORE_INDEX).any():
            raise EncodingProblem(f"no supervised token left within max_length={max_length}")
    prompt = None
    if prompt_ids is not None:
        prompt, _ = expand_image_token(np.asarray(prompt_ids, dtype=np.int64), image_token_id, num_image_tokens)
        if len(prompt) > max_length:
            prompt = None
    return EncodedExample(ids_arr, labels, prompt)


def encode_conversations(
    tokenizer: Any,
    template: ConversationTemplate,
    batch: Sequence[Sequence[dict]],
    has_image: Sequence[bool],
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
    with_prompts: bool = False,
) -> list[EncodedExample | EncodingProblem]:
    """Encode many conversations with one batched tokenizer call; problems are returned, not raised.

    With `with_prompts`, each example also gets its last answer's generation prompt, tokenized on
    its own as inference tokenizes it, so it never depends on the answer.
    """
    rendered = [template.render(conv) for conv in batch]
    enc = tokenizer(
        [text for text, _ in rendered],
        add_special_tokens=template.add_special_tokens,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    prompts: list[Any] = [None] * len(rendered)
    if with_prompts:
        texts = [text[: spans[-1][0]] if spans else None for text, spans in rendered]
        wanted = [k for k, t in enumerate(texts) if t is not None]
        if wanted:
            ids = tokenizer(
                [texts[k] for k in wanted], add_special_tokens=template.add_special_tokens, return_attention_mask=False
            )["input_ids"]
            for k, prompt in zip(wanted, ids, strict=True):
                prompts[k] = prompt
    out: list[EncodedExample | EncodingProblem] = []
    for (_, spans), ids, offsets, image, prompt in zip(
        rendered, enc["input_ids"], enc["offset_mapping"], has_image, prompts, strict=True
    ):
        try:
            out.append(
                finish_encoding(
                    ids,
                    offsets,
                    spans,
                    has_image=image,
                    image_token_id=image_token_id,
                    num_image_tokens=num_image_tokens,
                    max_length=max_length,
                    prompt_ids=prompt,
                )
            )
        except EncodingProblem as problem:
            out.append(problem)
    return out
