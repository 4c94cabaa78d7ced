"""The data index: a record file parsed, checked, labelled and tokenised once, cached, then memory-mapped.

At LLaVA-665K scale, reading the JSON (~1 GB), checking ~624K image paths and tokenising every record
takes minutes and gigabytes per process. `build_index` does it once (Lightning's `prepare_data`
runs it on one process per node) and writes a folder keyed by everything that changes its content:
the file's sha256, the tokenizer, the template, `max_length`, the image-token layout, the image
folder and the task rules. Every process (and every loader worker, by fork) then maps the folder:
records are parsed on demand, token ids and supervised masks are read from flat arrays, and the
pool's fingerprint comes from per-record digests instead of dumping every record again.

Files of an index folder (n = records that passed every check, in file order):
- `meta.json`: the key, the task labels, counts, timings; written last (it marks a complete folder);
- `records.bin` + `record_offsets.npy` [n+1]: each record's JSON text (UTF-8);
- `positions.npy` [n]: its position in the source file; `labels.npy` [n]: index into meta's labels;
- `digests.npy` [n, 16]: a digest of each record's JSON text (the pool fingerprint's input);
- `tokens.bin` (int32) + `token_offsets.npy` [n+1], `supervised.bin` (uint8): token ids with each
  image's block collapsed to one token, and which of them are supervised;
- `lengths.npy` [n]: the encoded length (image tokens expanded); `has_image.npy` [n];
- `problems.jsonl`: the records left out, `{"position", "id", "reason"}`, in file order.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_tive.data.records import load_records, record_id, structure_problem
from lightning_tive.data.template import IGNORE_INDEX
from lightning_tive.files import atomic_write, build_cache_folder, memoised_sha256

# Bump when what an index holds changes: the encoding, the checks or the built-in task labeller.
INDEX_VERSION = 1
META = "meta.json"
ENCODE_BATCH = 1024


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of everything in a tokenizer that changes token ids: its model, special tokens, template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary and merges decide the ids
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extras = {
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted(str(t) for t in tokenizer.get_added_vocab()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": getattr(tokenizer, "add_bos_token", None),
        "eos": getattr(tokenizer, "add_eos_token", None),
    }
    digest.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def record_digest(text: bytes) -> bytes:
    """16 bytes identifying a record's content (its JSON text as the index stores it)."""
    return hashlib.blake2b(text, digest_size=16).digest()


@dataclass(frozen=True)
class IndexSpec:
    """What an index is built from; `key()` names its cache folder."""

    source: str
    image_folder: str | None
    template: str
    max_length: int
    image_token_id: int
    num_image_tokens: int
    task_rules: tuple = ()

    def key(self, tokenizer: Any, memo_dir: Path) -> dict:
        """Everything that changes the index's content, as plain values."""
        source = Path(self.source)
        return {
            "version": INDEX_VERSION,
            "source_sha256": memoised_sha256(source, memo_dir),
            "image_folder": None if self.image_folder is None else str(Path(self.image_folder).resolve()),
            "tokenizer": tokenizer_digest(tokenizer),
            "template": self.template,
            "max_length": self.max_length,
            "image_token_id": self.image_token_id,
            "num_image_tokens": self.num_image_tokens,
            "task_rules": json.dumps(list(self.task_rules), sort_keys=True, default=str),
        }


def index_folder(root: Path, spec: IndexSpec, tokenizer: Any) -> tuple[Path, dict]:
    """The cache folder of `spec`'s index under `root`, and its key."""
    key = spec.key(tokenizer, root / "digests")
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / f"{Path(spec.source).stem}-{name}", key


def build_index(
    root: Path,
    spec: IndexSpec,
    tokenizer: Any,
    encode: Callable[[Sequence[dict]], list],
    label: Callable[[dict], str],
) -> Path:
    """Build (once, race-safe) and return the index folder of `spec`.

    `encode(records)` gives an `EncodedExample` or the problem (an exception) per record; `label(record)`
    its task. Bad records are listed in `problems.jsonl`, never dropped silently.
    """
    folder, key = index_folder(root, spec, tokenizer)
    return build_cache_folder(folder, lambda tmp: _write_index(tmp, spec, key, encode, label), META)


def _write_index(folder: Path, spec: IndexSpec, key: dict, encode: Callable, label: Callable) -> None:
    start = time.perf_counter()
    records = load_records(spec.source)
    parsed = time.perf_counter()
    problems: dict[int, tuple[Any, str]] = {}
    valid: list[int] = []
    for position, record in enumerate(records):
        reason = structure_problem(record)
        if reason is None and record.get("image") is not None:
            if not os.path.isfile(os.path.join(spec.image_folder or "", record["image"])):
                reason = f"image file {record['image']!r} not found under {spec.image_folder!r}"
        if reason is None:
            valid.append(position)
        else:
            problems[position] = (record_id(record, position), reason)
    checked = time.perf_counter()

    # Streamed to disk batch by batch: encoded examples of 665K records would not fit in memory at once.
    kept: list[int] = []
    lengths, images, token_counts, text_sizes, digests = [], [], [], [], []
    with open(folder / "tokens.bin", "wb") as tokens, open(folder / "supervised.bin", "wb") as supervised, \
            open(folder / "records.bin", "wb") as texts:
        for start_at in range(0, len(valid), ENCODE_BATCH):
            chunk = valid[start_at : start_at + ENCODE_BATCH]
            for position, result in zip(chunk, encode([records[p] for p in chunk]), strict=True):
                if isinstance(result, Exception):
                    problems[position] = (record_id(records[position], position), str(result))
                    continue
                compact, mask = collapse_image_block(result.input_ids, result.labels, spec.image_token_id)
                tokens.write(compact.astype(np.int32).tobytes())
                supervised.write(mask.astype(np.uint8).tobytes())
                text = json.dumps(records[position], ensure_ascii=False).encode()
                texts.write(text)
                digests.append(record_digest(text))
                kept.append(position)
                lengths.append(len(result.input_ids))
                images.append(bool((compact == spec.image_token_id).any()))
                token_counts.append(len(compact))
                text_sizes.append(len(text))
    tokenised = time.perf_counter()
    np.save(folder / "token_offsets.npy", _offsets(token_counts))
    np.save(folder / "record_offsets.npy", _offsets(text_sizes))
    np.save(folder / "positions.npy", np.asarray(kept, dtype=np.int64))
    names = [label(records[p]) for p in kept]
    labels = sorted(set(names))
    lookup = {name: i for i, name in enumerate(labels)}
    np.save(folder / "labels.npy", np.fromiter((lookup[n] for n in names), dtype=np.int32, count=len(names)))
    np.save(folder / "digests.npy", np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(kept), 16))
    np.save(folder / "lengths.npy", np.asarray(lengths, dtype=np.int32))
    np.save(folder / "has_image.npy", np.asarray(images, dtype=bool))
    lines = [json.dumps({"position": p, "id": problems[p][0], "reason": problems[p][1]}, default=str) for p in sorted(problems)]
    atomic_write(folder / "problems.jsonl", "".join(line + "\n" for line in lines))
    meta = {
        "key": key, "source": str(spec.source), "records": len(records), "kept": len(kept),
        "problems": len(problems), "labels": labels,
        "seconds": {"parse": parsed - start, "check": checked - parsed, "tokenise": tokenised - checked,
                    "total": time.perf_counter() - start},
    }
    atomic_write(folder / META, json.dumps(meta, indent=2, default=str) + "\n")  # last: marks it complete


def collapse_image_block(ids: np.ndarray, labels: np.ndarray, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoded ids with each run of image tokens collapsed to one, and the supervised mask."""
    supervised = labels != IGNORE_INDEX
    image = ids == image_token_id
    first = image & ~np.concatenate([[False], image[:-1]])
    keep = ~image | first
    return ids[keep], supervised[keep]


def _offsets(sizes: list[int]) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def _map(path: Path, dtype: Any) -> np.ndarray:
    """A read-only map of a flat binary file (an empty array for an empty file, which mmap refuses)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)


class DataIndex:
    """A built index folder, memory-mapped: records on demand, encoded examples, lengths, problems."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self._open()

    def _open(self) -> None:
        load = lambda name: np.load(self.folder / name, mmap_mode="r")  # noqa: E731
        self.record_offsets = load("record_offsets.npy")
        self._records = _map(self.folder / "records.bin", np.uint8)
        self.positions = load("positions.npy")
        self.label_ids = load("labels.npy")
        self.digests = load("digests.npy")
        self.tokens = _map(self.folder / "tokens.bin", np.int32)
        self.supervised = _map(self.folder / "supervised.bin", np.uint8)
        self.token_offsets = load("token_offsets.npy")
        self.lengths = load("lengths.npy")
        self.has_image = load("has_image.npy")

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "meta": self.meta}  # loader workers under spawn map the files again

    def __setstate__(self, state: dict) -> None:
        self.folder, self.meta = state["folder"], state["meta"]
        self._open()

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> list[str]:
        """The task label names that `label_ids` index."""
        return list(self.meta["labels"])

    @property
    def source(self) -> str:
        """The record file it was built from."""
        return self.meta["source"]

    def record(self, row: int) -> dict:
        """The record at `row`, parsed from its JSON text."""
        start, stop = int(self.record_offsets[row]), int(self.record_offsets[row + 1])
        return json.loads(bytes(self._records[start:stop]).decode())

    def encoded(self, row: int, num_image_tokens: int, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of `row` as the encoder gave them: each image token expanded again."""
        start, stop = int(self.token_offsets[row]), int(self.token_offsets[row + 1])
        ids = np.asarray(self.tokens[start:stop], dtype=np.int64)
        supervised = np.asarray(self.supervised[start:stop], dtype=bool)
        repeat = np.where(ids == image_token_id, num_image_tokens, 1)
        ids, supervised = np.repeat(ids, repeat), np.repeat(supervised, repeat)
        return ids, np.where(supervised, ids, IGNORE_INDEX)

    def problems(self) -> list[tuple[int, Any, str]]:
        """(position, id, reason) of every record left out, in file order."""
        lines = (self.folder / "problems.jsonl").read_text().splitlines()
        return [(p["position"], p["id"], p["reason"]) for p in map(json.loads, lines)]
