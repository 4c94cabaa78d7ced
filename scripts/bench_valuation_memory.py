"""Peak memory of TIVE valuation against a LoRA training step, on a LLaVA-7B-wide slice (CPU).

The model is built through :class:`lightning_tive.model.LlavaModule`'s ``tiny`` path with
vicuna-7b widths (hidden 4096, 32 heads, intermediate 11008, vocabulary 32000) but 2 decoder layers,
and a CLIP-L/336 vision tower (hidden 1024, 16 heads, intermediate 4096, patch 14, image 336: 576
image tokens) with 1 layer; random weights, cast to bf16, gradient checkpointing on (non-reentrant).
The main LoRA and the TIVE reference adapter are both r=128/alpha=256, dropout 0.05, on every linear
layer of the LM (LLaVA-1.5's LoRA recipe); features cover the attention LoRA layers only
(kronecker projector, ``proj_dim`` 8192). Batches: ``--batch`` examples of up to ``--tokens``
tokens (576 image tokens, the rest text; right-padded, a little shorter each), answers supervised.
Steps run with bf16 as the default dtype, as under Lightning's ``bf16-true`` precision.

Arms, each in its own subprocess (so one arm's allocator state cannot flatter another):

* ``train``: one LoRA training step as ``LlavaModule.training_step`` computes it (forward, token-mean
  loss from chunked lm_head + cross-entropy, backward into ``.grad``), in training mode;
* ``train_old``: the same with the previous loss (fp32 ``[B, T, V]`` logits, ``per_example_nll``);
* ``value``: one valuation batch as the callback runs it: ``per_example_grads`` with
  ``LlavaModule.per_example_loss`` under ``deterministic_train_mode(module)``;
* ``value_old``: the previous valuation: ``eval()`` (no checkpointing) and the full-logits loss.
  (The engine's change of how it holds layer inputs only matters under checkpointing, so this
  reproduces the previous behaviour's memory.)
* with ``--decompose`` also ``value_eval`` (eval mode, new loss) and ``value_oldloss`` (valuation
  mode, old loss), which split the gain between checkpointing and the loss, and
  ``train_nodropout`` (the training step with LoRA dropout off, as valuation runs: in training,
  each LoRA layer's dropout makes its own copy of the layer input, kept for backward).

Memory is the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
above the resident size right after setup (model, adapters, batch and projector built, one warm-up
arm run so one-time buffers are in the baseline); glibc is told to serve every large block by mmap,
so freed memory leaves the resident set at once. Prints a table and, last, one JSON line::

    python scripts/bench_valuation_memory.py            # T=1024, batch 4: ~7 min on 2 cores (11 with --decompose)
    python scripts/bench_valuation_memory.py --quick    # T=768, batch 2: ~2 min

Not a test: pytest does not run it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("train", "train_old", "value", "value_old")
DECOMPOSE = ("value_eval", "value_oldloss", "train_nodropout")
LM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMAGE_TOKENS = 576


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _trim() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _build(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    import torch

    from lightning_tive.model import LlavaModule, LoraSettings, TinyLlavaConfig
    from lightning_tive.tive.grads import layer_shapes
    from lightning_tive.tive.projection import build_projector

    tiny = TinyLlavaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_layers=1,
        vision_heads=16,
        image_size=336,
        patch_size=14,
        max_position_embeddings=4096,
        vocab_size=32000,
    )
    lora = LoraSettings(r=128, alpha=256, dropout=0.05, target_modules=list(LM_LINEARS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = LlavaModule(tiny=tiny, finetune="lora", lora=lora, gradient_checkpointing=True)
    out: dict[str, Any] = {"module": module}
    if arm.startswith("value"):
        layers = module.add_reference_adapter(lora, seed=0)
        attention = [(n, m) for n, m in layers if ".self_attn." in n]
        out["layers"] = attention
        out["projector"] = build_projector("kronecker", args.proj_dim, 0, layer_shapes(attention))
    module.to(torch.bfloat16)
    out["batch"] = _batch(module, args.batch, args.tokens)
    return out


def _batch(module: Any, batch: int, tokens: int) -> dict:
    import torch
    from gpu_check import make_batch  # scripts/ is on sys.path when a script runs

    out = make_batch(module, batch, tokens, IMAGE_TOKENS, 336)
    out["pixel_values"] = out["pixel_values"].to(torch.bfloat16)
    return out


def _old_per_example_loss(module: Any, batch: dict) -> Any:
    from lightning_tive.model import per_example_nll

    total, count = per_example_nll(module(batch).logits, batch["labels"])
    return total / count.clamp(min=1)


def _run_arm(arm: str, built: dict[str, Any]) -> float:
    import torch

    from lightning_tive.model import per_example_nll
    from lightning_tive.tive.grads import per_example_grads
    from lightning_tive.tive.modes import deterministic_train_mode

    module, batch = built["module"], built["batch"]
    if arm.startswith("train"):
        module.train()
        with deterministic_train_mode(module) if arm == "train_nodropout" else contextlib.nullcontext():
            if arm == "train_old":
                total, count = per_example_nll(module(batch).logits, batch["labels"])
            else:
                total, count = module.batch_nll(batch)
            loss = total.sum() / count.sum().clamp(min=1)
            loss.backward()
        for p in module.parameters():
            p.grad = None
        return float(loss)
    layers, projector = built["layers"], built["projector"]
    if arm in ("value", "value_oldloss"):
        loss_fn = module.per_example_loss if arm == "value" else (lambda b: _old_per_example_loss(module, b))
        with deterministic_train_mode(module):
            result = per_example_grads(layers, projector, loss_fn, batch)
    else:
        module.eval()
        loss_fn = module.per_example_loss if arm == "value_eval" else (lambda b: _old_per_example_loss(module, b))
        result = per_example_grads(layers, projector, loss_fn, batch)
    assert result.features.dtype == torch.float32 and bool(result.finite.all())
    return float(result.norms.mean())


def child(args: argparse.Namespace) -> None:
    """Build, warm up, then measure one arm; print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    clock = time.perf_counter()
    built = _build(args, args.arm)
    setup_s = time.perf_counter() - clock
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as Lightning's bf16-true precision does
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not args.no_warmup:
                _run_arm(args.arm, built)  # one-time buffers (kernels, thread pools, projector) go to the baseline
            _trim()
            baseline = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            clock = time.perf_counter()
            value = _run_arm(args.arm, built)
            step_s = time.perf_counter() - clock
            peak = _status_kib("VmHWM")
    finally:
        torch.set_default_dtype(before)
    print(
        json.dumps(
            {
                "arm": args.arm,
                "peak_above_baseline_mib": round((peak - baseline) / 1024, 1),
                "baseline_mib": round(baseline / 1024, 1),
                "step_s": round(step_s, 2),
                "setup_s": round(setup_s, 1),
                "value": value,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=768, batch 2 (~2 min)")
    parser.add_argument("--tokens", type=int, default=None, help="padded length T (default 1024; quick 768)")
    parser.add_argument("--batch", type=int, default=None, help="examples per batch (default 4; quick 2)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the LM slice")
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--decompose", action="store_true", help=f"also run {', '.join(DECOMPOSE)}")
    parser.add_argument("--no-warmup", action="store_true", help="measure the first run of each arm")
    parser.add_argument("--arm", choices=ARMS + DECOMPOSE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens = args.tokens or (768 if args.quick else 1024)
    args.batch = args.batch or (2 if args.quick else 4)
    if args.tokens < IMAGE_TOKENS + 64 + 24 * args.batch:
        parser.error(f"--tokens must leave room for {IMAGE_TOKENS} image tokens and some text")
    if args.arm:
        child(args)
        return

    # 0.7 B bf16 parameters, a fp32 copy while building, and at most a few GiB of activations.
    need = 4.5 + 1.5 * args.batch * args.tokens / 1024 * args.layers / 2
    available = _mem_available_gib()
    if available < need:
        sys.exit(f"needs about {need:.1f} GiB of available memory, {available:.1f} GiB is available")
    arms = ARMS + (DECOMPOSE if args.decompose else ())
    env = {
        **os.environ,
        # Large blocks straight from mmap, returned on free: RSS follows live tensors, not heap history.
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    results = {}
    clock = time.perf_counter()
    for arm in arms:
        command = [sys.executable, __file__, "--arm", arm, "--tokens", str(args.tokens), "--batch", str(args.batch),
                   "--layers", str(args.layers), "--proj-dim", str(args.proj_dim), "--threads", str(args.threads)]
        if args.no_warmup:
            command.append("--no-warmup")
        proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            sys.exit(f"arm {arm} failed with exit code {proc.returncode}")
        results[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[arm]
        print(
            f"{arm:>14}: peak {r['peak_above_baseline_mib']:8.1f} MiB above a {r['baseline_mib']:7.1f} MiB baseline"
            f"  (step {r['step_s']:.1f}s, setup {r['setup_s']:.0f}s; {'loss' if arm.startswith('train') else 'mean norm'}"
            f" {r['value']:.6g})",
            flush=True,
        )
    peak = {arm: results[arm]["peak_above_baseline_mib"] for arm in arms}
    summary = {
        "valuation_vs_training": round(peak["value"] / peak["train"], 3),
        "old_valuation_vs_training": round(peak["value_old"] / peak["train"], 3),
        "old_valuation_vs_old_training": round(peak["value_old"] / peak["train_old"], 3),
        "valuation_saving": round(peak["value_old"] / peak["value"], 2),
        **(
            {"valuation_vs_training_without_dropout": round(peak["value"] / peak["train_nodropout"], 3)}
            if "train_nodropout" in peak
            else {}
        ),
        "peak_above_baseline_mib": peak,
        "step_s": {arm: results[arm]["step_s"] for arm in arms},
        # The arms compute the same numbers: training losses, and valuation mean norms (bf16 model).
        "checks": {arm: results[arm]["value"] for arm in arms},
        "meta": {
            "tokens": args.tokens,
            "batch": args.batch,
            "image_tokens": IMAGE_TOKENS,
            "lm": f"{args.layers} x (hidden 4096, 32 heads, intermediate 11008), vocab 32000",
            "vision": "1 x (hidden 1024, 16 heads, intermediate 4096), patch 14, image 336",
            "lora": "r=128 alpha=256 dropout 0.05 on q,k,v,o,gate,up,down; features over q,k,v,o",
            "projector": f"kronecker {args.proj_dim}",
            "dtype": "bfloat16 weights and default dtype",
            "gradient_checkpointing": "non-reentrant",
            "threads": args.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "wall_s": round(time.perf_counter() - clock, 1),
        },
    }
    print(
        f"valuation / training: {summary['valuation_vs_training']} (target <= 1.2); "
        f"before: eval + full-logits loss / training {summary['old_valuation_vs_training']}, "
        f"/ training with the old loss {summary['old_valuation_vs_old_training']}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
