"""scripts/gpu_check.py and what it needs: lightning_tive without the optional packages."""

from __future__ import annotations

import ast
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
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# Installed here, absent from the GPU machine's image.
OPTIONAL = "jsonargparse,wandb,bitsandbytes,gguf,matplotlib"
# Everything scripts/gpu_check.py imports from the package (checked against the script below), and what
# its smoke runs load on the way (the report, the demo tokenizer).
SCRIPT_IMPORTS = [
    "lightning_tive",
    "lightning_tive.model",
    "lightning_tive.model.adapters",
    "lightning_tive.callback",
    "lightning_tive.phases",
    "lightning_tive.reference_adapter",
    "lightning_tive.sharding",
    "lightning_tive.distributed",
    "lightning_tive.tive_config",
    "lightning_tive.report",
    "lightning_tive.data.datamodule",
    "lightning_tive.data.demo",
    "lightning_tive.data.tokenizer",
    "lightning_tive.tive.grads",
    "lightning_tive.tive.modes",
    "lightning_tive.tive.projection",
]
# LLaVA-1.5-7B's parameters as docs/scaling.md counts them (vocabulary 32,001), and the LoRA r=128 on
# every linear layer of the LM.
LLAVA7B_PARAMS = {"language_model": 6_607_347_712, "lm_head": 131_076_096, "vision_tower": 303_507_456,
                  "projector": 20_979_712, "lora": 319_815_680}


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


def test_the_import_list_covers_every_package_import_of_the_script():
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0] == "lightning_tive"}
    assert ours and ours <= set(SCRIPT_IMPORTS), sorted(ours - set(SCRIPT_IMPORTS))
    assert not {name.split(".")[0] for name in imported} & set(OPTIONAL.split(","))


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


def run_script(tmp_path: Path, *args: str, timeout: int = 600, first_on_path: Path | None = None
               ) -> tuple[subprocess.CompletedProcess, dict]:
    """scripts/gpu_check.py in a subprocess without the optional packages; its JSON line and its --out file.

    As on the GPU machine, LIGHTNING_TIVE_CACHE is unset: the script keeps its cache in its work folder.
    `first_on_path` goes first on PYTHONPATH (e.g. distribution metadata that shadows an installed one).
    """
    out = tmp_path / "gpu_check.json"
    env = hidden_env(tmp_path, HOME=str(tmp_path / "home"))
    del env["LIGHTNING_TIVE_CACHE"]
    if first_on_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(first_on_path), env["PYTHONPATH"]])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    assert not (tmp_path / "home" / ".cache" / "lightning_tive").exists()
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result and result["complete"] is True
    assert out.with_suffix(".log").exists() and sorted(p.name for p in out.parent.glob("gpu_check*")) == [
        "gpu_check.json", "gpu_check.log"]
    return proc, result


@pytest.mark.slow
def test_cpu_check_runs_every_part(tmp_path):
    proc, result = run_script(tmp_path, "--cpu", "--budget-s", "500")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["mode"] == "cpu" and result["ok"] is True
    check = result["version_check"]
    assert check["passed"] is True and check["error"] is None and "parts_run_with" not in check
    assert check["required"]["torch"]["installed"] == result["versions"]["torch"]
    for name in ("torch", "lightning", "transformers", "peft", "torchmetrics", "pyyaml", "pillow", "tokenizers"):
        assert result["versions"][name], name
    assert all(result["versions"][name] is None for name in OPTIONAL.split(","))  # hidden, as on the image
    assert not any(result["env"]["optional_importable"].values())
    assert set(result["env"]["optional_importable"]) == set(OPTIONAL.split(","))
    for name, version in result["env"]["imported"].items():
        assert not version.startswith("missing"), name
    parts = result["parts"]
    assert list(parts) == ["full7b", "smoke_ddp", "smoke_sharded", "smoke_sharded_bf16", "smoke_ddp_bf16", "slice"]
    assert not any("version_check_skipped" in record for record in parts.values())
    assert Path(result["cache"]).parent == Path(result["work_dir"]) and not Path(result["work_dir"]).exists()

    f = parts["full7b"]
    assert f["status"] == "ok" and "errors" not in f and "skipped" not in f, f
    settings = f["settings"]
    assert settings["tokens"] == [64, 128] and settings["image_tokens"] == 16 and settings["device"] == "cpu"
    # read from configs/llava15_7b.yaml + llava15_7b_lora.yaml
    assert settings["train_batches"] == [16, 8, 4] and settings["value_batches"] == [8, 4]
    assert settings["gradient_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and settings["projector"] == "kronecker"
    assert settings["clip_norm"] == 1.0 and settings["projector_lr"] == 2e-5
    assert f["build"]["dtypes"] == {"language_model": ["bfloat16"], "lm_head": ["bfloat16"], "vision_tower": ["bfloat16"],
                                    "lora": ["float32"], "projector": ["float32"]}
    assert f["adapter"]["dtypes"] == ["float32"] and f["adapter"]["feature_layers"] == 3 * 4 * 2  # 3 layers, q/k/v/o, A/B
    for tokens in ("64", "128"):
        value, train, batch1 = f["valuation"][tokens], f["training"][tokens], f["batch1"][tokens]
        assert value["batch"] == 8 and value["out_of_memory_at"] == [] and value["finite"] is True, value
        assert value["s_per_example"] > 0 and value["s_per_batch"] > 0
        assert train["batch"] == 16 and train["out_of_memory_at"] == [] and train["s_per_example"] > 0, train
        assert batch1["trainable_gradients_mib"] > 0 and batch1["seconds"] > 0

    for name, strategy, precision, checkpoint in (
        ("smoke_ddp", "DDPStrategy", "32-true", "file"),
        ("smoke_sharded", "FSDP2Strategy", "32-true", "folder of"),
        ("smoke_sharded_bf16", "FSDP2Strategy", "bf16-mixed", "folder of"),
        ("smoke_ddp_bf16", "DDPStrategy", "bf16-true", "file"),
    ):
        b = parts[name]
        assert b["status"] == "ok" and b["ran"] is True, b
        assert b["strategy"] == strategy and b["precision"] == precision and b["process_group"] == "gloo", name
        assert b["budget"] == round(0.15 * b["pool_size"]) and b["selected"] == b["budget"], name
        assert b["global_step"] > 0 and b["logger"] == "CSVLogger", name
        assert set(b["metrics"]) >= {"train/loss", "val/loss"}, name
        for phase in ("warmup_s", "valuation_s", "selection_s", "training_s", "fit_s"):
            assert b["phases_s"][phase] >= 0, (name, phase)
        assert b["forced_collectives"] is True and b["collectives"].get("all_reduce:cpu", 0) > 0, name
        # without matplotlib the report skips its plot and writes the rest
        assert "summary.json" in b["outputs"] and b["report_png"] is False, name
        assert b["checkpoints"]["last.ckpt"].startswith(checkpoint), (name, b["checkpoints"])
    assert parts["smoke_ddp_bf16"]["budget"] == parts["smoke_ddp"]["budget"]

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


@pytest.mark.slow
def test_too_old_versions_are_recorded_and_the_parts_run_with_the_check_skipped(tmp_path):
    # An image whose torch is older than lightning_tive accepts: its metadata says 2.10.0.
    old = tmp_path / "old_image"
    (old / "torch-2.10.0.dist-info").mkdir(parents=True)
    (old / "torch-2.10.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n")
    proc, result = run_script(tmp_path, "--cpu", "--parts", "full7b", "--budget-s", "300", first_on_path=old)
    assert proc.returncode == 0, proc.stdout[-3000:]
    check = result["version_check"]
    assert check["passed"] is False and check["required"]["torch"]["installed"] == "2.10.0"
    assert "torch 2.10.0 is installed" in check["error"]
    assert check["parts_run_with"] == "LIGHTNING_TIVE_SKIP_VERSION_CHECK=1"
    assert result["versions"]["torch"] == "2.10.0"
    full7b = result["parts"]["full7b"]
    assert full7b["status"] == "ok" and full7b["version_check_skipped"] is True, full7b
    assert full7b["valuation"]["64"]["finite"] is True
    assert result["ok"] is False  # the image cannot import lightning_tive as it is


@pytest.mark.slow
def test_the_7b_settings_and_skeleton_match_the_configs_and_docs():
    gpu_check = load_script()
    settings = gpu_check.full7b_settings(cpu=False)
    assert settings["precision"] == "bf16-mixed" and settings["tokens"] == (1024, 2048)
    assert settings["train_batches"] == [16, 8, 4] and settings["value_batches"] == [8, 4]
    assert (settings["lora"].r, settings["lora"].alpha) == (128, 256) and len(settings["lora"].target_modules) == 7
    tive = settings["tive"]
    assert (tive.reference_lora.r, tive.proj_dim, tive.projector) == (128, 8192, "kronecker")
    module = gpu_check.skeleton_module(settings["tiny"], settings["lora"])
    llava = module.llava
    assert all(p.is_meta for p in llava.parameters())
    assert int(llava.config.image_seq_length) == 576 and llava.config.get_text_config().num_hidden_layers == 32
    counts = gpu_check.parameter_counts(llava)
    assert {k: v for k, v in counts.items() if k != "total"} == LLAVA7B_PARAMS


def test_budget_is_enforced_before_each_part(tmp_path):
    proc, result = run_script(tmp_path, "--cpu", "--budget-s", "3", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["ok"] is False
    for name, record in result["parts"].items():
        assert record["status"] == "skipped", name
        assert "budget" in record["note"], name


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
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
    updates = []
    record = gpu_check.run_command([sys.executable, "-c", child], dict(os.environ), 3, None, "test",
                                   lambda update: updates.append(json.dumps(update)))
    assert time.perf_counter() - start < 30
    assert record["status"] == "timeout" and "budget" in record["note"]
    assert record["training"] == {"ex_s": 1.5}
    assert [json.loads(u) for u in updates] == [{"training": {"ex_s": 1.5}}]  # the parent saves it as it comes


def test_a_failing_part_reports_its_error_and_merges_notes():
    gpu_check = load_script()
    child = (
        "import json\n"
        f"print({gpu_check.MARK!r} + json.dumps({{'errors': {{'a': 'x'}}}}), flush=True)\n"
        f"print({gpu_check.MARK!r} + json.dumps({{'errors': {{'b': 'y'}}, 'skipped': {{'c': 'z'}}}}), flush=True)\n"
        f"print({gpu_check.MARK!r} + json.dumps({{'valuation': {{'1024': {{'batch': 8}}}}}}), flush=True)\n"
        f"print({gpu_check.MARK!r} + json.dumps({{'valuation': {{'2048': {{'batch': 4}}}}}}), flush=True)\n"
        "raise SystemExit('boom')\n"
    )
    record = gpu_check.run_command([sys.executable, "-c", child], dict(os.environ), 60, None, "test")
    assert record["status"] == "error" and "boom" in record["error"]
    assert record["errors"] == {"a": "x", "b": "y"} and record["skipped"] == {"c": "z"}
    assert record["valuation"] == {"1024": {"batch": 8}, "2048": {"batch": 4}}  # each length reports apart


def test_the_largest_batch_that_fits_is_taken_and_the_refused_ones_recorded():
    import torch

    gpu_check = load_script()
    tried = []

    def attempt(size: int) -> dict:
        tried.append(size)
        if size > 8:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {size}")
        return {"s_per_example": 0.5}

    assert gpu_check.largest_that_fits([16, 8, 4], attempt) == {"batch": 8, "out_of_memory_at": [16], "s_per_example": 0.5}
    assert tried == [16, 8]

    def cublas(size: int) -> dict:
        if size > 4:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return {}

    assert gpu_check.largest_that_fits([8, 4], cublas) == {"batch": 4, "out_of_memory_at": [8]}
    with pytest.raises(torch.cuda.OutOfMemoryError, match="every batch size"):
        gpu_check.largest_that_fits([16, 12], attempt)

    def broken(size: int) -> dict:
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):  # any other failure is not a reason to shrink the batch
        gpu_check.largest_that_fits([16, 8], broken)
