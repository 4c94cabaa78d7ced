"""Read an offline W&B run (`run-*.wandb`) back: history rows, for tests and reports without a server."""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

_HEADER = b":W&B"
_HEADER_LEN = 7  # ident, magic (2 bytes), version (1 byte)
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    """Split the LevelDB-style log that wandb writes into whole records."""
    if not data.startswith(_HEADER):
        raise ValueError("not a W&B transaction log (missing ':W&B' header)")
    records, pending = [], b""
    pos = _HEADER_LEN
    while pos + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        body = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        if len(body) < length:  # the writer is still appending this chunk
            break
        pos += _CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == _FULL:
            records.append(body)
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            records.append(pending + body)
            pending = b""
    return records


def find_offline_run(save_dir: str | os.PathLike) -> Path:
    """The newest `run-*.wandb` file under a WandbLogger's `save_dir`."""
    files = sorted(glob.glob(str(Path(save_dir) / "wandb" / "offline-run-*" / "run-*.wandb")), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {save_dir}/wandb")
    return Path(files[-1])


def read_history(run_file: str | os.PathLike, wait_s: float = 30.0) -> list[dict[str, Any]]:
    """Every logged history row of an offline run, as {key: decoded JSON value}.

    W&B's service may still be writing after `finish()` returns, so this waits up to `wait_s` for the
    run's exit record.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for raw in _records(Path(run_file).read_bytes()):
            record = pb.Record()
            record.ParseFromString(raw)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            target = row
            for part in path[:-1]:  # media (histograms, tables, images) arrive as one item per field
                target = target.setdefault(part, {})
            target[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows
