"""Per-example cost of the rademacher and kronecker projectors on a LLaVA-7B-width adapter (CPU).

The adapter is the TIVE reference LoRA of LLaVA-1.5-7B's language model: hidden 4096, r=128 on
q, k, v, o, so every transformer layer holds 8 linear layers (``lora_A`` 128x4096, ``lora_B``
4096x128) and 4,194,304 gradient coordinates; 32 layers make 134,217,728. Both projectors are built
for the whole 32-layer adapter at ``proj_dim`` 8192 (so kronecker's shares are the 7B ones), and only
the first 2 transformer layers (16 linear layers) are run:

* ``kronecker``: every one of the 16 ``project_layer`` calls, from random layer inputs and
  output-gradients of ``--tokens`` (1024) tokens per example, as the gradient engine calls it;
* ``rademacher``: ``--blocks`` blocks of ``block_size`` (8192) coordinates through the real
  ``project_layer`` path (a one-layer projector of that many coordinates, same seed, ``proj_dim``
  and block size; every block costs the same), scaled by coordinates to the 2 layers. A full
  2-layer run would draw 1024 blocks of 8192 x 8192 signs per batch (minutes on this CPU).

For comparison it also times one block drawn the previous way (``torch.randint`` with a seeded CPU
generator, without the host-to-device copy a GPU run added). "32 layers" is the 2-layer figure times 16 (every transformer layer has the same 8 shapes).
Projection only: the forward/backward and the exact norms are the engine's and are not included.
Each figure is the fastest of ``--rounds`` rounds. The script also prints
:func:`estimate_projection_cost` for both projectors, the estimate a run would print before
valuation. Prints a table and, last, one JSON line::

    python scripts/bench_projection.py            # ~10-30 s on a 2-core CPU
    python scripts/bench_projection.py --quick    # ~5 s: one rademacher block, one round

Not a test: pytest does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_tive.tive.projection import (  # noqa: E402
    KroneckerProjector,
    RademacherProjector,
    estimate_projection_cost,
    format_projection_cost,
)

HIDDEN, RANK, MODULES = 4096, 128, ("q", "k", "v", "o")


def adapter_shapes(layers: int) -> list[tuple[int, int]]:
    """(d_out, d_in) of every LoRA linear layer, in module order: A then B for q, k, v, o of each layer."""
    return [shape for _ in range(layers) for _ in MODULES for shape in ((RANK, HIDDEN), (HIDDEN, RANK))]


def best_of(rounds: int, fn) -> float:
    """Fastest wall time of ``rounds`` calls of ``fn``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_kronecker(proj: KroneckerProjector, layers: int, batch: int, tokens: int, rounds: int) -> float:
    """Seconds per batch of ``project_layer`` over the first ``layers`` transformer layers, from factors."""
    gen = torch.Generator().manual_seed(0)
    count = 8 * layers
    shapes = proj.layer_shapes[:count]
    xs = {d: torch.randn(batch, tokens, d, generator=gen) for d in {i for _, i in shapes}}
    gos = {d: torch.randn(batch, tokens, d, generator=gen) for d in {o for o, _ in shapes}}
    out = torch.zeros(batch, proj.proj_dim)

    def run() -> None:
        for layer, (o, i) in enumerate(shapes):
            proj.project_layer(out, layer, inputs=xs[i], grad_outputs=gos[o])

    run()  # warm-up: draws and caches the kronecker factors, as the first batch of a run does
    return best_of(rounds, run)


def time_rademacher_blocks(proj_dim: int, block_size: int, blocks: int, batch: int, rounds: int) -> float:
    """Seconds per batch for ``blocks`` blocks through ``RademacherProjector.project_layer``."""
    rows = block_size * blocks
    proj = RademacherProjector(proj_dim, 0, [(1, rows)], block_size=block_size, cache_bytes=0)
    grad = torch.randn(batch, 1, rows, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(batch, proj_dim)
    proj.project_layer(out, 0, grad=grad[:, :, :32])  # warm-up on a tiny slice
    return best_of(rounds, lambda: proj.project_layer(out, 0, grad=grad))


def time_cpu_generator_block(proj_dim: int, block_size: int, rounds: int) -> float:
    """Seconds to draw one block with a seeded CPU ``torch.Generator`` (the previous implementation's draw)."""

    def draw() -> None:
        gen = torch.Generator().manual_seed(0)
        torch.randint(0, 2, (block_size, proj_dim), generator=gen, dtype=torch.float32).mul_(2).sub_(1)

    return best_of(rounds, draw)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and the JSON line, and return the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--layers", type=int, default=2, help="transformer layers measured (default 2)")
    parser.add_argument(
        "--blocks", type=int, default=None, help="rademacher blocks timed (default 3; 1 quick)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 2; 1 quick)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    blocks = args.blocks or (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter()

    full = adapter_shapes(32)
    kron = KroneckerProjector(args.proj_dim, 0, full)
    rade = RademacherProjector(args.proj_dim, 0, full)
    dims_measured = sum(o * i for o, i in full[: 8 * args.layers])
    scale_32 = 32 / args.layers
    print(
        f"LLaVA-7B-width attention LoRA r={RANK}: {rade.full_dim:,} dims over 32 layers "
        f"({dims_measured:,} in the {args.layers} measured); proj_dim {args.proj_dim}, T={args.tokens}, "
        f"rademacher block {rade.block_size} coordinates, {args.threads} torch thread(s)"
    )
    rows, per_batch = [], {}
    for batch in args.batch_sizes:
        kron_s = time_kronecker(kron, args.layers, batch, args.tokens, rounds)
        timed_s = time_rademacher_blocks(args.proj_dim, rade.block_size, blocks, batch, rounds)
        rade_s = timed_s * dims_measured / (rade.block_size * blocks)
        entry = {
            "kronecker_s_per_example": {"2_layers": kron_s / batch, "32_layers": kron_s * scale_32 / batch},
            "rademacher_s_per_example": {"2_layers": rade_s / batch, "32_layers": rade_s * scale_32 / batch},
            "rademacher_s_per_block": timed_s / blocks,
            "ratio_rademacher_over_kronecker": rade_s / kron_s,
        }
        per_batch[str(batch)] = entry
        rows.append((batch, entry))

    print(
        f"\n{'B':>3} | {'kronecker s/ex (2 L)':>21} | {'rademacher s/ex (2 L)':>22} | {'ratio':>7} | "
        f"{'kronecker s/ex (32 L)':>22} | {'rademacher s/ex (32 L)':>23} | {'s/block':>8}"
    )
    for batch, e in rows:
        k, r = e["kronecker_s_per_example"], e["rademacher_s_per_example"]
        print(
            f"{batch:>3} | {k['2_layers']:>21.4g} | {r['2_layers']:>22.4g} | "
            f"{e['ratio_rademacher_over_kronecker']:>7.0f} | {k['32_layers']:>22.4g} | "
            f"{r['32_layers']:>23.4g} | {e['rademacher_s_per_block']:>8.3g}"
        )
    print(
        f"(rademacher: {blocks} block(s) of {rade.block_size} x {args.proj_dim} timed, scaled by coordinates; "
        f"32 L = 2 L x {scale_32:g})"
    )

    old_s = time_cpu_generator_block(args.proj_dim, rade.block_size, rounds)
    print(
        f"one block drawn by the counter-based generator: see s/block above (draw + matmul); "
        f"by a CPU torch.Generator (the previous implementation, before any host-to-device copy): {old_s:.3g} s"
    )

    estimates = {}
    batch = max(args.batch_sizes)
    print(f"\nestimate_projection_cost on the whole 32-layer adapter, B={batch}:")
    for proj in (kron, rade):
        est = estimate_projection_cost(proj, "cpu", batch_size=batch, tokens=args.tokens)
        estimates[proj.kind] = {
            k: est[k]
            for k in (
                "seconds_per_example",
                "seconds_per_batch",
                "random_entries_per_batch",
                "estimate_wall_s",
            )
        }
        print("  " + format_projection_cost(est) + f" [took {est['estimate_wall_s']:.2f} s]")

    summary = {
        "proj_dim": args.proj_dim,
        "tokens": args.tokens,
        "layers_measured": args.layers,
        "full_dim_measured": dims_measured,
        "full_dim_32_layers": rade.full_dim,
        "rademacher_block_size": rade.block_size,
        "rademacher_blocks_timed": blocks,
        "rademacher_random_entries_per_batch_32_layers": rade.full_dim * args.proj_dim,
        "cpu_generator_s_per_block": old_s,
        "rounds": rounds,
        "quick": args.quick,
        "batch": per_batch,
        "estimate_32_layers": estimates,
        "meta": {
            "threads": args.threads,
            "nproc": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "loadavg": list(os.getloadavg()),
        },
        "wall_s": round(time.perf_counter() - clock, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
