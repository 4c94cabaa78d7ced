"""Everything worth checking on a lent GPU, in one call of at most 8 minutes; prints one JSON line last.

On the device machine (one NVIDIA H100 or H200; its image may lack jsonargparse, wandb, bitsandbytes,
gguf and matplotlib, and reaches no package index), from the repository root::

    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT/gpu_check.json --budget-s 450

(give the device call ``timeout_s`` 540: the budget, the start-up and a margin; at most 600).
``$OUT/gpu_check.json`` holds the JSON, rewritten as results arrive (``"complete": false`` until the
end, so a call killed from outside still returns what was measured), and ``$OUT/gpu_check.log``
every part's own output. Here, on CPU, the same parts shrunk (what ``tests/test_gpu_check.py`` runs)::

    python scripts/gpu_check.py --cpu

First, before anything imports lightning_tive, the image's versions (installed distributions, read
from their metadata) and lightning_tive's own version check (``lightning_tive/versions.py``, run from
its file); where that check fails, every part runs with ``LIGHTNING_TIVE_SKIP_VERSION_CHECK=1`` and
the result says so. Then the parts, most valuable first, each in its own subprocess (so a crash, a
CUDA error or an initialised process group in one cannot touch the next), each timed, each recorded
with its status and error text:

* ``full7b``: a full-depth LLaVA-1.5-7B-config model (vicuna-7b: 32 layers of width 4096; CLIP-L/14-336:
  24 layers; 576 image tokens) built on the meta device, as a later process of a run builds it, and
  materialised on the GPU in bf16 with random weights; the 7B LoRA config (``configs/llava15_7b.yaml`` +
  ``configs/llava15_7b_lora.yaml``) under ``bf16-mixed``. At T = 1,024 and 2,048 tokens: TIVE's
  valuation (``per_example_grads``, kronecker projector to 8192 dims over the attention LoRA of the
  r=128 reference adapter, batch 8, else 4) in s/example and peak memory; one LoRA training step
  (AdamW, batch 16, else 8, else 4) in s/example and peak memory; and the memory of a forward and
  backward at batch 1;
* ``smoke_ddp``: the smoke select-then-train (``configs/demo.yaml`` + ``configs/smoke.yaml``) through
  Lightning directly (the CLI needs jsonargparse), on ``accelerator: cuda``, ``strategy: ddp``,
  ``devices: 1``: NCCL, with TIVE's collectives forced to run on the one-process group (they are
  skipped with one process otherwise), so a CPU tensor sent to one would fail here;
* ``smoke_sharded``: the same under ``lightning_tive.sharding.FSDP2Strategy`` (FSDP2, one process,
  NCCL; checkpoints as folders of shards);
* ``smoke_sharded_bf16``: ``smoke_sharded`` under ``precision: bf16-mixed``, the 7B config's;
* ``smoke_ddp_bf16``: ``smoke_ddp`` under ``precision: bf16-true``;
* ``slice``: the LLaVA-7B-width slice of ``scripts/bench_valuation_memory.py`` (2 decoder layers, 1
  CLIP layer, T = 1,024, batch 4, bf16-true): training and valuation throughput and memory, the
  batched per-example features against a batch-of-one loop, one batch of the dense rademacher
  projector, and ``estimate_projection_cost`` on the device for the slice's and the full 7B adapter.

``--budget-s`` is enforced: a part starts only if the budget left covers its usual cost
(``MIN_PART_S``); it may run until the budget left minus the usual cost of the parts after it, and is
killed then (what it reported so far is kept; its later steps skip themselves first). Each skip or
kill is noted in the JSON. ``docs/benchmarks.md`` § GPU check explains every field.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("full7b", "smoke_ddp", "smoke_sharded", "smoke_sharded_bf16", "smoke_ddp_bf16", "slice")
SHARDED_PARTS = ("smoke_sharded", "smoke_sharded_bf16")
MARK = "@@ "  # a child's result lines: MARK + a JSON object merged into its part's record
# Packages the script must do without (the GPU image lacks them); recorded as importable or not.
OPTIONAL = ("jsonargparse", "wandb", "bitsandbytes", "gguf", "matplotlib")
# Installed distributions, read from their metadata (nothing imported): None where not installed.
DISTRIBUTIONS = (
    "torch", "lightning", "pytorch-lightning", "lightning-utilities", "transformers", "peft", "torchmetrics",
    "tokenizers", "safetensors", "huggingface-hub", "accelerate", "numpy", "pillow", "pyyaml", "tqdm", "triton",
    "matplotlib", "jsonargparse", "wandb", "bitsandbytes", "gguf",
)
# Modules the parts import, with the version each reports once imported.
IMPORTED = ("torch", "lightning", "transformers", "peft", "torchmetrics", "tokenizers", "PIL", "numpy", "yaml",
            "safetensors")
SKIP_VERSION_CHECK = "LIGHTNING_TIVE_SKIP_VERSION_CHECK"  # lightning_tive.versions.SKIP_ENV, read without importing it
# Seconds a part usually needs (GPU: an estimate for one H100; CPU: 2 busy cores): skipped with less budget left.
MIN_PART_S = {
    "gpu": {"full7b": 150, "smoke_ddp": 50, "smoke_sharded": 40, "smoke_sharded_bf16": 40, "smoke_ddp_bf16": 40,
            "slice": 60},
    "cpu": {"full7b": 15, "smoke_ddp": 20, "smoke_sharded": 10, "smoke_sharded_bf16": 10, "smoke_ddp_bf16": 10,
            "slice": 15},
}
RESERVE_S = 5  # kept back for writing the result
LM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LLaVA-1.5-7B's widths: vicuna-7b (vocabulary 32,000 + <image>) and CLIP ViT-L/14-336 (576 image tokens).
LLAVA7B_WIDTHS = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vision_hidden_size=1024,
                      vision_intermediate_size=4096, vision_heads=16, image_size=336, patch_size=14,
                      max_position_embeddings=4096, vocab_size=32001)
# CPU stand-in widths (16 image tokens; the vocabulary is the demo tokenizer's).
TINY_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vision_hidden_size=32,
                   vision_intermediate_size=64, vision_heads=2, image_size=32, patch_size=8,
                   max_position_embeddings=256, vocab_size=None)

# full7b: the 7B config's settings (read from these files), at these depths and lengths.
FULL7B_CONFIGS = ("configs/llava15_7b.yaml", "configs/llava15_7b_lora.yaml")
FULL7B = {
    "gpu": {"tiny": {**LLAVA7B_WIDTHS, "num_hidden_layers": 32, "vision_layers": 24}, "tokens": (1024, 2048),
            "timed_steps": 2, "step_s": {"valuation": 15, "training": 20, "batch1": 5}},
    "cpu": {"tiny": {**TINY_WIDTHS, "num_hidden_layers": 3, "vision_layers": 2}, "tokens": (64, 128),
            "timed_steps": 1, "step_s": {"valuation": 3, "training": 3, "batch1": 2},
            # the adapters and projection shrunk with the widths
            "lora_r": 8, "proj_dim": 256},
}
# slice: 2 LM layers and 1 CLIP layer at 7B widths, bf16-true, and a tiny CPU stand-in.
SLICE = {
    "gpu": {
        "tiny": {**LLAVA7B_WIDTHS, "num_hidden_layers": 2, "vision_layers": 1},
        "tokens": 1024, "batch": 4, "r": 128, "proj_dim": 8192, "train_steps": 5, "value_batches": 5,
        "naive_rounds": 2, "rademacher_batches": 2, "estimate_batch": 8,
    },
    "cpu": {
        "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     vision_hidden_size=64, vision_intermediate_size=128, vision_layers=1, vision_heads=4,
                     image_size=64, patch_size=16, max_position_embeddings=512, vocab_size=None),
        "tokens": 96, "batch": 4, "r": 16, "proj_dim": 512, "train_steps": 2, "value_batches": 2,
        "naive_rounds": 1, "rademacher_batches": 1, "estimate_batch": 4,
    },
}
SMOKE_CONFIGS = ("configs/demo.yaml", "configs/smoke.yaml")


# ============================================================================ shared helpers
def emit(record: dict) -> None:
    """Report part of a child's result to the parent (merged into the part's record)."""
    print(MARK + json.dumps(record, default=str), flush=True)


def error_text(err: BaseException) -> str:
    """The exception's type and message, and where it was raised (short)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {str(err)[:1500]}{where}"


def installed_versions() -> dict:
    """Every distribution of DISTRIBUTIONS with its installed version (None: not installed); imports nothing."""
    out: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def version_check() -> dict:
    """lightning_tive's import-time version check, run from its file so that the package is not imported.

    `passed` False means `import lightning_tive` raises on this image; the parts then run with the
    check skipped. A skip variable set by the caller is ignored here, so the verdict is the image's.
    """
    spec = importlib.util.spec_from_file_location("lightning_tive_versions", ROOT / "lightning_tive" / "versions.py")
    versions_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(versions_module)
    required = {name: {"requirement": requirement, "installed": versions_module.installed_version(name)}
                for name, (requirement, _, _) in versions_module.REQUIRED.items()}
    from_caller = os.environ.pop(versions_module.SKIP_ENV, None)
    try:
        versions_module.check_versions()
        passed, error = True, None
    except ImportError as err:
        passed, error = False, str(err)
    finally:
        if from_caller is not None:
            os.environ[versions_module.SKIP_ENV] = from_caller
    return {"passed": passed, "required": required, "error": error, "skip_set_by_caller": from_caller is not None}


def runtime() -> dict:
    """What the parts run on: the Python, the modules they import (their own versions), the device."""
    out: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    imported: dict[str, str] = {}
    for name in IMPORTED:
        try:
            imported[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - any failure to import is what we report
            imported[name] = f"missing ({type(err).__name__})"
    out["imported"] = imported
    out["optional_importable"] = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}
    import torch

    out["cuda_available"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   gpus=torch.cuda.device_count())
        with contextlib.suppress(Exception):
            nccl = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        with contextlib.suppress(Exception):
            out["cudnn"] = torch.backends.cudnn.version()
    return out


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Release what the last step left behind, so the next one's peak starts from the model alone."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Peak:
    """Peak allocated CUDA memory over a block, absolute and above what was allocated at its start."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.result: dict = {}

    def __enter__(self) -> Peak:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type != "cuda" or exc[0] is not None:
            return
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.result = {"peak_mib": mib(peak), "peak_above_start_mib": mib(peak - self.base),
                       "allocated_at_start_mib": mib(self.base)}


def mib(size: int) -> float:
    """Bytes in MiB, rounded for the report."""
    return round(size / 2**20, 1)


def timed(fn: Any, count: int, device: Any) -> float:
    """Seconds for `count` calls of `fn`, synchronised with the device."""
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        fn()
    sync(device)
    return time.perf_counter() - start


class BudgetSpent(Exception):
    """A step skipped because the part's share of the budget is nearly spent."""


def check_time(deadline: float, need_s: float, step: str) -> None:
    """Raise BudgetSpent unless `need_s` seconds are left before `deadline`."""
    if time.time() + need_s > deadline:
        raise BudgetSpent(f"{step} skipped: {max(deadline - time.time(), 0):.0f} s left, it needs ~{need_s:.0f} s")


def report_failure(step: str, err: BaseException) -> None:
    """A budget skip is a note; anything else is an error of the part."""
    emit({"skipped": {step: str(err)}} if isinstance(err, BudgetSpent) else {"errors": {step: error_text(err)}})


def largest_that_fits(sizes: Sequence[int], attempt: Callable[[int], dict]) -> dict:
    """`attempt(size)` for each batch size in turn until one runs without exhausting the device's memory.

    Returns its result with `batch` (the size that ran) and `out_of_memory_at` (the sizes that did not).
    """
    import torch

    out_of_memory: list[int] = []
    for size in sizes:
        try:
            return {"batch": size, "out_of_memory_at": out_of_memory, **attempt(size)}
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            out_of_memory.append(size)
        free_memory()  # after the except block, which held the failed attempt's frames and their tensors
    raise torch.cuda.OutOfMemoryError(f"out of memory at every batch size tried: {list(sizes)}")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the device running out of memory (the allocator's error, or cuBLAS failing to allocate)."""
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "CUBLAS_STATUS_ALLOC_FAILED" in str(err)


# ============================================================================ the model and its batches
def skeleton_module(tiny: dict, lora: Any, **module_args: Any) -> Any:
    """A LoRA `LlavaModule` whose LLaVA is built on the meta device, as a later process of a run builds it."""
    from lightning_tive.model import LlavaModule, TinyLlavaConfig

    class SkeletonLlavaModule(LlavaModule):
        """LlavaModule building only LLaVA's structure (`build_model(on_meta=True)`): no weight is drawn."""

        def build_model(self, on_meta: bool = False) -> None:
            super().build_model(on_meta=True)

    return SkeletonLlavaModule(tiny=TinyLlavaConfig(**tiny), tokenizer="demo", finetune="lora", lora=lora,
                               gradient_checkpointing=True, **module_args)


def build_module(tiny: dict, lora: Any, device: Any, mixed: bool, **module_args: Any) -> tuple[Any, dict]:
    """A LoRA `LlavaModule` built on the meta device and materialised on `device` with random bf16 weights.

    The build is the package's own (`skeleton_module`). The parameters are then cast to bf16 (buffers
    keep their dtype, as a checkpoint load leaves them) and allocated on `device`, and transformers'
    own initialisation draws them under seed 0 (each model's `_init_weights`: normal weights, unit
    norms, zero biases; CLIP's position ids and the rotary frequencies computed; LoRA's B drawn
    too, not zero, which changes no cost). `mixed`: as the 7B LoRA config under bf16-mixed, the LoRA
    weights and the projector stay float32 (the projector casts its input); otherwise everything is
    bf16, as under bf16-true.
    """
    import torch

    from lightning_tive.model.adapters import keep_projector_fp32
    from lightning_tive.tive.grads import find_lora_layers

    clock = time.perf_counter()
    module = skeleton_module(tiny, lora, **module_args)
    meta_s = time.perf_counter() - clock
    llava = module.llava
    cast_parameters(llava, torch.bfloat16)
    if mixed:
        keep_projector_fp32(llava.model.multi_modal_projector)
        for _, layer in find_lora_layers(module.model, "default"):
            layer.float()
    clock = time.perf_counter()
    module.model.to_empty(device=device)
    module.to(device)  # the LightningModule's own record of its device (to_empty does not update it)
    torch.manual_seed(0)
    llava.initialize_weights()
    sync(device)
    not_finite = [name for name, t in {**dict(llava.named_parameters()), **dict(llava.named_buffers())}.items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not_finite:
        raise RuntimeError(f"tensors not initialised after materialisation: {not_finite[:5]}")
    record = {"meta_build_s": round(meta_s, 2), "materialise_s": round(time.perf_counter() - clock, 2),
              "device": str(next(llava.parameters()).device), "params": parameter_counts(llava),
              "dtypes": parameter_dtypes(llava)}
    if device.type == "cuda":
        record["allocated_mib"] = mib(torch.cuda.memory_allocated(device))
    return module, record


def cast_parameters(model: Any, dtype: Any) -> None:
    """Cast every floating-point parameter to `dtype`; floating-point buffers keep their own dtype."""
    kept = {name: buffer.dtype for name, buffer in model.named_buffers()}
    model.to(dtype)
    for prefix, sub in model.named_modules():
        for key, buffer in sub._buffers.items():
            wanted = kept.get(f"{prefix}.{key}" if prefix else key)
            if buffer is not None and wanted is not None and buffer.dtype != wanted:
                sub._buffers[key] = buffer.to(wanted)


MODEL_PARTS = (("model.language_model.", "language_model"), ("lm_head.", "lm_head"),
               ("model.vision_tower.", "vision_tower"), ("model.multi_modal_projector.", "projector"))


def model_part(name: str) -> str:
    """Which part of LLaVA a parameter name belongs to (LoRA weights apart)."""
    if ".lora_" in name:
        return "lora"
    return next((part for prefix, part in MODEL_PARTS if name.startswith(prefix)), "other")


def parameter_counts(llava: Any) -> dict:
    """Parameters per part of LLaVA (each LoRA adapter under `lora`), and in all."""
    counts: dict[str, int] = {}
    for name, param in llava.named_parameters():
        counts[model_part(name)] = counts.get(model_part(name), 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts


def parameter_dtypes(llava: Any) -> dict:
    """The parameter dtypes of each part of LLaVA."""
    dtypes: dict[str, set] = {}
    for name, param in llava.named_parameters():
        dtypes.setdefault(model_part(name), set()).add(str(param.dtype).removeprefix("torch."))
    return {part: sorted(found) for part, found in dtypes.items()}


def make_batch(module: Any, batch: int, tokens: int) -> dict:
    """Right-padded examples of up to `tokens` tokens: the image, a question, then a supervised answer."""
    import torch

    config = module.llava.config
    image_id, image_tokens = config.image_token_index, int(config.image_seq_length)
    image_size = config.vision_config.image_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (batch, tokens), generator=gen)
    ids[ids == image_id] = 3
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    labels = torch.full((batch, tokens), -100)
    shrink = max(1, min(24, (tokens - image_tokens) // (4 * batch)))
    for i in range(batch):
        length = tokens - shrink * i  # a little shorter each
        text = length - 1 - image_tokens
        answer_start = 1 + image_tokens + text // 3
        ids[i, 0] = 1
        ids[i, 1 : 1 + image_tokens] = image_id
        ids[i, length:] = 0
        mask[i, :length] = 1
        labels[i, answer_start:length] = ids[i, answer_start:length]
    pixels = torch.randn(batch, 3, image_size, image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def device_batch(module: Any, batch: int, tokens: int, device: Any) -> dict:
    """`make_batch` on `device` (pixels are cast to the vision tower's dtype by the module itself)."""
    return {k: v.to(device) for k, v in make_batch(module, batch, tokens).items()}


def single(batch: dict, i: int) -> dict:
    """Example `i` of a batch alone, without its padding."""
    length = int(batch["attention_mask"][i].sum())
    out = {k: v[i : i + 1, :length] for k, v in batch.items() if k != "pixel_values"}
    out["pixel_values"] = batch["pixel_values"][i : i + 1]
    return out


def train_step_fn(module: Any, batch: dict, optimizer: Any, forward_context: Callable,
                  clip_norm: float | None = None) -> Callable[[], None]:
    """One optimizer step of the main fine-tune on `batch`, as `LlavaModule.training_step` computes its loss."""
    import torch

    params = [p for _, p in module.trainable_parameters()]

    def step() -> None:
        module.train()
        with forward_context():
            total, count = module.batch_nll(batch)
            loss = total.sum() / count.sum().clamp(min=1)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def value_fn(module: Any, layers: list, projector: Any, batch: dict, forward_context: Callable) -> Callable[[], Any]:
    """TIVE's valuation of one batch, as the callback runs it: per-example features and norms."""
    from lightning_tive.tive.grads import per_example_grads
    from lightning_tive.tive.modes import deterministic_train_mode

    def value() -> Any:
        with forward_context(), deterministic_train_mode(module):
            return per_example_grads(layers, projector, module.per_example_loss, batch)

    return value


def feature_layers(adapter: list, gradient_modules: Sequence[str]) -> list:
    """The reference adapter's layers whose gradients become features (`tive.gradient_modules`)."""
    from lightning_tive.reference_adapter import lora_module_of

    return [(name, layer) for name, layer in adapter if lora_module_of(name) in gradient_modules]


# ============================================================================ full7b: the 7B config at full depth
def full7b_settings(cpu: bool) -> dict:
    """The 7B LoRA config's settings (from FULL7B_CONFIGS), with the CPU stand-in's smaller adapters."""
    from lightning_tive.model import LoraSettings
    from lightning_tive.tive_config import TIVEConfig

    cfg = load_yaml_config([ROOT / p for p in FULL7B_CONFIGS])
    shape = FULL7B["cpu" if cpu else "gpu"]
    model, tive_cfg = cfg["model"], dict(cfg["tive"])
    lora = LoraSettings(**model["lora"])
    if cpu:
        r = shape["lora_r"]
        lora = LoraSettings(r=r, alpha=2 * r, dropout=lora.dropout, target_modules=list(lora.target_modules))
        tive_cfg.update(reference_lora={**tive_cfg["reference_lora"], "r": r, "alpha": 2 * r},
                        proj_dim=shape["proj_dim"])
    tive = TIVEConfig(**tive_cfg)
    per_device = int(cfg["data"]["batch_size"])
    value_batch = int(tive.valuation_batch_size)
    optimizer = model["optimizer"]
    return {
        **shape, "configs": list(FULL7B_CONFIGS), "precision": cfg["trainer"]["precision"], "lora": lora,
        "projector_lr": model.get("projector_lr"), "optimizer": (optimizer["class_path"], optimizer.get("init_args") or {}),
        "clip_norm": cfg["trainer"].get("gradient_clip_val"), "tive": tive,
        "train_batches": [b for b in (per_device, per_device // 2, per_device // 4) if b >= 1],
        "value_batches": [b for b in (value_batch, value_batch // 2) if b >= 1],
    }


def child_full7b(args: argparse.Namespace) -> None:
    """full7b: valuation and training of the 7B config at full depth, at two lengths, on one device."""
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_tive.tive.grads import layer_shapes
    from lightning_tive.tive.projection import build_projector

    s = full7b_settings(args.cpu)
    device = torch.device("cpu" if args.cpu else "cuda")
    tive, steps, step_s = s["tive"], s["timed_steps"], s["step_s"]
    if s["precision"] != "bf16-mixed":
        raise ValueError(f"{FULL7B_CONFIGS} train under {s['precision']}; this part measures bf16-mixed")
    forward_context = MixedPrecision("bf16-mixed", device.type).forward_context  # as the Trainer's plugin
    opt_cls, opt_args = class_from(s["optimizer"][0]), s["optimizer"][1]
    module, build = build_module(s["tiny"], s["lora"], device, mixed=True, projector_lr=s["projector_lr"],
                                 optimizer=functools.partial(opt_cls, **opt_args), lr_scheduler=None)
    emit({"settings": {
        "configs": s["configs"], "tiny": s["tiny"], "tokens": list(s["tokens"]),
        "image_tokens": int(module.llava.config.image_seq_length), "device": str(device),
        "precision": "bf16-mixed (autocast; bf16 base weights, float32 LoRA and projector)",
        "gradient_checkpointing": "non-reentrant", "lora": vars(s["lora"]), "optimizer": s["optimizer"],
        "projector_lr": s["projector_lr"], "clip_norm": s["clip_norm"], "train_batches": s["train_batches"],
        "value_batches": s["value_batches"], "timed_steps": steps,
        "reference_lora": vars(tive.reference_lora), "gradient_modules": tive.gradient_modules,
        "projector": tive.projector, "proj_dim": tive.proj_dim}, "build": build})

    # -------------------------------------------------------------- valuation, with the reference adapter added
    adapter = module.add_reference_adapter(tive.reference_lora, tive.seed)
    layers = feature_layers(adapter, tive.gradient_modules)
    projector = build_projector(tive.projector, tive.proj_dim, tive.seed, layer_shapes(layers))
    emit({"adapter": {"params": sum(layer.weight.numel() for _, layer in adapter),
                      "dtypes": sorted({str(layer.weight.dtype).removeprefix("torch.") for _, layer in adapter}),
                      "feature_layers": len(layers), "feature_dims": sum(o * i for o, i in layer_shapes(layers))}})

    def valuation(tokens: int, size: int) -> dict:
        run = value_fn(module, layers, projector, device_batch(module, size, tokens, device), forward_context)
        first = run()  # warm-up: kernels, the projector's factors; running out of memory shows here
        with Peak(device) as peak:
            seconds = timed(run, steps, device)
        return {"s_per_example": round(seconds / (steps * size), 4), "s_per_batch": round(seconds / steps, 3),
                "batches": steps, "finite": bool(first.finite.all()), **peak.result}

    for tokens in s["tokens"]:
        try:
            check_time(args.deadline, step_s["valuation"] * tokens / s["tokens"][0], f"valuation at T={tokens}")
            emit({"valuation": {str(tokens): largest_that_fits(s["value_batches"], functools.partial(valuation, tokens))}})
        except Exception as err:  # noqa: BLE001
            report_failure(f"valuation:{tokens}", err)
        free_memory()
    module.remove_reference_adapter()
    free_memory()

    # -------------------------------------------------------------- training: the LoRA fine-tune's step
    optimizer = module.configure_optimizers()
    gradients = sum(p.numel() * p.element_size() for _, p in module.trainable_parameters())

    def training(tokens: int, size: int) -> dict:
        step = train_step_fn(module, device_batch(module, size, tokens, device), optimizer, forward_context,
                             s["clip_norm"])
        try:
            step()  # warm-up: kernels, AdamW's state; running out of memory shows here
            with Peak(device) as peak:
                seconds = timed(step, steps, device)
        except BaseException:
            optimizer.zero_grad(set_to_none=True)
            raise
        return {"s_per_example": round(seconds / (steps * size), 4), "s_per_step": round(seconds / steps, 3),
                "steps": steps, **peak.result}

    def batch1(tokens: int) -> dict:
        """Forward and backward of one example: the activation memory of a step (and the LoRA gradients)."""
        batch = device_batch(module, 1, tokens, device)
        optimizer.zero_grad(set_to_none=True)
        clock = time.perf_counter()
        with Peak(device) as peak:
            module.train()
            with forward_context():
                total, count = module.batch_nll(batch)
            (total.sum() / count.sum().clamp(min=1)).backward()
        sync(device)
        optimizer.zero_grad(set_to_none=True)
        return {"seconds": round(time.perf_counter() - clock, 3), "trainable_gradients_mib": mib(gradients),
                **peak.result}

    for tokens in s["tokens"]:
        scale = tokens / s["tokens"][0]
        try:
            check_time(args.deadline, step_s["training"] * scale, f"training at T={tokens}")
            emit({"training": {str(tokens): largest_that_fits(s["train_batches"], functools.partial(training, tokens))}})
        except Exception as err:  # noqa: BLE001
            report_failure(f"training:{tokens}", err)
        free_memory()
        try:
            check_time(args.deadline, step_s["batch1"] * scale, f"batch-1 forward and backward at T={tokens}")
            emit({"batch1": {str(tokens): batch1(tokens)}})
        except Exception as err:  # noqa: BLE001
            report_failure(f"batch1:{tokens}", err)
        free_memory()


# ============================================================================ slice: 2 layers at 7B widths
def child_slice(args: argparse.Namespace) -> None:
    """slice: throughput and memory of training and valuation on the 7B-width slice, in bf16-true."""
    import torch

    from lightning_tive.model import LoraSettings
    from lightning_tive.tive.grads import layer_shapes
    from lightning_tive.tive.modes import deterministic_train_mode
    from lightning_tive.tive.projection import build_projector, estimate_projection_cost
    from lightning_tive.tive_config import ATTENTION_MODULES

    s = SLICE["cpu" if args.cpu else "gpu"]
    device = torch.device("cpu" if args.cpu else "cuda")
    clock = time.perf_counter()
    lora = LoraSettings(r=s["r"], alpha=2 * s["r"], dropout=0.05, target_modules=list(LM_LINEARS))
    module, build = build_module(s["tiny"], lora, device, mixed=False)
    batch = device_batch(module, s["batch"], s["tokens"], device)
    B = s["batch"]
    emit({"settings": {**{k: v for k, v in s.items() if k != "tiny"}, "tiny": s["tiny"],
                       "image_tokens": int(module.llava.config.image_seq_length), "dtype": "bfloat16",
                       "gradient_checkpointing": "non-reentrant", "device": str(device),
                       "lora": f"r={s['r']} alpha={2 * s['r']} dropout 0.05 on {','.join(LM_LINEARS)}",
                       "params": build["params"]["total"],
                       "supervised_tokens": (batch["labels"][:, 1:] != -100).sum(1).tolist()},
          "setup_s": round(time.perf_counter() - clock, 2)})
    torch.set_default_dtype(torch.bfloat16)  # as Lightning's bf16-true precision does

    # -------------------------------------------------------------- training step (LoRA, AdamW)
    params = [p for _, p in module.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    train_step = train_step_fn(module, batch, optimizer, contextlib.nullcontext)
    train: dict[str, Any] = {}
    try:
        train_step()  # warm-up: kernels, AdamW state
        with Peak(device) as peak:
            seconds = timed(train_step, s["train_steps"], device)
        train = {"ex_s": round(B * s["train_steps"] / seconds, 3), "s_per_step": round(seconds / s["train_steps"], 4),
                 "steps": s["train_steps"], **peak.result}
        emit({"training": train})
    except Exception as err:  # noqa: BLE001
        report_failure("training", err)
    optimizer.state.clear()
    for p in params:
        p.grad = None
    free_memory()

    # -------------------------------------------------------------- valuation (kronecker), as the callback runs it
    adapter = module.add_reference_adapter(lora, seed=0)
    for _, layer in adapter:
        layer.to(torch.bfloat16)  # peft makes a new adapter float32; here everything is bf16
    layers = feature_layers(adapter, ATTENTION_MODULES)
    shapes = layer_shapes(layers)
    kron = build_projector("kronecker", s["proj_dim"], 0, shapes)
    emit({"adapter": {"feature_layers": len(layers), "feature_dims": sum(o * i for o, i in shapes),
                      "proj_dim": s["proj_dim"]}})

    def value(projector: Any) -> Any:
        return value_fn(module, layers, projector, batch, contextlib.nullcontext)()

    batched, val = None, {}
    try:
        batched = value(kron)  # warm-up: kronecker factors, kernels
        with Peak(device) as peak:
            seconds = timed(lambda: value(kron), s["value_batches"], device)
        val = {"ex_s": round(B * s["value_batches"] / seconds, 3), "s_per_batch": round(seconds / s["value_batches"], 4),
               "batches": s["value_batches"], "finite": bool(batched.finite.all()), **peak.result}
        summary: dict[str, Any] = {"valuation": val}
        if train:
            summary["valuation_vs_training"] = round(val["ex_s"] / train["ex_s"], 3)
            if "peak_above_start_mib" in val and train.get("peak_above_start_mib"):
                summary["valuation_vs_training_memory"] = round(
                    val["peak_above_start_mib"] / train["peak_above_start_mib"], 3)
        emit(summary)
    except Exception as err:  # noqa: BLE001
        report_failure("valuation", err)

    # -------------------------------------------------------------- batch-of-one loop (scripts/bench_valuation.py's)
    try:
        check_time(args.deadline, 20 if args.cpu else 30, "batch-of-one loop")
        weights = [m.weight for _, m in layers]
        singles = [single(batch, i) for i in range(B)]
        feats, norms = [], []

        def loop() -> None:
            feats.clear(), norms.clear()
            with deterministic_train_mode(module):
                for one in singles:
                    with torch.enable_grad():
                        loss = module.per_example_loss(one)[0]
                        grads = torch.autograd.grad(loss, weights)
                    with torch.no_grad():
                        norms.append(torch.cat([g.reshape(-1) for g in grads]).double().norm())
                        feats.append(kron.project([g.unsqueeze(0) for g in grads])[0])

        loop()  # warm-up
        seconds = timed(loop, s["naive_rounds"], device)
        naive = {"ex_s": round(B * s["naive_rounds"] / seconds, 3), "rounds": s["naive_rounds"]}
        result: dict[str, Any] = {"naive": naive}
        if batched is not None and val:
            result["batched_vs_naive"] = round(val["ex_s"] / naive["ex_s"], 3)
            f_naive = torch.stack(feats).double()
            f_batched = batched.features.double()
            n_naive = torch.stack(norms)
            rel = (f_batched - f_naive).norm(dim=1) / f_naive.norm(dim=1).clamp(min=1e-30)
            rel_norm = (batched.norms.double() - n_naive).abs() / n_naive.abs().clamp(min=1e-30)
            result["check_max_rel_diff"] = {"features": float(rel.max()), "norms": float(rel_norm.max())}
        emit(result)
    except Exception as err:  # noqa: BLE001
        report_failure("naive", err)

    # -------------------------------------------------------------- one batch of the dense rademacher projector
    try:
        check_time(args.deadline, 20 if args.cpu else 45, "rademacher")
        rade = build_projector("rademacher", s["proj_dim"], 0, shapes)
        runs = []
        with Peak(device) as peak:
            for _ in range(s["rademacher_batches"]):  # the first includes kernel warm-up
                runs.append(timed(lambda: value(rade), 1, device))
                if runs[-1] > 60 or time.time() + 2 * runs[-1] + 10 > args.deadline:
                    break
        emit({"rademacher": {"s_per_batch": [round(x, 3) for x in runs], "ex_s": round(B / min(runs), 3),
                             "blocks_per_batch": sum(-(-o * i // rade.block_size) for o, i in shapes),
                             "block_size": rade.block_size, **peak.result}})
    except Exception as err:  # noqa: BLE001
        report_failure("rademacher", err)

    # -------------------------------------------------------------- estimate_projection_cost on this device
    torch.set_default_dtype(torch.float32)  # as in a run: the estimate runs outside Lightning's forward context
    estimates: dict[str, Any] = {}
    full_7b = [shape for _ in range(32) for _ in range(4) for shape in ((128, 4096), (4096, 128))]
    for label, layer_list, batch_size, tokens in (("slice", shapes, B, s["tokens"]),
                                                  ("llava7b_attention_r128_32_layers", full_7b, s["estimate_batch"], 1024)):
        if args.cpu and label != "slice":
            continue  # the full 7B adapter's factors are too large for a quick CPU run
        for kind in ("kronecker", "rademacher"):
            try:
                check_time(args.deadline, 10, "estimate")
                est = estimate_projection_cost(build_projector(kind, s["proj_dim"], 0, layer_list), device,
                                               batch_size, tokens=tokens)
                estimates.setdefault(label, {})[kind] = {
                    k: (round(v, 6) if isinstance(v, float) else v)
                    for k, v in est.items()
                    if k in ("seconds_per_example", "seconds_per_batch", "batch_size", "tokens", "full_dim", "timed",
                             "random_entries_per_batch", "estimate_wall_s", "draw_s_per_batch", "matmul_s_per_batch")
                }
            except Exception as err:  # noqa: BLE001
                report_failure(f"estimate:{label}:{kind}", err)
    emit({"estimate_projection_cost": estimates})


# ============================================================================ smoke select-then-train
def load_yaml_config(paths: list[Path]) -> dict:
    """The configs merged in order, as the CLI merges `--config a --config b` (mappings merge, the rest replaces)."""
    import yaml

    def merge(base: Any, top: Any) -> Any:
        if isinstance(base, dict) and isinstance(top, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in top.items()}}
        return top

    cfg: dict = {}
    for path in paths:
        cfg = merge(cfg, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return cfg


def class_from(path: str) -> Any:
    """The class (or function) a dotted `class_path` names."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(spec: Any) -> Any:
    """`{class_path, init_args}` → an instance (what the CLI does for loggers and callbacks)."""
    return class_from(spec["class_path"])(**(spec.get("init_args") or {}))


def count_collectives(counts: dict) -> None:
    """Count torch.distributed calls by name and tensor device (whoever calls them: TIVE or Lightning)."""
    import torch
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier"):
        original = getattr(dist, name)

        @functools.wraps(original)
        def wrapper(*a: Any, _name: str = name, _original: Any = original, **k: Any) -> Any:
            tensor = a[0] if a and isinstance(a[0], torch.Tensor) else None
            key = _name if tensor is None else f"{_name}:{tensor.device.type}"
            counts[key] = counts.get(key, 0) + 1
            return _original(*a, **k)

        setattr(dist, name, wrapper)


def force_collectives() -> None:
    """Make TIVE's collectives run on a one-process group too (they are skipped with one process)."""
    import torch.distributed as dist

    from lightning_tive.distributed import Collectives

    Collectives.distributed = property(  # type: ignore[method-assign]
        lambda self: self.world_size > 1 or (dist.is_available() and dist.is_initialized()))


def checkpoint_files(folder: Path) -> dict:
    """What the run's checkpoint folder holds: each entry a `file` or a `folder of N files` (shards)."""
    if not folder.is_dir():
        return {}
    return {p.name: (f"folder of {sum(1 for f in p.rglob('*') if f.is_file())} files" if p.is_dir() else "file")
            for p in sorted(folder.iterdir())}


def child_smoke(args: argparse.Namespace, part: str) -> None:
    """The smoke parts: the smoke select-then-train through Lightning, without the CLI."""
    import lightning as L
    import torch

    from lightning_tive.callback import TIVESelectionCallback
    from lightning_tive.data.datamodule import LlavaDataModule
    from lightning_tive.data.demo import DemoConfig
    from lightning_tive.model import LlavaModule
    from lightning_tive.sharding import FSDP2Strategy
    from lightning_tive.tive_config import TIVEConfig

    clock = time.perf_counter()
    cfg = load_yaml_config([ROOT / p for p in SMOKE_CONFIGS])
    sharded = part in SHARDED_PARTS
    root = Path(args.work_dir) / part
    accelerator = "cpu" if args.cpu else "cuda"
    devices = 1
    record: dict[str, Any] = {"configs": list(SMOKE_CONFIGS), "accelerator": accelerator, "devices": devices}
    counts: dict[str, int] = {}
    count_collectives(counts)
    if not args.no_force_collectives:
        force_collectives()
    record["forced_collectives"] = not args.no_force_collectives

    if cfg.get("seed_everything") is not None:
        L.seed_everything(int(cfg["seed_everything"]), verbose=False)
    t_cfg = dict(cfg["trainer"])
    logger_spec = t_cfg.pop("logger", None)
    callbacks = []
    for spec in t_cfg.pop("callbacks", None) or []:
        spec = {**spec, "init_args": dict(spec.get("init_args") or {})}
        if spec["class_path"].endswith("ModelCheckpoint"):
            spec["init_args"].setdefault("dirpath", str(root / "checkpoints"))
        callbacks.append(instantiate(spec))
    logger: Any = False
    if logger_spec:
        spec = {**logger_spec, "init_args": {**(logger_spec.get("init_args") or {}), "save_dir": str(root)}}
        try:
            logger = instantiate(spec)
        except (ImportError, ModuleNotFoundError) as err:  # WandbLogger without wandb: Lightning's CSV logger
            logger = L.pytorch.loggers.CSVLogger(str(root), name="smoke")
            record["logger_note"] = f"{spec['class_path']} unavailable ({error_text(err)[:200]}); CSVLogger instead"
    record["logger"] = type(logger).__name__ if logger else None
    t_cfg.update(default_root_dir=str(root), accelerator=accelerator, devices=devices, enable_progress_bar=False,
                 enable_model_summary=False)
    if part == "smoke_ddp_bf16":
        t_cfg["precision"] = "bf16-true"
    elif part == "smoke_sharded_bf16":
        t_cfg["precision"] = "bf16-mixed"  # the 7B config's
    elif args.precision:
        t_cfg["precision"] = args.precision
    record["precision"] = t_cfg.get("precision")

    m_cfg = dict(cfg["model"])
    opt = m_cfg.pop("optimizer")
    sched = m_cfg.pop("lr_scheduler", None)
    opt_cls, opt_args = class_from(opt["class_path"]), dict(opt.get("init_args") or {})
    m_cfg["optimizer"] = lambda params: opt_cls(params, **opt_args)
    if sched:
        sched_cls, sched_args = class_from(sched["class_path"]), dict(sched.get("init_args") or {})
        m_cfg["lr_scheduler"] = lambda optimizer, total: sched_cls(optimizer, total, **sched_args)
    d_cfg = dict(cfg["data"])
    if d_cfg.get("demo") is not None:
        d_cfg["demo"] = DemoConfig(**d_cfg["demo"])
    d_cfg["output_dir"] = str(root)
    tive_cfg = TIVEConfig(**{**cfg["tive"], "output_dir": str(root / "tive")})

    marks: dict[str, float] = {}
    seen: dict[str, Any] = {}

    class Clock(L.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:  # runs after TIVE's (callback order)
            marks["selected"] = time.perf_counter()
            import torch.distributed as dist

            seen["process_group"] = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
            seen["param_devices"] = sorted({str(p.device) for p in pl_module.parameters()})

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            marks["train_start"] = time.perf_counter()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            marks["train_end"] = time.perf_counter()

    try:
        module = LlavaModule(**m_cfg)
        datamodule = LlavaDataModule(**d_cfg)
        tive = TIVESelectionCallback(tive_cfg)
        strategy = FSDP2Strategy() if sharded else "ddp"
        trainer = L.Trainer(**t_cfg, strategy=strategy, logger=logger, callbacks=[tive, *callbacks, Clock()])
        record["strategy"] = type(trainer.strategy).__name__
        record["build_s"] = round(time.perf_counter() - clock, 2)
        if accelerator == "cuda":
            torch.cuda.reset_peak_memory_stats()
        marks["fit_start"] = time.perf_counter()
        trainer.fit(module, datamodule)
        marks["fit_end"] = time.perf_counter()
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        record.update(status="error", ran=False, error=error_text(err), collectives=counts, **seen)
        emit(record)
        return
    summary = tive.summary
    phases = {k: round(v, 3) for k, v in summary.get("timings_s", {}).items() if isinstance(v, (int, float))}
    if "selected" in marks:
        phases["tive_total_s"] = round(marks["selected"] - marks["fit_start"], 3)
    if "train_start" in marks and "train_end" in marks:
        phases["training_s"] = round(marks["train_end"] - marks["train_start"], 3)
    phases["fit_s"] = round(marks["fit_end"] - marks["fit_start"], 3)
    metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and k.count("/") == 1}
    outputs = sorted(p.name for p in (root / "tive").iterdir()) if (root / "tive").exists() else []
    record.update(
        status="ok", ran=True, pool_size=summary.get("pool_size"), budget=summary.get("budget"),
        selected=summary.get("selected"), distinct_selected=summary.get("distinct_selected"),
        global_step=trainer.global_step, phases_s=phases, metrics=metrics, collectives=counts, outputs=outputs,
        report_png="report.png" in outputs, checkpoints=checkpoint_files(root / "checkpoints"), **seen,
    )
    if accelerator == "cuda":
        record["peak_mib"] = mib(torch.cuda.max_memory_allocated())
    emit(record)


# ============================================================================ the parent
def run_child(part: str, args: argparse.Namespace, env: dict, timeout: float, log: Any,
              on_update: Callable[[dict], None] | None = None) -> dict:
    """Run one part in its own process (session), kill it at `timeout`; merge what it reported."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--deadline", str(time.time() + timeout),
               "--work-dir", args.work_dir]
    if args.cpu:
        command.append("--cpu")
    if args.precision:
        command += ["--precision", args.precision]
    if args.no_force_collectives:
        command.append("--no-force-collectives")
    return run_command(command, env, timeout, log, part, on_update)


def merge_report(record: dict, update: dict) -> None:
    """Merge a child's report into its record: a mapping adds to the mapping already there (steps report apart)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            record[key].update(value)
        else:
            record[key] = value


def run_command(command: list[str], env: dict, timeout: float, log: Any, label: str,
                on_update: Callable[[dict], None] | None = None) -> dict:
    """Run `command`, collect its MARK lines into one record, kill its whole session after `timeout` seconds.

    `on_update(record)` runs after each MARK line (the parent rewrites its output file with it).
    """
    record: dict[str, Any] = {}
    tail: list[str] = []
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True, bufsize=1)

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if log is not None:
                log.write(f"[{label}] {line}")
                log.flush()
            if line.startswith(MARK):
                with contextlib.suppress(json.JSONDecodeError):
                    merge_report(record, json.loads(line[len(MARK):]))
                    if on_update is not None:
                        on_update(record)
            else:
                tail.append(line)
                del tail[:-40]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=max(timeout, 0.1))
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and anything it started
        returncode = proc.wait()
        timed_out = True
    reader.join(timeout=10)
    record["seconds"] = round(time.perf_counter() - start, 2)
    if timed_out:
        record["status"] = "timeout"
        record["note"] = f"killed after {timeout:.0f} s: the budget was spent (what it reported before is kept)"
    elif returncode != 0 and record.get("status") in (None, "ok"):
        record["status"] = "error"
        record.setdefault("error", f"exit code {returncode}: " + "".join(tail)[-1500:])
    elif "status" not in record:
        record["status"] = "error" if record.get("errors") else "ok"
    return record


def write_json(path: Path, result: dict) -> None:
    """Replace `path` with the result as one JSON line (atomically: a reader never sees half of it)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, default=str) + "\n", encoding="utf-8")
    os.replace(partial, path)


def run_child_main(args: argparse.Namespace) -> None:
    """A child's whole life: run its part, report a crash through the exit code, leave without tearing down."""
    code = 0
    try:
        if args.child == "full7b":
            child_full7b(args)
        elif args.child == "slice":
            child_slice(args)
        else:
            child_smoke(args, args.child)
    except BaseException:  # noqa: BLE001 - reported through the exit code and the log
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # no interpreter shutdown: a stuck NCCL or CUDA teardown must not eat the budget


def main(argv: list[str] | None = None) -> int:
    """Record the versions, run the parts within the budget, print (and write) the JSON; 0 unless a part failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the same parts, shrunk, on CPU (a test)")
    parser.add_argument("--out", help="also write the JSON here (and every part's output to the same name .log)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--work-dir", help="run folders (default: a temporary folder, removed afterwards)")
    parser.add_argument("--cache", help="LIGHTNING_TIVE_CACHE for the demo data, tokenizer and data index (default: "
                        "inherited, else inside the work folder)")
    parser.add_argument("--precision", help="override the smoke configs' trainer.precision in smoke_ddp and "
                        "smoke_sharded (e.g. bf16-true)")
    parser.add_argument("--no-force-collectives", action="store_true",
                        help="let TIVE skip its collectives with one process, as it does in a real run")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child_main(args)

    clock = time.perf_counter()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts must be a subset of {','.join(PARTS)}")
    kind = "cpu" if args.cpu else "gpu"
    out = Path(args.out) if args.out else None
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            args.work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        cache = args.cache or os.environ.get("LIGHTNING_TIVE_CACHE") or str(Path(args.work_dir) / "cache")
        os.environ["LIGHTNING_TIVE_CACHE"] = cache
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.setdefault("WANDB_MODE", "disabled")
        log = stack.enter_context(open(out.with_suffix(".log"), "w")) if out else None
        result: dict[str, Any] = {"mode": kind, "budget_s": args.budget_s, "command": " ".join(sys.argv),
                                  "cache": cache, "work_dir": args.work_dir, "complete": False}

        def save() -> None:
            if out is not None:
                write_json(out, result)

        # The versions first, before anything imports lightning_tive (whose import refuses old ones).
        result["versions"] = installed_versions()
        try:
            result["version_check"] = check = version_check()
        except Exception as err:  # noqa: BLE001
            result["version_check"] = check = {"passed": False, "error": error_text(err)}
        if not check["passed"]:
            env[SKIP_VERSION_CHECK] = "1"  # so we still learn what works on this image
            check["parts_run_with"] = f"{SKIP_VERSION_CHECK}=1"
        print("gpu_check versions: " + json.dumps({"versions": result["versions"], "version_check": check}), flush=True)
        save()
        try:
            result["env"] = runtime()
        except Exception as err:  # noqa: BLE001
            result["env"] = {"error": error_text(err)}
        print("gpu_check env: " + json.dumps(result["env"]), flush=True)
        save()
        no_cuda = not args.cpu and not result["env"].get("cuda_available")
        result["parts"] = {}
        for k, part in enumerate(parts):
            left = args.budget_s - (time.perf_counter() - clock) - RESERVE_S
            need = MIN_PART_S[kind][part]
            later = sum(MIN_PART_S[kind][p] for p in parts[k + 1 :])  # kept for the parts still to come
            if no_cuda:
                record = {"status": "error", "error": "CUDA is not available (use --cpu for the CPU version)"}
            elif left < need:
                record = {"status": "skipped",
                          "note": f"budget: {max(left, 0):.0f} s left of {args.budget_s:.0f}, the part needs ~{need} s"}
            else:
                cap = max(need, left - later)
                print(f"gpu_check: {part} (up to {cap:.0f} s)", flush=True)

                def progress(record: dict, part: str = part) -> None:
                    result["parts"][part] = record
                    save()

                record = run_child(part, args, env, cap, log, progress)
            if not check["passed"] and record.get("status") not in ("skipped", None):
                record["version_check_skipped"] = True
            result["parts"][part] = record
            save()
            print(f"gpu_check: {part}: {record.get('status')} in {record.get('seconds', 0)} s"
                  + (f" - {record.get('error') or record.get('note')}" if record.get("status") != "ok" else ""),
                  flush=True)
        result["wall_s"] = round(time.perf_counter() - clock, 1)
        result["ok"] = bool(check["passed"]) and all(
            r.get("status") == "ok" and not r.get("errors") for r in result["parts"].values())
        result["complete"] = True
        save()
        print(json.dumps(result, default=str), flush=True)
    return 0 if all(r.get("status") in ("ok", "skipped") for r in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
