"""LLaVA-format records: reading JSON / JSON Lines, structural checks, and the bad-record policy."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Notices a user must see: logging, which PYTHONWARNINGS=ignore does not silence.
log = logging.getLogger("lightning_tive")

try:
    import fcntl
except ImportError:  # Windows: appends are not locked there
    fcntl = None

IMAGE_MARK = "<image>"
BadRecordPolicy = Literal["raise", "skip"]


class BadRecordError(ValueError):
    """A record that cannot be used, named by its id, its position in the source and the reason."""

    def __init__(self, record_id: Any, position: int | None = None, reason: str = "", source: str | None = None):
        self.record_id, self.position, self.reason, self.source = record_id, position, reason, source
        if position is None:  # re-raised from a loader worker with the message alone
            super().__init__(str(record_id))
            return
        where = f" in {source}" if source else ""
        super().__init__(
            f"bad record id={record_id!r} at position {position}{where}: {reason}. "
            "Fix the record, or set `data.on_bad_record: skip` to skip such records "
            "(they are listed in skipped.jsonl)."
        )


def load_records(path: str | os.PathLike) -> list[Any]:
    """Read a LLaVA JSON list or a JSON Lines file; structure is checked later, record by record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            records = json.load(f)
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of records")
            return records
        records = []
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                # Keep the position: an unparseable line is a bad record like any other.
                records.append(_Unparseable(f"line {line_no} is not valid JSON ({err.msg})"))
        return records


@dataclass(frozen=True)
class _Unparseable:
    reason: str


def structure_problem(record: Any) -> str | None:
    """Return why a record is structurally bad (the issue's list of kinds), or None if it is fine."""
    if isinstance(record, _Unparseable):
        return record.reason
    if not isinstance(record, dict):
        return f"malformed structure: expected an object, got {type(record).__name__}"
    convs = record.get("conversations")
    if not isinstance(convs, list):
        return "malformed structure: `conversations` must be a list"
    if not convs:
        return "empty conversation"
    for turn_no, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            return f"malformed structure: turn {turn_no} needs string `from` and `value`"
        if turn["from"] not in ("human", "gpt"):
            return f"malformed structure: turn {turn_no} has unknown role {turn['from']!r}"
    if convs[0]["from"] != "human":
        return "first turn is not from human"
    for turn_no, turn in enumerate(convs):
        if turn["from"] != ("human" if turn_no % 2 == 0 else "gpt"):
            return f"roles do not alternate human/gpt at turn {turn_no}"
    if convs[-1]["from"] != "gpt":
        return "conversation ends without an answer from gpt"
    for turn_no, turn in enumerate(convs):
        # LLaVA renders an empty message as a bare role tag, which its own masking then rejects.
        if turn["from"] == "gpt" and not turn["value"].strip():
            return f"empty answer from gpt at turn {turn_no}"
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        return "malformed structure: `image` must be a single path string"
    marks = sum(turn["value"].count(IMAGE_MARK) for turn in convs)
    if image is None and marks:
        return f"`{IMAGE_MARK}` appears in the text of a record without an image"
    if image is not None and marks != 1:
        return f"record has an image but `{IMAGE_MARK}` appears {marks} times (expected exactly once)"
    if image is not None and IMAGE_MARK not in convs[0]["value"]:
        return f"`{IMAGE_MARK}` must be in the first human turn"
    return None


class SkipLog:
    """Appends skipped records with their reasons to `skipped.jsonl`, from any process.

    Every line is one locked append, so loader workers and the processes of a multi-GPU run can
    share the file. Set-up skips are the same on every process, so only one (`write_setup`) lists
    them; records skipped while loading are listed by whichever process met them.
    """

    def __init__(self, path: str | os.PathLike | None, write_setup: bool = True):
        self.path = Path(path) if path is not None else None
        self.write_setup = write_setup
        self.count = 0  # this process's count (a loader worker's own skips are in the file, not here)

    def write(self, record_id: Any, position: int, reason: str, stage: str) -> None:
        """Record one skipped record as one appended line."""
        self.count += 1
        if stage != "load" and not self.write_setup:
            return
        line = json.dumps({"id": record_id, "position": position, "reason": reason, "stage": stage})
        if self.path is None:
            log.warning(f"skipped record id={record_id!r} at position {position}: {reason}")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.write(line + "\n")


def apply_policy(
    problems: Iterable[tuple[int, Any, str]],
    policy: BadRecordPolicy,
    skip_log: SkipLog,
    stage: str,
    source: str | None = None,
) -> set[int]:
    """Raise on the first problem under `raise`; under `skip` log them all and return their positions."""
    if policy not in ("raise", "skip"):
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {policy!r}")
    skipped: set[int] = set()
    for position, record_id, reason in problems:
        if policy == "raise":
            raise BadRecordError(record_id, position, reason, source)
        skip_log.write(record_id, position, reason, stage)
        skipped.add(position)
    return skipped


def record_id(record: Any, position: int) -> Any:
    """The record's `id`, or its position when it has none (so messages can still name it)."""
    if isinstance(record, dict) and "id" in record:
        return record["id"]
    return f"<no id, position {position}>"
