"""Conversation templates and encoding: token ids, supervised-only labels, image-token expansion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class ConversationTemplate(Protocol):
    """Renders a conversation to text and says which characters are supervised."""

    add_special_tokens: bool

    def render(self, conversations: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Return the full text and the sorted [start, end) character spans of assistant answers."""
        ...


@dataclass(frozen=True)
class VicunaV1Template:
    """LLaVA-1.5's `v1` template: `<system> USER: {q} ASSISTANT: {a}</s>USER: ...`.

    Each answer and the `</s>` that closes it are supervised, as in LLaVA's `preprocess_v1`.
    """

    system: str = VICUNA_SYSTEM
    user: str = "USER"
    assistant: str = "ASSISTANT"
    end_of_turn: str = "</s>"
    add_special_tokens: bool = True  # the tokenizer adds <s>, which is never supervised

    def render(self, conversations: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render and return the supervised spans (answer text plus its `</s>`)."""
        parts = [self.system, " "]
        length = len(self.system) + 1
        spans: list[tuple[int, int]] = []
        for turn in conversations:
            if turn["from"] == "human":
                piece = f"{self.user}: {turn['value']} {self.assistant}: "
                parts.append(piece)
                length += len(piece)
            else:
                piece = turn["value"] + self.end_of_turn
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
            for t in conversations
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
    answer_start: int | None  # first token of the last answer (generation prompt ends here), if kept


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


def answer_starts(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> int | None:
    """Index of the first token overlapping the last supervised span."""
    if not spans:
        return None
    start, end = spans[-1]
    hits = np.nonzero((offsets[:, 1] > start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0]))[0]
    return int(hits[0]) if len(hits) else None


def finish_encoding(
    ids: Sequence[int],
    offsets: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    *,
    has_image: bool,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> EncodedExample:
    """Mask labels, expand the one image token to `num_image_tokens`, and truncate safely.

    Raises EncodingProblem when truncation would cut image tokens or leave no supervised token.
    """
    ids_arr = np.asarray(ids, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = supervised_mask(offs, spans)
    labels = np.where(mask, ids_arr, IGNORE_INDEX)
    ans = answer_starts(offs, spans)
    if not mask.any():
        raise EncodingProblem("no supervised (assistant) token after tokenization")
    image_positions = np.nonzero(ids_arr == image_token_id)[0]
    if len(image_positions) != (1 if has_image else 0):
        raise EncodingProblem(
            f"expected {1 if has_image else 0} image token(s) after tokenization, found {len(image_positions)}"
        )
    if has_image:
        pos = int(image_positions[0])
        block = np.full(num_image_tokens, image_token_id, dtype=np.int64)
        ignore = np.full(num_image_tokens, IGNORE_INDEX, dtype=np.int64)
        ids_arr = np.concatenate([ids_arr[:pos], block, ids_arr[pos + 1 :]])
        labels = np.concatenate([labels[:pos], ignore, labels[pos + 1 :]])
        if ans is not None and ans > pos:
            ans += num_image_tokens - 1
        if pos + num_image_tokens > max_length:
            raise EncodingProblem(
                f"image tokens end at {pos + num_image_tokens} > max_length={max_length}; "
                "truncation would cut the image"
            )
    if len(ids_arr) > max_length:
        ids_arr, labels = ids_arr[:max_length], labels[:max_length]
        if not (labels != IGNORE_INDEX).any():
            raise EncodingProblem(f"no supervised token left within max_length={max_length}")
        if ans is not None and ans >= max_length:
            ans = None
    return EncodedExample(ids_arr, labels, ans)


def encode_conversations(
    tokenizer: Any,
    template: ConversationTemplate,
    batch: Sequence[Sequence[dict]],
    has_image: Sequence[bool],
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
) -> list[EncodedExample | EncodingProblem]:
    """Encode many conversations with one batched tokenizer call; problems are returned, not raised."""
    rendered = [template.render(conv) for conv in batch]
    enc = tokenizer(
        [text for text, _ in rendered],
        add_special_tokens=template.add_special_tokens,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    out: list[EncodedExample | EncodingProblem] = []
    for (_, spans), ids, offsets, image in zip(rendered, enc["input_ids"], enc["offset_mapping"], has_image, strict=True):
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
                )
            )
        except EncodingProblem as problem:
            out.append(problem)
    return out
