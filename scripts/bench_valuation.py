"""Benchmark TIVE valuation (batched per-example gradients + projection) against a batch-of-one loop and training.

Runs on two models built from :class:`lightning_tive.model.TinyLlavaConfig`:

* ``demo``: the demo model exactly as ``configs/demo.yaml`` sets it up (``TinyLlavaConfig()``
  defaults, ``finetune: full``, reference LoRA r=16/alpha=32 on q,k,v,o, ``proj_dim`` 1024);
* ``wide``: LM hidden 1024, intermediate 2816, 4 layers, 16 heads (head dim 64), the demo's small
  vision tower, reference LoRA r=64/alpha=128 on q,k,v,o, ``proj_dim`` 8192 (the paper's); the
  training arm fine-tunes it like ``demo`` (``--wide-finetune full``, as ``configs/llava15_7b.yaml``).

Batches are real: drawn from the demo mixture through :class:`LlavaDataModule` (mixed image and
text-only examples, right-padded, ``max_length`` 256), the same batches for every arm and both
models. Arms, each timed once per round on the same batches:

* ``val:<projector>``: :func:`per_example_grads` on the padded batch, ``model.eval()``, exactly as
  the callback runs valuation (features copied to NumPy as the callback does). The projector is
  wrapped so the time spent inside its ``project_layer`` calls is measured directly.
* ``val:none``: the same engine pass with a projector that does nothing (same exact-norm path as
  ``kronecker``): the cross-check for the projector's share by subtraction.
* ``naive:<projector>``: a batch-of-one loop: each example collated alone (unpadded), its loss
  differentiated with ``torch.autograd.grad`` w.r.t. the adapter weights, flattened, normed and
  projected with the same projector (``projector.project``). Timed on a length-stratified subset of
  each batch and scaled per example.
* ``train``: a plain training step of the main fine-tuning: forward, token-mean loss, backward,
  AdamW step (and ``zero_grad``) over the main model's trainable parameters (a separate module
  instance without the reference adapter, as Lightning's fit trains after selection).

Rounds of the two models are interleaved evenly and the arm order rotates every round, so
background load hits every arm alike; ratios are taken per round (paired) and their median is
reported. Data loading is excluded from every arm (batches are collated beforehand) and reported
separately. Rademacher on the wide model would draw a 2.1M x 8192 ±1 matrix per batch (minutes),
so it is estimated from one timed layer (marked ``estimated``).

Prints readable tables and, last, one JSON line::

    python scripts/bench_valuation.py            # full run, ~5 min on a 2-core CPU (6 with --profile)
    python scripts/bench_valuation.py --quick    # ~1-2 min
    python scripts/bench_valuation.py --cost     # the cheaper-valuation settings instead, ~1 min
                                                 # (--models demo,wide: the wide model too, > 10 min)

``--cost`` times, on the same batches and in one run, the valuation as the callback runs it (training
mode without dropout, the adapter's other weights frozen, the configured kronecker projector) with
every feature layer, with ``tive.gradient_layers`` (the last layer of the demo's 2, and of the wide
model's 4), with ``tive.valuation_max_length`` (examples cut by the pool loader, as the callback
cuts them) and with both, plus a training step; on random pool batches and on the pool's
longest-answer examples. It prints per-round (paired) medians of each arm's time over the full
valuation's, and a JSON line whose ``cost`` key holds them.

Top-level JSON keys are the demo model's ``batched_vs_naive``, ``valuation_vs_training`` and
``projector_share`` (kronecker, the configured projector); ``wide`` holds the same keys for the
wide model; ``meta`` holds the settings and the machine. Not a test: pytest does not run it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_tive.data.datamodule import LlavaDataModule  # noqa: E402
from lightning_tive.data.demo import DemoConfig  # noqa: E402
from lightning_tive.model import LlavaModule, TinyLlavaConfig, per_example_nll  # noqa: E402
from lightning_tive.reference_adapter import feature_layers, only_differentiating  # noqa: E402
from lightning_tive.tive.grads import layer_shapes, per_example_grads  # noqa: E402
from lightning_tive.tive.modes import deterministic_train_mode  # noqa: E402
from lightning_tive.tive.projection import Projector, RademacherProjector, build_projector  # noqa: E402
from lightning_tive.tive_config import ReferenceLora  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
WIDE_TINY = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16)
WIDE_LORA = dict(r=64, alpha=128, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


# ---------------------------------------------------------------------------- projectors
class NullProjector(Projector):
    """Projects nothing: the engine still computes the exact norms (``auto`` path, like kronecker)."""

    kind = "none"
    needs_full_grad = False

    def project_layer(self, out, layer, *, grad=None, inputs=None, grad_outputs=None) -> None:
        """Do nothing."""


class TimedProjector:
    """Delegates to a projector and adds up the wall time spent inside its ``project_layer``."""

    def __init__(self, inner: Projector) -> None:
        self.inner = inner
        self.layer_shapes = inner.layer_shapes
        self.proj_dim = inner.proj_dim
        self.needs_full_grad = inner.needs_full_grad
        self.kind = inner.kind
        self.seconds = 0.0

    def project_layer(self, out, layer, **kwargs) -> None:
        """Project one layer and time it (CPU ops are synchronous, so wall time is the op time)."""
        start = time.perf_counter()
        self.inner.project_layer(out, layer, **kwargs)
        self.seconds += time.perf_counter() - start


# ---------------------------------------------------------------------------- set-up
@dataclass
class ModelSpec:
    """One benchmarked model."""

    name: str
    tiny: dict
    lora: dict
    proj_dim: int
    finetune: str
    projectors: list[str]  # measured valuation projectors
    naive_projectors: list[str]  # projectors that also get a batch-of-one arm
    estimate_rademacher: bool
    rounds: int
    naive_examples: int


@dataclass
class Bench:
    """A built model with its arms and timings."""

    spec: ModelSpec
    arms: dict[str, Callable[[], tuple[float, int, float]]] = field(default_factory=dict)
    times: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    profile_targets: dict[str, Callable[[], Any]] = field(default_factory=dict)


def load_demo_config() -> dict:
    """The demo settings the benchmark mirrors (configs/demo.yaml)."""
    import yaml

    with open(DEMO_CONFIG, encoding="utf-8") as f:
        return yaml.safe_load(f)


def pick_batches(dm: LlavaDataModule, batch_size: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random pool batches, each with both image and text-only examples (redrawn otherwise)."""
    rng = np.random.default_rng(seed)
    has_image = np.array([dm.pool_record(i).get("image") is not None for i in range(dm.pool_size)])
    out: list[np.ndarray] = []
    order = rng.permutation(dm.pool_size)
    start = 0
    while len(out) < count:
        if start + batch_size > len(order):
            order, start = rng.permutation(dm.pool_size), 0
        idx = order[start : start + batch_size]
        start += batch_size
        if has_image[idx].any() and not has_image[idx].all():
            out.append(idx)
    return out


def stratified(lengths: torch.Tensor, count: int) -> list[int]:
    """Positions of ``count`` examples spread evenly over the batch's length distribution."""
    order = torch.argsort(lengths, stable=True).tolist()
    if count >= len(order):
        return sorted(order)
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))
    return sorted(order[i] for i in picks)


def build_bench(
    spec: ModelSpec, cfg: dict, dm: LlavaDataModule, pool_batches: list[np.ndarray], seed: int
) -> Bench:
    """Build the valuation and training modules, collate the batches and define the arms."""
    bench = Bench(spec)
    val_module = LlavaModule(tiny=TinyLlavaConfig(**spec.tiny), finetune=spec.finetune)
    train_module = LlavaModule(tiny=TinyLlavaConfig(**spec.tiny), finetune=spec.finetune)
    layers = val_module.add_reference_adapter(ReferenceLora(**spec.lora), seed)
    val_module.eval()  # as the callback's valuation: dropout off
    shapes = layer_shapes(layers)
    weights = [m.weight for _, m in layers]

    batches = [next(iter(dm.pool_dataloader(idx, batch_size=len(idx)))) for idx in pool_batches]
    subsets, singles = [], []
    for idx, batch in zip(pool_batches, batches, strict=True):
        pos = stratified(batch["attention_mask"].sum(1), spec.naive_examples)
        subsets.append(pos)
        singles.append([next(iter(dm.pool_dataloader(idx[[p]], batch_size=1))) for p in pos])

    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).float()
    sub_lengths = torch.cat(
        [batches[i]["attention_mask"][subsets[i]].sum(1) for i in range(len(batches))]
    ).float()
    bench.info = {
        "lm": spec.tiny,
        "reference_lora": spec.lora,
        "adapter_layers": len(shapes),
        "adapter_dims": sum(o * i for o, i in shapes),
        "proj_dim": spec.proj_dim,
        "model_params": int(sum(p.numel() for n, p in train_module.named_parameters())),
        "trainable_params": int(sum(p.numel() for _, p in train_module.trainable_parameters())),
        "training_finetune": spec.finetune,
        "examples_per_round": sum(len(b["input_ids"]) for b in batches),
        "naive_examples_per_round": sum(len(s) for s in subsets),
        "text_only_examples": int(
            sum(
                len(b["input_ids"]) - (0 if b.get("pixel_values") is None else len(b["pixel_values"]))
                for b in batches
            )
        ),
        "padded_length": [int(b["input_ids"].shape[1]) for b in batches],
        "mean_length": round(float(lengths.mean()), 1),
        "naive_subset_mean_length": round(float(sub_lengths.mean()), 1),
    }

    projectors: dict[str, Projector] = {}
    for kind in spec.projectors:
        dim = None if kind == "identity" else spec.proj_dim
        projectors[kind] = build_projector(kind, dim, seed, shapes)
    projectors["none"] = NullProjector(1, seed, shapes)

    def val_arm(kind: str) -> Callable[[], tuple[float, int, float]]:
        projector = TimedProjector(projectors[kind])

        def run() -> tuple[float, int, float]:
            projector.seconds = 0.0
            count = 0
            start = time.perf_counter()
            for i, batch in enumerate(batches):
                grads = per_example_grads(layers, projector, val_module.per_example_loss, batch)
                features = grads.features.float().cpu().numpy()
                norms = grads.norms.float().cpu().numpy()
                count += len(norms)
                if i == 0 and kind == "kronecker" and "batched" not in bench.check:
                    bench.check["batched"] = (features[subsets[0]].copy(), norms[subsets[0]].copy())
            return time.perf_counter() - start, count, projector.seconds

        return run

    def naive_arm(kind: str) -> Callable[[], tuple[float, int, float]]:
        projector = projectors[kind]

        def run() -> tuple[float, int, float]:
            count = 0
            keep = kind == "kronecker" and "naive" not in bench.check
            feats, norms = [], []
            start = time.perf_counter()
            for i, group in enumerate(singles):
                for single in group:
                    with torch.enable_grad():
                        loss = val_module.per_example_loss(single)[0]
                        grads = torch.autograd.grad(loss, weights)
                    with torch.no_grad():
                        # float64: torch's float32 CPU norm of a 2M-vector is off by ~1e-5..1e-4 relative
                        norm = torch.cat([g.reshape(-1) for g in grads]).double().norm()
                        feature = projector.project([g.unsqueeze(0) for g in grads])
                    count += 1
                    if keep and i == 0:
                        feats.append(feature[0].numpy().copy())
                        norms.append(float(norm))
            elapsed = time.perf_counter() - start
            if keep:
                bench.check["naive"] = (np.stack(feats), np.asarray(norms, dtype=np.float32))
            return elapsed, count, 0.0

        return run

    groups: dict[str, list] = {"main": [], "projector": []}
    for name, param in train_module.trainable_parameters():
        groups["projector" if "multi_modal_projector" in name else "main"].append(param)
    opt_args = cfg["model"]["optimizer"]["init_args"]
    optimizer = torch.optim.AdamW(
        [{"params": p, "name": n} for n, p in groups.items() if p],
        lr=opt_args.get("lr", 1e-3),
        weight_decay=opt_args.get("weight_decay", 0.0),
    )
    train_module.train()

    def train_step(batch: dict) -> None:
        total, count = per_example_nll(train_module(batch).logits, batch["labels"])
        loss = total.sum() / count.sum().clamp(min=1)  # LlavaModule.training_step's loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_arm() -> tuple[float, int, float]:
        count = 0
        start = time.perf_counter()
        for batch in batches:
            train_step(batch)
            count += len(batch["input_ids"])
        return time.perf_counter() - start, count, 0.0

    if spec.estimate_rademacher:
        bench.arms["est:rademacher"] = rademacher_layer_arm(
            spec.proj_dim, seed, shapes, [len(b["input_ids"]) for b in batches]
        )
        bench.info["rademacher_estimate"] = (
            "val:none time (the engine without projection), plus the time of one adapter layer projected by "
            "a rademacher projector with no block cache (every block drawn, as for the wide model, whose R "
            "is far beyond the cache) scaled by adapter_dims / layer dims"
        )
    for kind in spec.projectors:
        bench.arms[f"val:{kind}"] = val_arm(kind)
    bench.arms["val:none"] = val_arm("none")
    for kind in spec.naive_projectors:
        bench.arms[f"naive:{kind}"] = naive_arm(kind)
    bench.arms["train"] = train_arm
    bench.times = {name: [] for name in bench.arms}

    # Warm-up (untimed): first-call allocations, AdamW state, projector matrices, kernel selection.
    small = next(iter(dm.pool_dataloader(pool_batches[0][:4], batch_size=4)))
    for kind in list(spec.projectors) + ["none"]:
        per_example_grads(layers, projectors[kind], val_module.per_example_loss, small)
    for kind in spec.naive_projectors:
        single = singles[0][0]
        loss = val_module.per_example_loss(single)[0]
        grads = torch.autograd.grad(loss, weights)
        projectors[kind].project([g.unsqueeze(0) for g in grads])
    train_step(small)

    bench.profile_targets = {
        "val:kronecker": lambda: per_example_grads(
            layers, projectors["kronecker"], val_module.per_example_loss, batches[0]
        ),
        "val:none": lambda: per_example_grads(
            layers, projectors["none"], val_module.per_example_loss, batches[0]
        ),
        "naive:kronecker": lambda: _naive_once(val_module, weights, projectors["kronecker"], singles[0]),
        "train": lambda: train_step(batches[0]),
    }
    return bench


def rademacher_layer_arm(
    proj_dim: int, seed: int, shapes: list[tuple[int, int]], batch_sizes: list[int]
) -> Callable[[], tuple[float, int, float]]:
    """Time a rademacher projection of layer 0's gradient (blocks redrawn every call) per batch.

    Returns (seconds for layer 0 over all batches, examples, scale to the whole adapter).
    """
    projector = RademacherProjector(proj_dim, seed, shapes, cache_bytes=0)
    d_out, d_in = shapes[0]
    scale = sum(o * i for o, i in shapes) / (d_out * d_in)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(b, d_out, d_in, generator=gen) for b in batch_sizes]

    def run() -> tuple[float, int, float]:
        start = time.perf_counter()
        for grad in grads:
            out = torch.zeros(grad.shape[0], proj_dim)
            projector.project_layer(out, 0, grad=grad)
        return time.perf_counter() - start, sum(batch_sizes), scale

    return run


def _naive_once(module: Any, weights: list, projector: Projector, singles: list) -> None:
    for single in singles:
        loss = module.per_example_loss(single)[0]
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            torch.cat([g.reshape(-1) for g in grads]).double().norm()
            projector.project([g.unsqueeze(0) for g in grads])


# ---------------------------------------------------------------------------- running
def schedule(benches: list[Bench]) -> list[tuple[Bench, int]]:
    """Every model's rounds, spread evenly over the run (round r of R sits at (r + 0.5) / R)."""
    events = [
        ((r + 0.5) / b.spec.rounds, k, r, b) for k, b in enumerate(benches) for r in range(b.spec.rounds)
    ]
    return [(b, r) for _, _, r, b in sorted(events, key=lambda e: e[:3])]


def run_round(bench: Bench, r: int) -> None:
    """Run every arm of ``bench`` once, in an order rotated by the round number."""
    names = list(bench.arms)
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
        gc.collect()
        bench.times[name].append(bench.arms[name]())


def median(values: list[float]) -> float:
    """Median, NaN for an empty list."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def summarise(bench: Bench) -> dict:
    """Per-projector rates and per-round (paired) ratios, medians over rounds."""
    t = bench.times
    rounds = len(t["train"])

    def rate(name: str, r: int) -> float:
        seconds, count, _ = t[name][r]
        return count / seconds

    train = [rate("train", r) for r in range(rounds)]
    none = [t["val:none"][r][0] for r in range(rounds)]
    rows: dict[str, dict] = {}
    kinds = [
        k
        for k in ("identity", "rademacher", "kronecker")
        if f"val:{k}" in t or (k == "rademacher" and "est:rademacher" in t)
    ]
    for kind in kinds:
        row: dict[str, Any] = {}
        if f"val:{kind}" in t:
            seconds = [t[f"val:{kind}"][r][0] for r in range(rounds)]
            proj = [t[f"val:{kind}"][r][2] for r in range(rounds)]
            val = [rate(f"val:{kind}", r) for r in range(rounds)]
            row["projector_share_subtracted"] = median([1 - none[r] / seconds[r] for r in range(rounds)])
        else:  # estimated: the engine without projection plus a scaled, timed rademacher layer
            count = t["val:none"][0][1]
            est_s = [none[r] + t["est:rademacher"][r][0] * t["est:rademacher"][r][2] for r in range(rounds)]
            proj = [t["est:rademacher"][r][0] * t["est:rademacher"][r][2] for r in range(rounds)]
            seconds = est_s
            val = [count / s for s in est_s]
            row["estimated"] = True
            row["projector_share_subtracted"] = median([1 - none[r] / seconds[r] for r in range(rounds)])
        row["valuation_ex_s"] = median(val)
        row["valuation_vs_training"] = median([val[r] / train[r] for r in range(rounds)])
        row["projector_share"] = median([proj[r] / seconds[r] for r in range(rounds)])
        if f"naive:{kind}" in t:
            naive = [rate(f"naive:{kind}", r) for r in range(rounds)]
            row["naive_ex_s"] = median(naive)
            row["batched_vs_naive"] = median([val[r] / naive[r] for r in range(rounds)])
        rows[kind] = row
    summary = {
        "rounds": rounds,
        "training_ex_s": median(train),
        "engine_no_projection_ex_s": median([rate("val:none", r) for r in range(rounds)]),
        "projectors": rows,
    }
    if "batched" in bench.check and "naive" in bench.check:
        fb, nb = bench.check["batched"]
        fn, nn_ = bench.check["naive"]
        fb, fn = fb.astype(np.float64), fn.astype(np.float64)
        summary["check_max_rel_diff"] = {  # max over the compared examples of |a - b| / |b|, per example
            "features": float(
                (np.linalg.norm(fb - fn, axis=1) / np.maximum(np.linalg.norm(fn, axis=1), 1e-30)).max()
            ),
            "norms": float((np.abs(nb.astype(np.float64) - nn_) / np.maximum(np.abs(nn_), 1e-30)).max()),
        }
    return summary


def headline(summary: dict) -> dict:
    """The three issue figures, for the kronecker projector."""
    row = summary["projectors"]["kronecker"]
    return {
        "batched_vs_naive": round(row["batched_vs_naive"], 3),
        "valuation_vs_training": round(row["valuation_vs_training"], 3),
        "projector_share": round(row["projector_share"], 4),
    }


def print_table(bench: Bench, summary: dict) -> None:
    """Readable per-projector figures of one model."""
    info = bench.info
    print(
        f"\n== {bench.spec.name}: LM {info['lm']}, reference LoRA r={info['reference_lora']['r']} on "
        f"{','.join(info['reference_lora']['target_modules'])} ({info['adapter_layers']} layers, "
        f"{info['adapter_dims']} dims), proj_dim {info['proj_dim']}, training: finetune={info['training_finetune']} "
        f"({info['trainable_params']} of {info['model_params']} params)"
    )
    print(
        f"   {info['examples_per_round']} examples/round ({info['text_only_examples']} text-only), padded to "
        f"{info['padded_length']}, mean length {info['mean_length']}; naive loop on {info['naive_examples_per_round']} "
        f"(mean length {info['naive_subset_mean_length']}); medians over {summary['rounds']} rounds"
    )
    print(
        f"   training step: {summary['training_ex_s']:.2f} ex/s; engine without projection: "
        f"{summary['engine_no_projection_ex_s']:.2f} ex/s"
    )
    head = f"   {'projector':<12}{'val ex/s':>10}{'naive ex/s':>12}{'batched/naive':>15}{'val/train':>11}{'proj share':>12}{'(subtracted)':>14}"
    print(head)
    for kind, row in summary["projectors"].items():
        label = kind + ("*" if row.get("estimated") else "")
        naive = f"{row['naive_ex_s']:.2f}" if "naive_ex_s" in row else "-"
        ratio = f"{row['batched_vs_naive']:.2f}" if "batched_vs_naive" in row else "-"
        print(
            f"   {label:<12}{row['valuation_ex_s']:>10.2f}{naive:>12}{ratio:>15}{row['valuation_vs_training']:>11.3f}"
            f"{row['projector_share']:>12.3f}{row['projector_share_subtracted']:>14.3f}"
        )
    print("   seconds per round (arm: s for the round's examples; naive arms: for their subset):")
    for name, runs in bench.times.items():
        print(f"     {name:<16}" + " ".join(f"{seconds:7.3f}" for seconds, _, _ in runs))
    if any(r.get("estimated") for r in summary["projectors"].values()):
        print("   * estimated: " + info["rademacher_estimate"])
    if "check_max_rel_diff" in summary:
        c = summary["check_max_rel_diff"]
        print(
            f"   naive vs batched kronecker (same examples): max rel diff features {c['features']:.2e}, norms {c['norms']:.2e}"
        )


def profile(bench: Bench, top: int) -> None:
    """torch.profiler of one batch per arm kind: top ops by self CPU time, and op counts."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, fn in bench.profile_targets.items():
        fn()  # warm
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        wall = time.perf_counter() - start
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        calls = sum(e.count for e in events if e.key.startswith("aten::"))
        print(
            f"\n-- profile {bench.spec.name} {name}: wall {wall:.3f} s (profiled), self CPU {total:.3f} s, {calls} aten calls"
        )
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        for e in rows:
            print(f"   {e.key[:60]:<60} {e.self_cpu_time_total / 1e3:9.1f} ms {e.count:7d} calls")


def loader_ms_per_example(dm: LlavaDataModule, pool_batches: list[np.ndarray], repeats: int = 3) -> float:
    """Collating the benchmark's batches through the DataModule (excluded from every arm)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for idx in pool_batches:
            next(iter(dm.pool_dataloader(idx, batch_size=len(idx))))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / sum(len(i) for i in pool_batches)


# ---------------------------------------------------------------------------- cheaper valuation (--cost)
def smallest_safe_cut(dm: LlavaDataModule, indices: np.ndarray) -> int:
    """The shortest `valuation_max_length` that leaves every example of `indices` an answer token."""
    return int(dm.pool_answer_starts(indices).max()) + 1


def cost_batch_sets(dm: LlavaDataModule, batch_size: int, count: int, seed: int) -> dict[str, dict]:
    """A random pool sample, and the pool's longest-answer examples, each cut into batches by decreasing
    length as the callback's valuation cuts its chunks; each with the cut it is timed at.

    The cut is half the set's longest example, raised to the smallest that keeps every answer (a cut
    that empties an answer is refused by the callback).
    """
    lengths = np.asarray(dm.pool_lengths)
    answers = lengths - dm.pool_answer_starts(np.arange(dm.pool_size))
    members = {
        "pool": np.random.default_rng(seed).choice(dm.pool_size, batch_size * count, replace=False),
        "long_answers": np.argsort(-answers, kind="stable")[: batch_size * count],
    }
    out = {}
    for name, chosen in members.items():
        half, safe = int(lengths[chosen].max()) // 2, smallest_safe_cut(dm, chosen)
        cut = max(half, safe)
        ordered = chosen[np.argsort(-np.minimum(lengths[chosen], cut), kind="stable")]
        batches = [ordered[k : k + batch_size] for k in range(0, len(ordered), batch_size)]
        padded = sum(len(b) * int(lengths[b].max()) for b in batches)
        padded_cut = sum(len(b) * int(np.minimum(lengths[b], cut).max()) for b in batches)
        out[name] = {
            "batches": batches, "cut": cut, "half_of_longest": half, "raised_to_keep_answers": cut > half,
            "tokens_kept": float(np.minimum(lengths[chosen], cut).sum() / lengths[chosen].sum()),
            "padded_tokens_kept": padded_cut / padded,
            "mean_answer_tokens": float(answers[chosen].mean()), "mean_length": float(lengths[chosen].mean()),
        }
    return out


def cost_arms(spec: ModelSpec, cfg: dict, dm: LlavaDataModule, sets: dict, seed: int) -> tuple[dict, dict]:
    """(arm name -> timed run, info): valuation with each cheaper setting on each batch set, and training."""
    module = LlavaModule(tiny=TinyLlavaConfig(**spec.tiny), finetune=spec.finetune)
    train_module = LlavaModule(tiny=TinyLlavaConfig(**spec.tiny), finetune=spec.finetune)
    adapter = module.add_reference_adapter(ReferenceLora(**spec.lora), seed)
    modules = list(cfg["tive"].get("gradient_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"])
    depth = spec.tiny["num_hidden_layers"]
    layer_choices = {"all": None, f"last{1}": 1}
    if depth >= 4:
        layer_choices[f"last{depth // 2}"] = depth // 2
    chosen = {k: feature_layers(adapter, modules, v) for k, v in layer_choices.items()}
    projectors = {k: build_projector("kronecker", spec.proj_dim, seed, layer_shapes(v)) for k, v in chosen.items()}
    loaded = {
        name: {
            "whole": [next(iter(dm.pool_dataloader(b, batch_size=len(b)))) for b in spec_set["batches"]],
            "cut": [next(iter(dm.pool_dataloader(b, batch_size=len(b), max_length=spec_set["cut"])))
                    for b in spec_set["batches"]],
        }
        for name, spec_set in sets.items()
    }
    optimizer = torch.optim.AdamW([p for _, p in train_module.trainable_parameters()], lr=1e-3)
    train_module.train()

    def value(layers_key: str, batches: list, freeze: bool = True) -> Callable[[], float]:
        layers, projector = chosen[layers_key], projectors[layers_key]

        def run() -> float:
            start = time.perf_counter()
            with deterministic_train_mode(module), only_differentiating(adapter, layers, enabled=freeze):
                for batch in batches:
                    grads = per_example_grads(layers, projector, module.per_example_loss, batch)
                    grads.features.float().cpu().numpy()
            return time.perf_counter() - start

        return run

    def train(batches: list) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for batch in batches:
                total, count = per_example_nll(train_module(batch).logits, batch["labels"])
                (total.sum() / count.sum().clamp(min=1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        return run

    arms: dict[str, Callable[[], float]] = {}
    for name, data in loaded.items():
        cut = sets[name]["cut"]
        arms[f"{name}/full"] = value("all", data["whole"])
        for key in chosen:
            if key != "all":
                arms[f"{name}/gradient_layers={layer_choices[key]}"] = value(key, data["whole"])
        arms[f"{name}/gradient_layers=1,unfrozen"] = value("last1", data["whole"], freeze=False)
        arms[f"{name}/valuation_max_length={cut}"] = value("all", data["cut"])
        arms[f"{name}/both"] = value("last1", data["cut"])
        arms[f"{name}/train"] = train(data["whole"])
    for run in arms.values():  # untimed warm-up: allocations, AdamW state, projector matrices
        run()
    info = {
        "layers": depth, "gradient_modules": modules,
        "feature_dims": {k: sum(o * i for o, i in layer_shapes(v)) for k, v in chosen.items()},
    }
    return arms, info


def run_cost(args: argparse.Namespace, cfg: dict, dm: LlavaDataModule, specs: dict, batch_size: int) -> dict:
    """The --cost benchmark: per-round ratios of each cheaper setting's valuation time to the full one's."""
    seed = int(cfg["tive"].get("seed", 0))
    count = args.batches if args.batches > 1 else 4
    sets = cost_batch_sets(dm, batch_size, count, args.seed)
    rounds = args.rounds or 5
    result: dict[str, Any] = {"batch_sets": {
        name: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items() if k != "batches"}
        for name, s in sets.items()
    }}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        spec = specs[model]
        arms, info = cost_arms(spec, cfg, dm, sets, seed)
        times: dict[str, list[float]] = {name: [] for name in arms}
        names = list(arms)
        for r in range(rounds if model == "demo" else max(1, rounds // 2)):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                times[name].append(arms[name]())
        table: dict[str, dict] = {}
        for set_name in sets:
            full = times[f"{set_name}/full"]
            rows = {}
            for name, values in times.items():
                if name.startswith(set_name + "/"):
                    rows[name.split("/", 1)[1]] = {
                        "s_per_round": round(median(values), 4),
                        "vs_full": round(median([v / f for v, f in zip(values, full, strict=True)]), 3),
                    }
            table[set_name] = rows
        result[model] = {"info": info, "rounds": len(times[names[0]]), "arms": table}
        print(f"\n== {model}: {info['layers']} decoder layers, features over {info['gradient_modules']} "
              f"(dims {info['feature_dims']}), kronecker proj_dim {spec.proj_dim}; medians over "
              f"{len(times[names[0]])} rounds")
        for set_name, rows in table.items():
            s = sets[set_name]
            print(f"   {set_name}: {count} x {batch_size} examples, mean length {s['mean_length']:.1f}, mean answer "
                  f"{s['mean_answer_tokens']:.1f} tokens; cut {s['cut']} (half the longest: {s['half_of_longest']}"
                  f"{', raised to keep every answer' if s['raised_to_keep_answers'] else ''}) keeps "
                  f"{s['tokens_kept']:.3f} of the tokens ({s['padded_tokens_kept']:.3f} of the padded ones)")
            for arm, row in rows.items():
                print(f"     {arm:<34}{row['s_per_round']:>9.3f} s   {row['vs_full']:>6.3f} x full")
    return result


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and return its JSON summary (also printed as the last line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute version (fewer rounds and arms)")
    parser.add_argument("--rounds", type=int, default=None, help="demo-model rounds (default 12; quick 3)")
    parser.add_argument(
        "--wide-rounds", type=int, default=None, help="wide-model rounds (default 3; quick 1)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per batch (default: the demo config's valuation_batch_size, 32)",
    )
    parser.add_argument(
        "--batches", type=int, default=1, help="distinct batches per round (the same for both models)"
    )
    parser.add_argument(
        "--proj-dim",
        type=int,
        nargs="+",
        default=None,
        metavar="D",
        help="projection dim: one value for both models, or DEMO WIDE (default: demo config's 1024, and 8192)",
    )
    parser.add_argument(
        "--naive-examples",
        type=int,
        default=None,
        help="examples per batch in the batch-of-one loop (default: the whole batch for demo, 8 for wide; quick 16 / 4)",
    )
    parser.add_argument(
        "--models", default=None, help="comma-separated subset of demo,wide (default: both; with --cost: demo)"
    )
    parser.add_argument(
        "--wide-finetune",
        choices=["full", "lora"],
        default="full",
        help="main fine-tuning of the wide model's training arm",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0 keeps torch's default). See docs/benchmarks.md for why 1.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="after timing, print a torch.profiler summary per arm"
    )
    parser.add_argument("--profile-top", type=int, default=12)
    parser.add_argument(
        "--cost", action="store_true",
        help="time the cheaper-valuation settings (gradient_layers, valuation_max_length) instead, ~1-2 min",
    )
    args = parser.parse_args(argv)

    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_demo_config()
    tive = cfg["tive"]
    batch_size = args.batch_size or int(tive.get("valuation_batch_size") or cfg["data"]["batch_size"])
    dims = args.proj_dim or [int(tive["proj_dim"]), 8192]
    if len(dims) > 2:
        parser.error("--proj-dim takes one value (both models) or two (demo, wide)")
    demo_dim, wide_dim = (dims[0], dims[0]) if len(dims) == 1 else (dims[0], dims[1])
    rounds = args.rounds or (3 if args.quick else 12)
    wide_rounds = args.wide_rounds or (1 if args.quick else 3)
    naive_demo = args.naive_examples or (16 if args.quick else batch_size)
    naive_wide = args.naive_examples or (4 if args.quick else 8)
    args.models = args.models or ("demo" if args.cost else "demo,wide")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not set(models) <= {"demo", "wide"} or not models:
        parser.error("--models must be a subset of demo,wide")

    demo_lora = dict(tive["reference_lora"])
    specs = {
        "demo": ModelSpec(
            name="demo",
            tiny={**vars(TinyLlavaConfig()), **(cfg["model"].get("tiny") or {})},
            lora=demo_lora,
            proj_dim=demo_dim,
            finetune=cfg["model"]["finetune"],
            projectors=["identity", "rademacher", "kronecker"],
            naive_projectors=["identity", "rademacher", "kronecker"],
            estimate_rademacher=False,
            rounds=rounds,
            naive_examples=min(naive_demo, batch_size),
        ),
        "wide": ModelSpec(
            name="wide",
            tiny={**vars(TinyLlavaConfig()), **WIDE_TINY},
            lora=dict(WIDE_LORA),
            proj_dim=wide_dim,
            finetune=args.wide_finetune,
            projectors=["kronecker"] if args.quick else ["identity", "kronecker"],
            naive_projectors=["kronecker"] if args.quick else ["identity", "kronecker"],
            estimate_rademacher=not args.quick,
            rounds=wide_rounds,
            naive_examples=min(naive_wide, batch_size),
        ),
    }
    clock = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_valuation_") as tmp:
        probe = LlavaModule(tiny=TinyLlavaConfig(**specs["demo"].tiny), finetune="full")  # for its processor
        dm = LlavaDataModule(
            demo=DemoConfig(**(cfg["data"].get("demo") or {})),
            batch_size=batch_size,
            max_length=int(cfg["data"]["max_length"]),
            output_dir=tmp,
        )
        dm.attach_processor(probe.processor)
        dm.setup("fit")
        del probe
        if args.cost:
            result = {"cost": run_cost(args, cfg, dm, specs, batch_size)}
            result["meta"] = {
                "threads": torch.get_num_threads(), "nproc": os.cpu_count(), "cpu": cpu_model(),
                "torch": torch.__version__, "batch_size": batch_size,
                "loadavg_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
                "wall_s": round(time.perf_counter() - clock, 1),
            }
            print(json.dumps(result))
            return result
        pool_batches = pick_batches(dm, batch_size, args.batches, args.seed)
        loader_ms = loader_ms_per_example(dm, pool_batches)
        benches = [build_bench(specs[m], cfg, dm, pool_batches, int(tive.get("seed", 0))) for m in models]
        setup_s = time.perf_counter() - clock
        print(
            f"set-up {setup_s:.1f} s; torch threads {torch.get_num_threads()} (default {default_threads}); "
            f"batch {batch_size} x {args.batches}; loader {loader_ms:.2f} ms/example (excluded from the arms)"
        )
        for bench, r in schedule(benches):
            start = time.perf_counter()
            run_round(bench, r)
            print(
                f"  {bench.spec.name} round {r + 1}/{bench.spec.rounds}: {time.perf_counter() - start:.1f} s",
                flush=True,
            )
        summaries = {b.spec.name: summarise(b) for b in benches}
        for bench in benches:
            print_table(bench, summaries[bench.spec.name])
        if args.profile:
            for bench in benches:
                profile(bench, args.profile_top)

    result: dict[str, Any] = {}
    if "demo" in summaries:
        result.update(headline(summaries["demo"]))
    if "wide" in summaries:
        result["wide"] = headline(summaries["wide"])
    per_projector = {
        name: {
            kind: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for kind, row in s["projectors"].items()
        }
        for name, s in summaries.items()
    }
    result["meta"] = {
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "default_threads": default_threads,
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "batch_size": batch_size,
        "batches_per_round": args.batches,
        "rounds": {b.spec.name: b.spec.rounds for b in benches},
        "proj_dim": {b.spec.name: b.spec.proj_dim for b in benches},
        "training_finetune": {b.spec.name: b.spec.finetune for b in benches},
        "training_ex_s": {n: round(s["training_ex_s"], 3) for n, s in summaries.items()},
        "per_projector": per_projector,
        "loader_ms_per_example": round(loader_ms, 3),
        "loadavg_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - clock, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
