"""Data set-up and padding at LLaVA-665K scale, on a synthetic pool, measured side by side in one run.

1. Set-up time and peak RSS of `LlavaDataModule.setup` on a synthetic 665K-record JSON (LLaVA-665K's task
   mix and per-task text lengths, images on disk), each in a fresh process:
   - `before`: the code at `--before` (a git revision, checked out into a temporary worktree): every
     process parses the JSON, checks every image path, tokenises every record and dumps every record
     again for the pool fingerprint;
   - `first`: this code, the first process on a node (builds the index: parse, check, tokenise, write);
   - `warm`: this code, every other process and every restart (maps the index).
2. Padding efficiency (real tokens / padded tokens) of the training batches and the valuation
   batches, on the synthetic pool's token lengths (image records hold 576 image tokens, as
   LLaVA-1.5-7B's CLIP-L/14-336) and on the demo pool: a shuffled DistributedSampler against the
   length-grouped distributed sampler (megabatches of 50 global batches) and LLaVA's own grouping
   (megabatches of one global batch), and valuation in pool order against length-sorted shards.

    python scripts/bench_data.py                         # 665K records, 8 processes x batch 16, valuation batch 8
    python scripts/bench_data.py --records 20000 --quick # a smoke run (tests/test_bench_data.py)

The last line printed is a JSON summary of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# LLaVA-1.5's mix665k by source (LLaVA-1.5 paper, Table 7), and rough text tokens per record:
# (records, mean text tokens, spread) with text-only ShareGPT long-tailed up to 2,048.
MIX = {
    "llava_instruct": (158_000, 260, 0.45, "coco/train2017"),
    "sharegpt": (40_000, 700, 0.9, None),
    "vqav2": (83_000, 150, 0.35, "coco/train2017"),
    "gqa": (72_000, 140, 0.35, "gqa/images"),
    "okvqa": (9_000, 45, 0.3, "coco/train2017"),
    "ocr_vqa": (80_000, 110, 0.3, "ocr_vqa/images"),
    "aokvqa": (66_000, 90, 0.3, "coco/train2017"),
    "textcaps": (22_000, 40, 0.3, "textvqa/train_images"),
    "refcoco": (48_000, 230, 0.4, "coco/train2017"),
    "vg": (86_000, 220, 0.4, "vg/VG_100K"),
}
IMAGE_TOKENS = 576
MAX_LENGTH = 2048
WORDS = "the a of red blue small large left right image shows what is where how many color shape person car dog".split()


def synthetic_lengths(records: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Signed token lengths (negative: text-only) and the task of each record, in LLaVA-665K's proportions."""
    rng = np.random.default_rng(seed)
    total = sum(m[0] for m in MIX.values())
    lengths, tasks = [], []
    for task, (count, mean, spread, folder) in MIX.items():
        n = max(1, round(records * count / total))
        text = np.clip(rng.lognormal(np.log(mean), spread, n).astype(np.int64), 8, MAX_LENGTH)
        if folder is None:
            lengths.append(-text)
        else:
            lengths.append(np.minimum(text + IMAGE_TOKENS, MAX_LENGTH))
        tasks += [task] * n
    order = rng.permutation(len(tasks))
    return np.concatenate(lengths)[order], [tasks[i] for i in order]


def write_pool(folder: Path, records: int) -> Path:
    """A LLaVA-format JSON of synthetic records (words standing for tokens) and a few real images."""
    from PIL import Image

    path = folder / f"mix{records}.json"
    if path.exists():
        return path
    lengths, tasks = synthetic_lengths(records)
    rng = np.random.default_rng(1)
    for _task, (_, _, _, sub) in MIX.items():
        if sub is not None:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            for k in range(4):
                Image.new("RGB", (32, 32), (40 * k, 80, 120)).save(folder / sub / f"{k:012d}.jpg")
    out = []
    for i, (length, task) in enumerate(zip(lengths, tasks, strict=True)):
        words = max(4, (abs(int(length)) - (IMAGE_TOKENS if length > 0 else 0)) // 2)
        text = " ".join(rng.choice(WORDS, size=words))
        cut = max(1, words // 4)
        question, answer = " ".join(text.split()[:cut]), " ".join(text.split()[cut:])
        record = {"id": f"{task}-{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if length > 0 else "") + question + "?"},
            {"from": "gpt", "value": answer}]}
        if length > 0:
            record["image"] = f"{MIX[task][3]}/{i % 4:012d}.jpg"
        out.append(record)
    path.write_text(json.dumps(out))
    return path


SETUP_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.model import LlavaModule, TinyLlavaConfig
processor = LlavaModule(tiny=TinyLlavaConfig(max_position_embeddings=2048)).processor
def hwm_mb():  # VmHWM: a child started by fork + exec inherits its parent's ru_maxrss
    return [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
base = hwm_mb()
dm = LlavaDataModule(train_path=sys.argv[2], image_folder=sys.argv[3], max_length=2048, on_bad_record="skip",
                     output_dir=sys.argv[4], **json.loads(sys.argv[5]))
dm.attach_processor(processor)
start = time.perf_counter()
dm.setup("fit")
from lightning_tive.feature_folder import pool_fingerprint
digest = pool_fingerprint(dm)
seconds = time.perf_counter() - start
print(json.dumps({"setup_s": seconds, "pool": dm.pool_size, "rss_growth_mb": hwm_mb() - base, "digest": digest}))
"""


def run_setup(repo: Path, pool: Path, work: Path, extra: dict) -> dict:
    """One set-up in a fresh process, importing lightning_tive from `repo`."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "LIGHTNING_TIVE_CACHE": str(work / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", SETUP_CHILD, str(repo), str(pool), str(pool.parent), str(work / "out"), json.dumps(extra)],
        cwd=repo, env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkout(revision: str, into: Path) -> Path:
    """A worktree of `revision` (the code before the index)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(into), revision], cwd=ROOT, check=True,
                   capture_output=True)
    return into


def padding_table(lengths: np.ndarray, world: int, batch: int, valuation_batch: int, chunk: int) -> dict:
    """Padding efficiency: training (shuffled, grouped, LLaVA's sampler) and valuation (pool order vs sorted shards).

    `training_*`: real tokens / padded tokens over every process's batches. `training_lockstep_*`: under
    FSDP (or ZeRO-3) every step waits for its slowest process, so real tokens / (processes x the
    step's longest batch in tokens).
    """
    from lightning_tive.data.sampling import epoch_plan, padding_efficiency, rank_batches
    from lightning_tive.tive.store import shard_indices

    def steps_of(group: bool) -> list[list[np.ndarray]]:
        plan = epoch_plan(lengths, batch, world, seed=0, epoch=0, group_by_length=group)
        per_rank = [rank_batches(plan, world, r) for r in range(world)]
        return [[per_rank[r][s] for r in range(world)] for s in range(len(plan))]

    def llava_steps() -> list[list[np.ndarray]]:
        """LLaVA's LengthGroupedSampler: megabatches of one global batch sorted by length, dealt to the
        processes by `split_to_even_chunks` (each index to the process with the fewest tokens so far)."""
        plan = epoch_plan(lengths, batch, world, seed=0, epoch=0, group_by_length=True, megabatch_factor=1)
        steps = []
        for global_batch in plan:
            if len(global_batch) % world:
                steps.append([global_batch[r::world] for r in range(world)])
                continue
            chunks, totals = [[] for _ in range(world)], [0] * world
            for index in global_batch:
                open_ = [r for r in range(world) if len(chunks[r]) < len(global_batch) // world]
                r = min(open_, key=lambda k: totals[k])
                chunks[r].append(index)
                totals[r] += abs(int(lengths[index]))
            steps.append([np.asarray(c, dtype=np.int64) for c in chunks])
        return steps

    def per_batch(steps: list[list[np.ndarray]]) -> float:
        return padding_efficiency([b for step in steps for b in step], lengths)

    def paced(steps: list[list[np.ndarray]]) -> float:
        real = sum(int(np.abs(lengths[b]).sum()) for step in steps for b in step)
        slowest = sum(len(step) * max(len(b) * int(np.abs(lengths[b]).max()) for b in step if len(b)) for step in steps)
        return real / slowest

    def valuation(sorted_shards: bool) -> float:
        batches = []
        for rank in range(world):
            if sorted_shards:
                rows = shard_indices(len(lengths), world, rank, np.abs(lengths))
            else:  # the old layout: whole chunks dealt round-robin, each valued in pool order
                rows = np.concatenate([np.arange(c, min(c + chunk, len(lengths)))
                                       for c in range(rank * chunk, len(lengths), world * chunk)] or [np.zeros(0, int)])
            batches += [rows[k : k + valuation_batch] for k in range(0, len(rows), valuation_batch)]
        return padding_efficiency(batches, lengths)

    shuffled, grouped, llava = steps_of(False), steps_of(True), llava_steps()
    return {
        "training_shuffled": per_batch(shuffled), "training_grouped": per_batch(grouped),
        "training_llava_sampler": per_batch(llava),
        "training_lockstep_shuffled": paced(shuffled), "training_lockstep_grouped": paced(grouped),
        "training_lockstep_llava_sampler": paced(llava),
        "valuation_pool_order": valuation(False), "valuation_sorted_shards": valuation(True),
    }


def demo_lengths() -> np.ndarray:
    """Signed token lengths of the demo pool under the demo config's tokenizer and template."""
    from lightning_tive.data.datamodule import LlavaDataModule
    from lightning_tive.data.demo import DemoConfig
    from lightning_tive.model import LlavaModule, TinyLlavaConfig

    dm = LlavaDataModule(demo=DemoConfig(), max_length=256, output_dir=tempfile.mkdtemp())
    dm.attach_processor(LlavaModule(tiny=TinyLlavaConfig()).processor)
    dm.setup("fit")
    return np.where(dm.pool.has_image, dm.pool.lengths, -dm.pool.lengths)


def main(argv: list[str] | None = None) -> dict:
    """Run both benchmarks; print tables and a JSON summary line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--before", default="88c9845",
                        help="git revision of the code before the data index; `none` skips that arm")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--valuation-batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--work", default=None, help="folder for the pool and caches (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="skip the demo pool's padding (a smoke run)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"records": args.records}

    lengths, _ = synthetic_lengths(args.records)
    result["padding_synthetic"] = padding_table(lengths, args.world, args.batch, args.valuation_batch, args.chunk)
    if not args.quick:
        demo = demo_lengths()
        result["padding_demo"] = padding_table(demo, 1, 16, 32, 1024)  # the demo config: 1 process, batch 16

    start = time.perf_counter()
    pool = write_pool(work, args.records)
    result["pool_written_s"] = time.perf_counter() - start
    before = None
    if args.before != "none":
        before = work / "before"
        if not before.exists():
            checkout(args.before, before)
        result["setup_before"] = run_setup(before, pool, work / "b", {"check_lengths": True})
    result["setup_first"] = run_setup(ROOT, pool, work / "n", {})
    result["setup_warm"] = run_setup(ROOT, pool, work / "n", {})
    f, w = result["setup_first"], result["setup_warm"]
    result["ratios"] = {"warm_over_first_s": w["setup_s"] / f["setup_s"]}
    if before is not None:
        b = result["setup_before"]
        result["ratios"].update(
            first_over_before_s=f["setup_s"] / b["setup_s"], warm_over_before_s=w["setup_s"] / b["setup_s"],
            warm_over_before_rss=w["rss_growth_mb"] / max(b["rss_growth_mb"], 1e-9),
        )
    print(f"pool: {args.records} synthetic records ({result['pool_written_s']:.0f} s to write)")
    for name in ("before", "first", "warm"):
        if f"setup_{name}" in result:
            r = result[f"setup_{name}"]
            print(f"  setup {name:6s}: {r['setup_s']:8.1f} s, peak RSS growth {r['rss_growth_mb']:8.0f} MB, pool {r['pool']}")
    for name in ("padding_synthetic", "padding_demo"):
        if name in result:
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[name].items()))
    if before is not None:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
