"""scripts/gpu_check.py and what it needs: lightning_tive without the optional packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDING = Path(__file__).resolve().parent / "no_optional"
# Installed here, absent from the GPU machine's image.
OPTIONAL = "jsonargparse,wandb,bitsandbytes,gguf"
# Everything scripts/gpu_check.py imports from the package.
SCRIPT_IMPORTS = [
    "lightning_tive",
    "lightning_tive.model",
    "lightning_tive.callback",
    "lightning_tive.phases",
    "lightning_tive.tive_config",
    "lightning_tive.report",
    "lightning_tive.data.datamodule",
    "lightning_tive.data.demo",
    "lightning_tive.data.tokenizer",
    "lightning_tive.tive.grads",
    "lightning_tive.tive.modes",
    "lightning_tive.tive.projection",
]


def hidden_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment whose interpreters cannot import the optional packages (see tests/no_optional)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HIDING), str(ROOT)]),
        "LIGHTNING_TIVE_HIDE": OPTIONAL,
        "LIGHTNING_TIVE_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        **extra,
    }


def test_fallback_number_types_match_jsonargparse():
    jsonargparse_typing = pytest.importorskip("jsonargparse.typing")
    from lightning_tive import restricted_numbers as ours

    fraction = ours.restricted_number_type("Fraction", float, [(">", 0), ("<=", 1)])
    theirs_fraction = jsonargparse_typing.restricted_number_type("Fraction", float, [(">", 0), ("<=", 1)])
    cases = [
        (ours.PositiveInt, jsonargparse_typing.PositiveInt, [1, 3, 0, -2, 2.0, 2.5, True, "4", "x", None]),
        (ours.PositiveFloat, jsonargparse_typing.PositiveFloat, [1e-5, 3, 0, -0.1, False, "0.5", None]),
        (fraction, theirs_fraction, [0.15, 1, 1.0, 0, 1.01, -1, True]),
    ]
    for mine, theirs, values in cases:
        for value in values:
            try:
                expected = theirs(value)
            except (TypeError, ValueError):
                with pytest.raises((TypeError, ValueError)):
                    mine(value)
                continue
            got = mine(value)
            assert got == expected and isinstance(got, float) == isinstance(expected, float), (mine, value)


def test_hiding_works_and_script_imports_need_no_optional_package(tmp_path):
    code = f"""
import importlib, importlib.metadata, importlib.util, json
hidden = {OPTIONAL!r}.split(",")
out = {{"find_spec": [n for n in hidden if importlib.util.find_spec(n) is not None]}}
out["metadata"] = []
for n in hidden:
    try:
        importlib.metadata.version(n)
        out["metadata"].append(n)
    except importlib.metadata.PackageNotFoundError:
        pass
for module in {SCRIPT_IMPORTS!r}:
    importlib.import_module(module)
import yaml  # PyYAML is in the GPU image
from lightning_tive.tive_config import TIVEConfig
try:
    TIVEConfig(ratio=1.5)
    out["refused"] = False
except ValueError:
    out["refused"] = True
out["config"] = TIVEConfig(ratio=0.5, proj_dim=64).ratio
import sys
out["loaded"] = sorted(n for n in hidden if n in sys.modules)
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=hidden_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"find_spec": [], "metadata": [], "refused": True, "config": 0.5, "loaded": []}
