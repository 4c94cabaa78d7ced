"""The pool of valid examples, a map-style dataset over it, index views and the collator."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_tive.data.images import ImageTransform
from lightning_tive.data.index import DataIndex
from lightning_tive.data.records import BadRecordError, BadRecordPolicy, SkipLog
from lightning_tive.data.template import (
    IGNORE_INDEX,
    ConversationTemplate,
    EncodedExample,
    encode_conversations,
)


class Records(Sequence):
    """The records of a pool, parsed from its index on demand (pool order)."""

    def __init__(self, index: DataIndex, rows: np.ndarray) -> None:
        self.index, self.rows = index, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        return self.index.record(int(self.rows[i]))


@dataclass
class Pool:
    """Valid examples in pool order: pool index i is row `rows[i]` of a DataIndex, with its task."""

    index: DataIndex
    rows: np.ndarray  # int64 index row of each pool example
    task_ids: np.ndarray  # int64 index into `task_names`
    task_names: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def records(self) -> Records:
        """The records, in pool order (parsed when read)."""
        return Records(self.index, self.rows)

    @property
    def positions(self) -> np.ndarray:
        """Each example's position in its source file."""
        return np.asarray(self.index.positions[self.rows])

    @property
    def source(self) -> str:
        """The record file."""
        return self.index.source

    @property
    def ids(self) -> list[Any]:
        """The records' `id` fields, in pool order."""
        return [r.get("id") for r in self.records]

    @property
    def lengths(self) -> np.ndarray:
        """Each example's encoded length in tokens (image tokens included)."""
        return np.asarray(self.index.lengths[self.rows], dtype=np.int64)

    @property
    def has_image(self) -> np.ndarray:
        """Whether each example has an image."""
        return np.asarray(self.index.has_image[self.rows])

    def task_of(self, index: int) -> str:
        """Task name of a pool index."""
        return self.task_names[int(self.task_ids[index])]

    def subset(self, keep: np.ndarray) -> Pool:
        """The examples at positions `keep`, in that order."""
        return Pool(self.index, self.rows[keep], self.task_ids[keep], self.task_names)

    def digest(self) -> str:
        """A digest of the records (their content) and tasks, in pool order."""
        digest = hashlib.sha256(json.dumps(self.task_names).encode())
        digest.update(np.ascontiguousarray(self.index.digests[self.rows]).tobytes())
        digest.update(np.ascontiguousarray(self.task_ids, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]


@dataclass
class Encoder:
    """Everything needed to turn a record into token ids and labels."""

    tokenizer: Any
    template: ConversationTemplate
    image_token_id: int
    num_image_tokens: int
    max_length: int

    def encode(self, records: Sequence[dict], with_prompts: bool = False) -> list[EncodedExample | ValueError]:
        """Batched encoding; a record that cannot be encoded yields its problem instead."""
        return encode_conversations(
            self.tokenizer,
            self.template,
            [r["conversations"] for r in records],
            [r.get("image") is not None for r in records],
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
            with_prompts=with_prompts,
        )


@dataclass
class LlavaDataset(Dataset):
    """Map-style dataset over a Pool: item i is pool index i, encoded, with its image loaded lazily."""

    pool: Pool
    encoder: Encoder
    image_transform: ImageTransform | None
    image_folder: str | None
    on_bad_record: BadRecordPolicy = "raise"
    skip_log: SkipLog = field(default_factory=lambda: SkipLog(None))
    with_prompts: bool = False  # add each example's generation prompt (held-out metrics)

    def __len__(self) -> int:
        return len(self.pool)

    def image_path(self, record: dict) -> str:
        """Where a record's image lives."""
        return os.path.join(self.image_folder or "", record["image"])

    def _bad(self, index: int, reason: str) -> dict:
        record = self.pool.records[index]
        position = int(self.pool.positions[index])
        if self.on_bad_record == "raise":
            raise BadRecordError(record.get("id"), position, reason, self.pool.source)
        self.skip_log.write(record.get("id"), position, reason, stage="load")
        return {"skipped": True, "pool_index": index}

    def _encode(self, index: int, record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | ValueError:
        """(input_ids, labels, prompt_ids): from the index's cached tokens, or encoded now for prompts."""
        if not self.with_prompts:
            encoder = self.encoder
            ids, labels = self.pool.index.encoded(int(self.pool.rows[index]), encoder.num_image_tokens, encoder.image_token_id)
            return ids, labels, None
        encoded = self.encoder.encode([record], with_prompts=True)[0]
        if isinstance(encoded, ValueError):
            return encoded
        return encoded.input_ids, encoded.labels, encoded.prompt_ids

    def __getitem__(self, index: int) -> dict:
        record = self.pool.records[index]
        encoded = self._encode(index, record)
        if isinstance(encoded, ValueError):
            return self._bad(index, str(encoded))
        input_ids, labels, prompt_ids = encoded
        pixel_values = None
        if record.get("image") is not None:
            try:
                pixel_values = self.image_transform(self.image_transform.load(self.image_path(record)))
            except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for broken files
                return self._bad(index, f"image {record['image']!r} is missing or unreadable ({err})")
        last_answer = record["conversations"][-1]["value"]
        item = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "pixel_values": pixel_values,
            "pool_index": index,
            "task_id": int(self.pool.task_ids[index]),
            "answer": last_answer,
        }
        if self.with_prompts:
            item["prompt_ids"] = None if prompt_ids is None else torch.from_numpy(prompt_ids)
        return item


class IndexView(Dataset):
    """A dataset serving a list of pool indices, repeats allowed (a multiset)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        return self.dataset[int(self.indices[position])]


def _pad(seqs: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    longest = max(len(s) for s in seqs)
    out = torch.full((len(seqs), longest), value, dtype=seqs[0].dtype)
    for row, seq in enumerate(seqs):
        if left:
            out[row, longest - len(seq) :] = seq
        else:
            out[row, : len(seq)] = seq
    return out


@dataclass
class LlavaCollator:
    """Pads a list of examples into a batch; skipped items are dropped (they are already logged).

    With `generation=True` it adds the left-padded generation prompts of the last answers (tokenized
    on their own, see `encode_conversations`) and the reference answers, for greedy-generation metrics.
    `max_length` cuts every example to its first `max_length` tokens (TIVE's `valuation_max_length`).
    """

    pad_token_id: int
    generation: bool = False
    max_length: int | None = None

    def __call__(self, items: list[dict]) -> dict:
        kept = [item for item in items if not item.get("skipped")]
        if self.max_length is not None:
            if self.generation:
                raise ValueError("generation batches are never truncated: their prompts would lose the answer")
            kept = [{**item, "input_ids": item["input_ids"][: self.max_length], "labels": item["labels"][: self.max_length]}
                    for item in kept]
        batch: dict[str, Any] = {
            "pool_index": torch.tensor([item["pool_index"] for item in kept], dtype=torch.long),
            "task_id": torch.tensor([item.get("task_id", -1) for item in kept], dtype=torch.long),
            "skipped_pool_index": torch.tensor(
                [item["pool_index"] for item in items if item.get("skipped")], dtype=torch.long
            ),
        }
        if not kept:
            return batch
        ids = [item["input_ids"] for item in kept]
        batch["input_ids"] = _pad(ids, self.pad_token_id, left=False)
        batch["labels"] = _pad([item["labels"] for item in kept], IGNORE_INDEX, left=False)
        batch["attention_mask"] = _pad([torch.ones_like(i) for i in ids], 0, left=False)
        pixels = [item["pixel_values"] for item in kept if item["pixel_values"] is not None]
        batch["pixel_values"] = torch.stack(pixels) if pixels else None
        if self.generation:
            if any("prompt_ids" not in item for item in kept):
                raise ValueError("generation batches need a dataset built with with_prompts=True")
            # An example without a prompt (over max_length) gets a placeholder and scores 0.
            prompts = [item["prompt_ids"] for item in kept]
            filled = [p if p is not None else item["input_ids"][:1] for p, item in zip(prompts, kept, strict=True)]
            batch["prompt_ids"] = _pad(filled, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = _pad([torch.ones_like(p) for p in filled], 0, left=True)
            batch["has_prompt"] = torch.tensor([p is not None for p in prompts])
            batch["answers"] = [item["answer"] for item in kept]
        return batch
