"""scripts/gpu_check.py and what it needs: lightning_tive without the optional packages."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
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


def run_script(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    """scripts/gpu_check.py in a subprocess without the optional packages; its JSON line and its --out file.

    As on the GPU machine, LIGHTNING_TIVE_CACHE is unset: the script keeps its cache in its work folder.
    """
    out = tmp_path / "gpu_check.json"
    env = hidden_env(tmp_path, HOME=str(tmp_path / "home"))
    del env["LIGHTNING_TIVE_CACHE"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out), *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    assert not (tmp_path / "home" / ".cache" / "lightning_tive").exists()
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".log").exists()
    return proc, result


@pytest.mark.slow
def test_cpu_check_runs_every_part(tmp_path):
    proc, result = run_script(tmp_path, "--cpu", "--budget-s", "500")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["mode"] == "cpu" and result["ok"] is True
    assert not any(result["env"]["optional_importable"].values())
    for name in ("torch", "lightning", "transformers", "peft", "torchmetrics", "yaml", "PIL", "tokenizers"):
        assert not str(result["env"][name]).startswith("missing"), name
    parts = result["parts"]
    assert list(parts) == ["slice", "smoke_ddp", "smoke_sharded", "smoke_ddp_bf16"]
    assert Path(result["cache"]).parent == Path(result["work_dir"]) and not Path(result["work_dir"]).exists()

    a = parts["slice"]
    assert a["status"] == "ok" and "errors" not in a and "skipped" not in a, a
    for key in ("training", "valuation", "naive", "rademacher"):
        assert a[key]["ex_s"] > 0, key
    assert a["valuation"]["finite"] is True
    assert a["valuation_vs_training"] == round(a["valuation"]["ex_s"] / a["training"]["ex_s"], 3)
    assert a["batched_vs_naive"] == round(a["valuation"]["ex_s"] / a["naive"]["ex_s"], 3)
    # bf16 model: the batched engine and the batch-of-one loop agree to bf16 rounding
    assert a["check_max_rel_diff"]["features"] < 0.1 and a["check_max_rel_diff"]["norms"] < 0.05
    assert set(a["estimate_projection_cost"]["slice"]) == {"kronecker", "rademacher"}
    assert a["settings"]["image_tokens"] == 16 and a["settings"]["device"] == "cpu"

    b = parts["smoke_ddp"]
    assert b["status"] == "ok" and b["ran"] is True, b
    assert b["strategy"] == "DDPStrategy" and b["process_group"] == "gloo"
    assert b["budget"] == round(0.15 * b["pool_size"]) and b["selected"] == b["budget"]
    assert b["global_step"] > 0 and b["logger"] == "CSVLogger"
    assert set(b["metrics"]) >= {"train/loss", "val/loss"}
    for phase in ("warmup_s", "valuation_s", "selection_s", "training_s", "fit_s"):
        assert b["phases_s"][phase] >= 0, phase
    assert b["forced_collectives"] is True and b["collectives"].get("all_reduce:cpu", 0) > 0
    assert "summary.json" in b["outputs"]

    bf16 = parts["smoke_ddp_bf16"]
    assert bf16["status"] == "ok" and bf16["precision"] == "bf16-true" and bf16["budget"] == b["budget"], bf16

    c = parts["smoke_sharded"]
    assert c["strategy"] == "ModelParallelStrategy"
    assert c["status"] in ("ok", "refused"), c
    if c["status"] == "refused":
        assert c["ran"] is False and c["error"]


def test_budget_is_enforced_before_each_part(tmp_path):
    proc, result = run_script(tmp_path, "--cpu", "--budget-s", "3", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["ok"] is False
    for name, record in result["parts"].items():
        assert record["status"] == "skipped", name
        assert "budget" in record["note"], name


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_part_past_the_budget_is_killed_and_keeps_what_it_reported():
    gpu_check = load_script()
    child = (
        "import json, subprocess, sys, time\n"
        f"print({gpu_check.MARK!r} + json.dumps({{'training': {{'ex_s': 1.5}}}}), flush=True)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"  # a grandchild, killed too
        "time.sleep(60)\n"
    )
    start = time.perf_counter()
    record = gpu_check.run_command([sys.executable, "-c", child], dict(os.environ), 3, None, "test")
    assert time.perf_counter() - start < 30
    assert record["status"] == "timeout" and "budget" in record["note"]
    assert record["training"] == {"ex_s": 1.5}


def test_a_failing_part_reports_its_error_and_merges_notes():
    gpu_check = load_script()
    child = (
        "import json\n"
        f"print({gpu_check.MARK!r} + json.dumps({{'errors': {{'a': 'x'}}}}), flush=True)\n"
        f"print({gpu_check.MARK!r} + json.dumps({{'errors': {{'b': 'y'}}, 'skipped': {{'c': 'z'}}}}), flush=True)\n"
        "raise SystemExit('boom')\n"
    )
    record = gpu_check.run_command([sys.executable, "-c", child], dict(os.environ), 60, None, "test")
    assert record["status"] == "error" and "boom" in record["error"]
    assert record["errors"] == {"a": "x", "b": "y"} and record["skipped"] == {"c": "z"}
