"""The docs that restate code stay in step with it."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from lightning_tive.tive_config import TIVEConfig

ROOT = Path(__file__).resolve().parents[1]


def docstring_args(cls) -> dict[str, str]:
    """`name: text` entries of a Google-style `Args:` section, joined per entry."""
    out, current = {}, None
    for line in inspect.getdoc(cls).split("Args:", 1)[1].splitlines():
        match = re.match(r"\s{4}(\w+): (.*)", line)
        if match:
            current = match.group(1)
            out[current] = match.group(2)
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def test_tive_settings_table_is_tive_configs_docstring():
    table = {}
    for line in (ROOT / "docs" / "tive.md").read_text().splitlines():
        match = re.match(r"\| `(\w+)` \| ([^|]*) \| (.*) \|$", line)
        if match:
            table[match.group(1)] = match.group(3).replace("\\|", "|")
    fields = [f.name for f in dataclasses.fields(TIVEConfig)]
    documented = docstring_args(TIVEConfig)
    assert set(documented) == set(fields)  # every field has a docstring entry
    settings_rows = {name: text for name, text in table.items() if name in fields}
    assert set(settings_rows) == set(fields), sorted(set(fields) - set(settings_rows))
    assert all(settings_rows[name] == documented[name] for name in fields)
