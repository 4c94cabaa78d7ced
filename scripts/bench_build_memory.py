"""Host memory of building the model in a 2-process run, before and after the meta-device build, in one run.

Each arm starts a 2-process CPU fit (gloo) that stops once the model is set up (`limit_train_batches: 0`)
and records, per process: its RSS before the module is built, its peak RSS by the time the fit starts,
and the bytes of the model's tensors (parameters and buffers, whole). Arms: the code at `--before` (a git
revision, checked out into a temporary worktree: every process builds the whole model) against this
code (process 0 builds it, the others a meta skeleton that process 0 fills by broadcast), under FSDP2
(ModelParallelStrategy, 2 processes) and DDP, on the tiny model and on SmolLM2-135M-Instruct with a
random CLIP tower (fetched with `python -m lightning_tive fetch-smollm2`; DDP only: its tied embeddings keep
it off FSDP2), and on a wider random tiny LLaVA (~0.1 B parameters, so the model and not the process's own
~35 MB of overhead dominates; the default tiny model is 3 MB).

Figures are peak RSS growth over the process's RSS before the module was built, as multiples of the
model's bytes: in `__init__` (what the issue calls host RAM at start: every process built the whole
model; now only process 0 does, the others a meta skeleton), and once configure_model has placed the
weights, less what stays resident as the process's own shard or replica (on a CPU the "device" is host
memory; on a GPU it is not).

    python scripts/bench_build_memory.py                 # wide tiny and SmolLM2, FSDP2 and DDP, before and now
    python scripts/bench_build_memory.py --models tiny --strategies fsdp --before none   # a smoke run

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["BENCH_REPO"])

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def rss_mb():
    return status_mb("VmRSS")


def peak_mb():
    # VmHWM, not ru_maxrss: a process started by fork + exec inherits its parent's ru_maxrss
    return status_mb("VmHWM")

import lightning as L
import torch
from torch.utils.data import DataLoader
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_tive.model import LlavaModule, TinyLlavaConfig

out, model_name, strategy = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
before = rss_mb()
if model_name == "tiny":
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="full")
elif model_name == "wide":  # ~0.1 B parameters: the model, not the process's overhead, dominates
    module = LlavaModule(tiny=TinyLlavaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                              num_attention_heads=12), finetune="full")
else:
    module = LlavaModule(language_model=os.environ["BENCH_SMOLLM2"], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                         vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
                         finetune="full")
built = rss_mb()
built_peak = peak_mb()
configured = {}
_configure = type(module).configure_model


def configure_and_measure(self):
    _configure(self)
    configured["peak_mb"] = peak_mb()


type(module).configure_model = configure_and_measure


def whole_bytes(model):
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += t.numel() * t.element_size()  # a DTensor's numel is the whole tensor's
    return total


def local_bytes(model):
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


class Report(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        peak = peak_mb()
        record = {"rank": trainer.global_rank, "rss_before_mb": before, "rss_built_mb": built,
                  "built_peak_mb": built_peak, "configured_peak_mb": configured["peak_mb"], "peak_mb": peak,
                  "model_mb": whole_bytes(pl_module.model) / 2**20, "resident_mb": local_bytes(pl_module.model) / 2**20}
        (out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))


strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
            if strategy == "fsdp" else "ddp")
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=[Report()], limit_train_batches=0,
                    limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(module, train_dataloaders=DataLoader([]))
'''


def run_arm(repo: Path, model: str, strategy: str, work: Path, smollm2: str | None) -> list[dict]:
    """Both processes' records of one 2-process build."""
    work.mkdir(parents=True, exist_ok=True)
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "BENCH_REPO": str(repo), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(repo), "BENCH_SMOLLM2": smollm2 or ""}
    done = subprocess.run([sys.executable, str(driver), str(work), model, strategy], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{repo} {model} {strategy}:\n{done.stderr[-3000:]}")
    return [json.loads((work / f"rank-{r}.json").read_text()) for r in (0, 1)]


def summarise(records: list[dict]) -> dict:
    """Per process, in model bytes: the build's peak in `__init__` (host memory at start: the whole model
    or a skeleton), the peak once configure_model has placed the weights (less what stays resident as
    this process's shard or replica: the build's transient), and the peak at the fit's start (the
    strategy's own buffers added, e.g. DDP's gradient buckets)."""
    out = {}
    for r in records:
        model, base, resident = r["model_mb"], r["rss_before_mb"], r["resident_mb"]
        out[f"rank{r['rank']}"] = {
            "model_mb": round(model, 1),
            "init_peak_over_model": round((r["built_peak_mb"] - base) / model, 3),
            "resident_over_model": round(resident / model, 3),
            "configure_transient_over_model": round((r["configured_peak_mb"] - base - resident) / model, 3),
            "fit_start_peak_over_model": round((r["peak_mb"] - base) / model, 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the arms; print a table and a JSON summary line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="88c9845", help="git revision before the meta build; `none` skips it")
    parser.add_argument("--models", nargs="+", default=["wide", "smollm2"], choices=["tiny", "wide", "smollm2"])
    parser.add_argument("--strategies", nargs="+", default=["fsdp", "ddp"], choices=["fsdp", "ddp"])
    parser.add_argument("--work", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_build_"))
    smollm2 = None
    if "smollm2" in args.models:
        fetched = subprocess.run([sys.executable, "-m", "lightning_tive", "fetch-smollm2"], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
        smollm2 = str(Path(fetched.stdout.strip().splitlines()[-1]).parent)
    versions = {"now": ROOT}
    if args.before != "none":
        before = work / "before"
        if not before.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                           capture_output=True)
        versions = {"before": before, "now": ROOT}
    result: dict = {}
    try:
        for model in args.models:
            for strategy in args.strategies:
                if model == "smollm2" and strategy == "fsdp":
                    print("smollm2  fsdp : skipped (SmolLM2 ties lm_head to the embeddings; FSDP2 refuses it, DDP only)")
                    continue
                for name, repo in versions.items():
                    records = run_arm(repo, model, strategy, work / f"{name}-{model}-{strategy}", smollm2)
                    result[f"{model}/{strategy}/{name}"] = summarise(records)
                    for rank, row in result[f"{model}/{strategy}/{name}"].items():
                        print(f"{model:8s} {strategy:5s} {name:7s} {rank}: in __init__ {row['init_peak_over_model']:5.2f}, "
                              f"resident {row['resident_over_model']:4.2f}, configure transient "
                              f"{row['configure_transient_over_model']:5.2f}, at fit start "
                              f"{row['fit_start_peak_over_model']:5.2f} x the model ({row['model_mb']:.0f} MB)")
    finally:
        if args.before != "none":
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "before")], cwd=ROOT, capture_output=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
