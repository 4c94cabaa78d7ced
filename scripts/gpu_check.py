"""Everything worth checking on a lent GPU, in one call of at most 8 minutes; prints one JSON line last.

On the device machine (one NVIDIA H100; its image has torch, lightning, transformers, peft,
torchmetrics, PyYAML and PIL, but not jsonargparse, wandb, bitsandbytes or gguf, and reaches no
package index), from the repository root::

    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT/gpu_check.json --budget-s 420

(give the device call ``timeout_s`` 480 or more). ``$OUT/gpu_check.json`` holds the JSON line and
``$OUT/gpu_check.log`` every part's own output. Here, on CPU, the same parts shrunk (what
``tests/test_gpu_check.py`` runs)::

    python scripts/gpu_check.py --cpu

Parts, each in its own subprocess (so a crash, a CUDA error or an initialised process group in one
cannot touch the next), each timed, each recorded with its status and error text:

* ``slice`` (a): the LLaVA-7B-width slice of ``scripts/bench_valuation_memory.py`` (vicuna-7b
  widths, 2 decoder layers; CLIP-L/336 widths, 1 layer; 576 image tokens; T = 1,024; batch 4; LoRA
  r=128 on every LM linear layer; gradient checkpointing) in bf16 on cuda: training-step and
  valuation throughput and peak memory, the batched per-example features against a batch-of-one
  loop (kronecker), one batch of the dense rademacher projector, and ``estimate_projection_cost``
  on the device for the slice's and the full 32-layer 7B adapter;
* ``smoke_ddp`` (b): the smoke select-then-train (``configs/demo.yaml`` + ``configs/smoke.yaml``)
  through Lightning directly (the CLI needs jsonargparse), on ``accelerator: cuda``,
  ``strategy: ddp``, ``devices: 1``: NCCL, with TIVE's collectives forced to run on the one-process
  group (they are skipped with one process otherwise), so a CPU tensor sent to one would fail here;
* ``smoke_sharded`` (c): the same with Lightning's ``ModelParallelStrategy`` (FSDP2's
  ``fully_shard``); ``refused`` while the codebase does not support it;
* ``smoke_ddp_bf16``: (b) again under ``precision: bf16-true``, as real runs on the GPU train.

``--budget-s`` is enforced: a part starts only if the budget left covers its usual cost; it may run
until the budget left minus the usual cost of the parts after it, and is killed then (what it
reported so far is kept; the slice's later steps skip themselves first). Each skip or kill is noted
in the JSON. ``docs/benchmarks.md`` § GPU check explains every field.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("slice", "smoke_ddp", "smoke_sharded", "smoke_ddp_bf16")
MARK = "@@ "  # a child's result lines: MARK + a JSON object merged into its part's record
OPTIONAL = ("jsonargparse", "wandb", "bitsandbytes", "gguf")
VERSIONS = (
    "torch", "lightning", "pytorch_lightning", "transformers", "peft", "torchmetrics", "tokenizers", "PIL", "numpy",
    "yaml", "safetensors", "tqdm", "matplotlib",
)
# Seconds a part usually needs (on the GPU, on 2 busy CPU cores): it is skipped with less budget left.
MIN_PART_S = {"gpu": {"slice": 90, "smoke_ddp": 75, "smoke_sharded": 30, "smoke_ddp_bf16": 60},
              "cpu": {"slice": 15, "smoke_ddp": 30, "smoke_sharded": 10, "smoke_ddp_bf16": 30}}
RESERVE_S = 5  # kept back for writing the result
LM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (a): vicuna-7b / CLIP-L/336 widths (as scripts/bench_valuation_memory.py), and a tiny CPU stand-in.
SLICE = {
    "gpu": {
        "tiny": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                     vision_hidden_size=1024, vision_intermediate_size=4096, vision_layers=1, vision_heads=16,
                     image_size=336, patch_size=14, max_position_embeddings=4096, vocab_size=32000),
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


def versions() -> dict:
    """Versions of what the check runs on, and which optional packages are importable."""
    out: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpus": os.cpu_count()}
    for name in VERSIONS:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - any failure to import is what we report
            out[name] = f"missing ({type(err).__name__})"
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
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        self.result = {"peak_mib": round(peak / 2**20, 1), "peak_above_start_mib": round((peak - self.base) / 2**20, 1),
                       "allocated_at_start_mib": round(self.base / 2**20, 1)}


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


# ============================================================================ (a) the 7B-width slice
def make_batch(module: Any, batch: int, tokens: int, image_tokens: int, image_size: int) -> dict:
    """Right-padded examples of up to `tokens` tokens: the image, a question, then a supervised answer."""
    import torch

    gen = torch.Generator().manual_seed(0)
    image_id = module.llava.config.image_token_index
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


def single(batch: dict, i: int) -> dict:
    """Example `i` of a batch alone, without its padding."""
    length = int(batch["attention_mask"][i].sum())
    out = {k: v[i : i + 1, :length] for k, v in batch.items() if k != "pixel_values"}
    out["pixel_values"] = batch["pixel_values"][i : i + 1]
    return out


def child_slice(args: argparse.Namespace) -> None:
    """Part (a): throughput and memory of training and valuation on the 7B-width slice."""
    import torch

    from lightning_tive.model import LlavaModule, LoraSettings, TinyLlavaConfig
    from lightning_tive.tive.grads import layer_shapes, per_example_grads
    from lightning_tive.tive.modes import deterministic_train_mode
    from lightning_tive.tive.projection import build_projector, estimate_projection_cost

    s = SLICE["cpu" if args.cpu else "gpu"]
    device = torch.device("cpu" if args.cpu else "cuda")
    clock = time.perf_counter()
    lora = LoraSettings(r=s["r"], alpha=2 * s["r"], dropout=0.05, target_modules=list(LM_LINEARS))
    module = LlavaModule(tiny=TinyLlavaConfig(**s["tiny"]), finetune="lora", lora=lora, gradient_checkpointing=True)
    module.to(device=device, dtype=torch.bfloat16)
    image_tokens = int(module.llava.config.image_seq_length)
    batch = make_batch(module, s["batch"], s["tokens"], image_tokens, s["tiny"]["image_size"])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    B = s["batch"]
    emit({"settings": {**{k: v for k, v in s.items() if k != "tiny"}, "tiny": s["tiny"], "image_tokens": image_tokens,
                       "dtype": "bfloat16", "gradient_checkpointing": "non-reentrant", "device": str(device),
                       "lora": f"r={s['r']} alpha={2 * s['r']} dropout 0.05 on {','.join(LM_LINEARS)}",
                       "params": sum(p.numel() for p in module.parameters()),
                       "supervised_tokens": (batch["labels"][:, 1:] != -100).sum(1).tolist()},
          "setup_s": round(time.perf_counter() - clock, 2)})
    torch.set_default_dtype(torch.bfloat16)  # as Lightning's bf16-true precision does

    # -------------------------------------------------------------- training step (LoRA, AdamW)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def train_step() -> None:
        module.train()
        total, count = module.batch_nll(batch)
        loss = total.sum() / count.sum().clamp(min=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -------------------------------------------------------------- valuation (kronecker), as the callback runs it
    adapter = module.add_reference_adapter(lora, seed=0)
    module.to(device=device, dtype=torch.bfloat16)  # the new adapter joins the model's device and dtype
    layers = [(n, m) for n, m in adapter if ".self_attn." in n]
    shapes = layer_shapes(layers)
    kron = build_projector("kronecker", s["proj_dim"], 0, shapes)
    emit({"adapter": {"feature_layers": len(layers), "feature_dims": sum(o * i for o, i in shapes),
                      "proj_dim": s["proj_dim"]}})

    def value(projector: Any, b: dict = batch) -> Any:
        with deterministic_train_mode(module):
            return per_example_grads(layers, projector, module.per_example_loss, b)

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


# ============================================================================ (b), (c) smoke select-then-train
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
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(spec: Any) -> Any:
    """`{class_path, init_args}` → an instance (what the CLI does for loggers and callbacks)."""
    return class_from(spec["class_path"])(**(spec.get("init_args") or {}))


def sharded_strategy(devices: int) -> Any:
    """The sharded strategy of part (c): Lightning's ModelParallelStrategy, sharding over data-parallel ranks."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False)


def sharded_support() -> dict:
    """Whether the codebase says it runs under ModelParallelStrategy (the callback's list, a configure_model)."""
    import lightning as L

    from lightning_tive import callback
    from lightning_tive.model import LlavaModule

    return {"callback_allows": "ModelParallelStrategy" in getattr(callback, "SUPPORTED_STRATEGIES", ()),
            "configure_model": LlavaModule.configure_model is not L.LightningModule.configure_model}


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


def is_refusal(err: BaseException) -> bool:
    """A strategy that the callback or Lightning refuses for this module (not a failure of a supported path)."""
    text = str(err)
    return (isinstance(err, RuntimeError) and "TIVESelectionCallback supports" in text) or (
        isinstance(err, TypeError) and "configure_model" in text)


def child_smoke(args: argparse.Namespace, part: str) -> None:
    """Parts (b), (c) and (b) in bf16: the smoke select-then-train through Lightning, without the CLI."""
    import lightning as L
    import torch

    from lightning_tive.callback import TIVESelectionCallback
    from lightning_tive.data.datamodule import LlavaDataModule
    from lightning_tive.data.demo import DemoConfig
    from lightning_tive.model import LlavaModule
    from lightning_tive.tive_config import TIVEConfig

    clock = time.perf_counter()
    cfg = load_yaml_config([ROOT / p for p in SMOKE_CONFIGS])
    sharded = part == "smoke_sharded"
    root = Path(args.work_dir) / part
    accelerator = "cpu" if args.cpu else "cuda"
    devices = 1
    record: dict[str, Any] = {"configs": list(SMOKE_CONFIGS), "accelerator": accelerator, "devices": devices}
    if sharded:
        record["codebase_support"] = sharded_support()
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
        strategy = sharded_strategy(devices) if sharded else "ddp"
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
        record.update(status="refused" if is_refusal(err) else "error", ran=False, error=error_text(err),
                      collectives=counts, **seen)
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
    record.update(
        status="ok", ran=True, pool_size=summary.get("pool_size"), budget=summary.get("budget"),
        selected=summary.get("selected"), distinct_selected=summary.get("distinct_selected"),
        global_step=trainer.global_step, phases_s=phases, metrics=metrics, collectives=counts,
        outputs=sorted(p.name for p in (root / "tive").iterdir()) if (root / "tive").exists() else [], **seen,
    )
    if accelerator == "cuda":
        record["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    emit(record)


# ============================================================================ the parent
def run_child(part: str, args: argparse.Namespace, env: dict, timeout: float, log: Any) -> dict:
    """Run one part in its own process (session), kill it at `timeout`; merge what it reported."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--deadline", str(time.time() + timeout),
               "--work-dir", args.work_dir]
    if args.cpu:
        command.append("--cpu")
    if args.precision:
        command += ["--precision", args.precision]
    if args.no_force_collectives:
        command.append("--no-force-collectives")
    return run_command(command, env, timeout, log, part)


def run_command(command: list[str], env: dict, timeout: float, log: Any, label: str) -> dict:
    """Run `command`, collect its MARK lines into one record, kill its whole session after `timeout` seconds."""
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
                    update = json.loads(line[len(MARK):])
                    for key in ("errors", "skipped"):  # notes from several steps add up
                        if key in update and key in record:
                            record[key].update(update.pop(key))
                    record.update(update)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the same parts, shrunk, on CPU (a test)")
    parser.add_argument("--out", help="also write the JSON here (and every part's output to the same name .log)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole check")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--work-dir", help="run folders (default: a temporary folder, removed afterwards)")
    parser.add_argument("--cache", help="LIGHTNING_TIVE_CACHE for the demo data and tokenizer (default: inherited, "
                        "else inside the work folder)")
    parser.add_argument("--precision", help="override the smoke configs' trainer.precision (e.g. bf16-true)")
    parser.add_argument("--no-force-collectives", action="store_true",
                        help="let TIVE skip its collectives with one process, as it does in a real run")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        code = 0
        try:
            child_slice(args) if args.child == "slice" else child_smoke(args, args.child)
        except BaseException:  # noqa: BLE001 - reported through the exit code and the log
            traceback.print_exc()
            code = 1
        finally:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # no interpreter shutdown: a stuck NCCL or CUDA teardown must not eat the budget

    clock = time.perf_counter()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts must be a subset of {','.join(PARTS)}")
    kind = "cpu" if args.cpu else "gpu"
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            args.work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        cache = args.cache or os.environ.get("LIGHTNING_TIVE_CACHE") or str(Path(args.work_dir) / "cache")
        os.environ["LIGHTNING_TIVE_CACHE"] = cache
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.setdefault("WANDB_MODE", "disabled")
        log = stack.enter_context(open(Path(args.out).with_suffix(".log"), "w")) if args.out else None
        result: dict[str, Any] = {"mode": kind, "budget_s": args.budget_s, "command": " ".join(sys.argv),
                                  "cache": cache, "work_dir": args.work_dir}
        try:
            result["env"] = versions()
        except Exception as err:  # noqa: BLE001
            result["env"] = {"error": error_text(err)}
        print("gpu_check env: " + json.dumps(result["env"]), flush=True)
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
                record = run_child(part, args, env, cap, log)
            result["parts"][part] = record
            print(f"gpu_check: {part}: {record.get('status')} in {record.get('seconds', 0)} s"
                  + (f" - {record.get('error') or record.get('note')}" if record.get("status") != "ok" else ""),
                  flush=True)
        result["wall_s"] = round(time.perf_counter() - clock, 1)
        result["ok"] = all(r.get("status") in ("ok", "refused") and not r.get("errors") for r in result["parts"].values())
        line = json.dumps(result, default=str)
        if args.out:
            Path(args.out).write_text(line + "\n", encoding="utf-8")
        print(line, flush=True)
    return 0 if all(r.get("status") in ("ok", "refused", "skipped") for r in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
