"""Benchmark TIVE selection (values, budgets, sampling) at pool scale on synthetic stored features.

Writes ``--n`` x ``--dim`` float16 features through :class:`FeatureStore` in chunks, then times
:func:`lightning_tive.tive.selection.select` reading them back from disk, i.e. the product's code
path. Prints readable lines and, last, one JSON object::

    python scripts/bench_selection.py --n 665000 --dim 8192 --tasks 10 [--compare-quadratic 20000]

``wall_s`` is the selection time (values + budgets + sampling, features read from disk);
``peak_rss_mb`` is the process's peak resident set size over the whole run, writing included.
With ``--compare-quadratic N`` the first N examples are also valued with the N x N formulation
(one cosine matrix per task, as in the authors' code) and with the streamed one, both in memory,
and ``quadratic_ratio`` = quadratic time / linear time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_tive.tive.selection import select  # noqa: E402
from lightning_tive.tive.store import FeatureStore  # noqa: E402
from lightning_tive.tive.values import instance_values  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_pool(n: int, tasks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Task ids (uneven task sizes) and gradient norms (task-dependent scale) for n examples."""
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.ones(tasks) * 2)
    task_ids = rng.choice(tasks, size=n, p=sizes)
    norms = rng.gamma(4.0, 0.25, n) * (0.5 + task_ids / tasks)
    norms[rng.choice(n, size=max(1, n // 10000), replace=False)] = np.nan  # a few non-finite examples
    return task_ids.astype(np.int64), norms.astype(np.float32)


def write_features(
    store: FeatureStore, task_ids: np.ndarray, norms: np.ndarray, tasks: int, seed: int
) -> None:
    """Fill the store chunk by chunk: a per-task direction plus noise, scaled to about the norm."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, store.proj_dim, generator=gen)
    scale = 1.0 / np.sqrt(store.proj_dim)
    for chunk in store.missing_chunks():
        start, stop = store.chunk_range(chunk)
        tid = torch.from_numpy(task_ids[start:stop])
        feats = torch.randn(stop - start, store.proj_dim, generator=gen).add_(centres[tid], alpha=0.7)
        nrm = torch.from_numpy(np.nan_to_num(norms[start:stop], nan=0.0))
        feats.mul_((nrm * scale)[:, None])
        store.write_chunk(chunk, np.arange(start, stop), feats.half(), norms[start:stop])


def quadratic_values(
    feats: torch.Tensor, task_ids: np.ndarray, num_tasks: int, finite: np.ndarray
) -> np.ndarray:
    """Instance values from one full cosine matrix per task (the O(|T|^2 d) formulation)."""
    unit = torch.nn.functional.normalize(feats.float(), dim=1)
    out = np.full(feats.shape[0], np.nan)
    for t in range(num_tasks):
        members = torch.from_numpy(np.flatnonzero((task_ids == t) & finite))
        if members.numel():
            sub = unit[members]
            out[members.numpy()] = (sub @ sub.T).mean(dim=1).double().numpy()
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and return its JSON summary (also printed as the last line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=665000, help="pool size")
    parser.add_argument("--dim", type=int, default=8192, help="feature dimension (proj_dim)")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--compare-quadratic", type=int, default=0, metavar="N")
    parser.add_argument(
        "--workdir", type=str, default=None, help="where to write features (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the feature files")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--block-rows", type=int, default=16384)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--sampling", default="softmax")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for writing and the N x N product (default: torch's)",
    )
    parser.add_argument(
        "--select-threads", type=int, default=1, help="threads for the streamed passes (select's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    summary: dict = {
        "n": args.n,
        "dim": args.dim,
        "tasks": args.tasks,
        "threads": torch.get_num_threads(),
        "select_threads": args.select_threads,
    }
    root = Path(tempfile.mkdtemp(prefix="tive_bench_", dir=args.workdir))
    try:
        task_ids, norms = synthetic_pool(args.n, args.tasks, args.seed)
        names = [f"task{i}" for i in range(args.tasks)]
        store = FeatureStore(root / "features", args.n, args.dim, "float16", args.chunk_size)
        t0 = time.perf_counter()
        write_features(store, task_ids, norms, args.tasks, args.seed)
        summary["write_s"] = round(time.perf_counter() - t0, 2)
        size_gb = (root / "features" / FeatureStore.FEATURES).stat().st_size / 1e9
        print(f"wrote {args.n} x {args.dim} float16 features ({size_gb:.2f} GB) in {summary['write_s']} s")
        summary["features_gb"] = round(size_gb, 2)
        summary["rss_after_write_mb"] = round(peak_rss_mb(), 1)

        t0 = time.perf_counter()
        reader = FeatureStore.open(root / "features")
        result = select(
            reader.read_norms(),
            reader,
            task_ids,
            names,
            ratio=args.ratio,
            sampling=args.sampling,
            temperature=args.temperature,
            seed=args.seed,
            block_rows=args.block_rows,
            num_threads=args.select_threads,
        )
        summary["wall_s"] = round(time.perf_counter() - t0, 2)
        summary.update({k: round(v, 2) for k, v in result.timings.items()})
        summary["budget"] = result.budget
        summary["selected"] = int(result.selected_indices.size)
        print(
            f"selection (values + budget + sampling, from disk): {summary['wall_s']} s "
            f"[{', '.join(f'{k} {v:.2f}' for k, v in result.timings.items())}]; "
            f"budget {result.budget}, selected {result.selected_indices.size}"
        )
        for row in result.tasks:
            print(
                f"  {row.task}: size {row.size}, value {row.task_value:.4f}, "
                f"budget {row.budget}, selected {row.selected}"
            )

        if args.compare_quadratic:
            m = min(args.compare_quadratic, args.n)
            feats = torch.from_numpy(reader.read_rows(0, m))
            t0 = time.perf_counter()
            linear, _ = instance_values(
                feats, task_ids[:m], args.tasks, np.isfinite(norms[:m]), num_threads=args.select_threads
            )
            linear_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            quad = quadratic_values(feats, task_ids[:m], args.tasks, np.isfinite(norms[:m]))
            quad_s = time.perf_counter() - t0
            ok = np.isfinite(linear)
            summary.update(
                quadratic_n=m,
                quadratic_s=round(quad_s, 3),
                linear_s=round(linear_s, 3),
                quadratic_ratio=round(quad_s / linear_s, 2),
                max_abs_diff=float(np.max(np.abs(linear[ok] - quad[ok]))),
            )
            print(
                f"N={m}: N x N per task {quad_s:.2f} s vs streamed {linear_s:.2f} s "
                f"(x{quad_s / linear_s:.1f}); max |diff| {summary['max_abs_diff']:.2e}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
