"""LlavaDataModule: the pool, the held-out split, and the index API that TIVE drives."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_tive.data.dataset import Encoder, IndexView, LlavaCollator, LlavaDataset, Pool
from lightning_tive.data.demo import DemoConfig
from lightning_tive.data.images import ImageTransform, image_token_count
from lightning_tive.data.index import DataIndex, IndexSpec, build_index
from lightning_tive.data.records import BadRecordPolicy, SkipLog, apply_policy
from lightning_tive.data.sampling import (
    ResumableDistributedSampler,
    epoch_plan,
    padding_efficiency,
    rank_batches,
)
from lightning_tive.data.tasks import TaskLabeller
from lightning_tive.data.template import IGNORE_INDEX, build_template
from lightning_tive.paths import default_cache_root

EvalKind = Literal["exact_match", "token_f1", "loss_only"]
SHORT_ANSWER_WORDS = 4  # held-out answers up to this many words are scored by exact match


class LlavaDataModule(L.LightningDataModule):
    """LLaVA-format data for Lightning, with the pool-index API TIVE needs.

    Args:
        train_path: LLaVA JSON / JSON Lines training pool (required unless `demo` is set).
        image_folder: root that records' `image` paths are relative to.
        val_path: held-out records; otherwise `val_ratio` of each task is held out (seeded).
        val_ratio: fraction of each task held out when no `val_path` is given.
        max_length: token limit per example, image tokens included.
        batch_size: per-device training batch size.
        eval_batch_size: per-device validation batch size (defaults to `batch_size`).
        num_workers: DataLoader workers.
        on_bad_record: `raise` stops at the first bad record; `skip` logs it to skipped.jsonl.
        task_rules: user task rules, `[{task, image_regex?, prompt_regex?}]`, first match wins.
        image_aspect_ratio: `pad` (LLaVA-1.5), `resize`, or `crop` (processor default).
        template: conversation template, `vicuna_v1` (LLaVA-1.5) or `chat` (tokenizer's own).
        demo: generate and use the built-in demo mixture; null for real data.
        output_dir: where skipped.jsonl goes (defaults to the trainer's log dir).
        seed: seed for the held-out split (and the cap on it), fixed across a run's seeds.
        shuffle_seed: seed of the training order; None follows the run's seed (`seed_everything`),
            so runs with another seed see another order over the same held-out split.
        group_by_length: LLaVA's group-by-modality-length batching, for throughput.
        index_dir: where the data indexes (records parsed, checked and tokenised once) are cached;
            null: `<LIGHTNING_TIVE_CACHE>/index`. Delete an index folder to check the images again.
        max_val_per_task: cap on held-out examples per task (keeps validation quick).
        task_eval_kinds: per-task metric (`exact_match`, `token_f1`, `loss_only`); others are inferred.
    """

    def __init__(
        self,
        train_path: str | None = None,
        image_folder: str | None = None,
        val_path: str | None = None,
        val_ratio: float = 0.0,
        max_length: int = 2048,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_bad_record: BadRecordPolicy = "raise",
        task_rules: list[dict] | None = None,
        image_aspect_ratio: Literal["pad", "resize", "crop"] = "pad",
        template: str = "vicuna_v1",
        demo: DemoConfig | None = None,
        output_dir: str | None = None,
        seed: int = 0,
        shuffle_seed: int | None = None,
        group_by_length: bool = False,
        index_dir: str | None = None,
        max_val_per_task: int | None = None,
        task_eval_kinds: dict[str, EvalKind] | None = None,
    ):
        super().__init__()
        if on_bad_record not in ("raise", "skip"):
            raise ValueError(f"data.on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
        if not 0.0 <= val_ratio < 1.0:
            raise ValueError(f"data.val_ratio must be in [0, 1), got {val_ratio}")
        if train_path is None and demo is None:
            raise ValueError("data.train_path is required when data.demo is null")
        if image_aspect_ratio not in ("pad", "resize", "crop"):
            raise ValueError(f"data.image_aspect_ratio must be pad|resize|crop, got {image_aspect_ratio!r}")
        self.train_path, self.image_folder, self.val_path = train_path, image_folder, val_path
        self.val_ratio, self.max_length = val_ratio, max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.on_bad_record = num_workers, on_bad_record
        self.labeller = TaskLabeller(task_rules or [])
        self.image_aspect_ratio, self.template_name, self.demo = image_aspect_ratio, template, demo
        self.output_dir, self.seed, self.group_by_length = output_dir, seed, group_by_length
        self.shuffle_seed = shuffle_seed
        self.index_dir, self.max_val_per_task = index_dir, max_val_per_task
        self.task_eval_kinds = dict(task_eval_kinds or {})
        self.processor: Any = None
        self.pool: Pool | None = None
        self.val_pool: Pool | None = None
        self.train_indices: np.ndarray | None = None
        self.skip_log: SkipLog | None = None
        self._dataset: LlavaDataset | None = None
        self._val_dataset: LlavaDataset | None = None
        self._train_sampler: ResumableDistributedSampler | None = None
        self._order_seed: int | None = None  # the training order's seed, once restored from a checkpoint
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) restored from a checkpoint

    # ---------------------------------------------------------------- set-up
    def attach_processor(self, processor: Any) -> None:
        """Give the DataModule the model's processor (the CLI does this through the trainer)."""
        self.processor = processor

    def _resolve_processor(self) -> Any:
        if self.processor is None and self.trainer is not None:
            self.processor = getattr(self.trainer.lightning_module, "processor", None)
        if self.processor is None:
            raise RuntimeError(
                "LlavaDataModule has no processor: run it under a Trainer whose LightningModule has "
                "`.processor`, or call `attach_processor(processor)` first"
            )
        return self.processor

    def _output_dir(self) -> Path | None:
        if self.output_dir is not None:
            return Path(self.output_dir)
        if self.trainer is not None:
            return Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return None  # outside a run with no output_dir: skips are reported as warnings only

    def _is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def prepare_data(self) -> None:
        """Generate the demo mixture and build the data indexes: once per node, before any process reads them."""
        self._configure(self._resolve_processor())
        for path in (self.train_path, self.val_path):
            if path is not None:
                self._index(path)

    def _configure(self, processor: Any) -> None:
        """The record files (the demo's, when set), the encoder and the image transform."""
        if self.demo is not None:
            from lightning_tive.data.demo import ensure_demo

            paths = ensure_demo(self.demo)
            self.train_path, self.val_path = str(paths.train_json), str(paths.val_json)
            self.image_folder = str(paths.image_folder)
        tokenizer = processor.tokenizer
        self.encoder = Encoder(
            tokenizer=tokenizer,
            template=build_template(self.template_name, tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids(processor.image_token),
            num_image_tokens=image_token_count(processor),
            max_length=self.max_length,
        )
        self.image_transform = ImageTransform(processor.image_processor, self.image_aspect_ratio)

    def _index(self, path: str) -> DataIndex:
        """The index of a record file, built now unless a process built it before."""
        root = Path(self.index_dir).expanduser() if self.index_dir else default_cache_root() / "index"
        spec = IndexSpec(
            source=path, image_folder=self.image_folder, template=self.template_name, max_length=self.max_length,
            image_token_id=self.encoder.image_token_id, num_image_tokens=self.encoder.num_image_tokens,
            task_rules=tuple((r.task, r.image_regex, r.prompt_regex) for r in self.labeller.rules),
        )
        return DataIndex(build_index(root, spec, self.encoder.tokenizer, self.encoder.encode, self.labeller.label))

    def setup(self, stage: str | None = None) -> None:
        """Map the indexes, apply the bad-record policy, build the pool and the held-out split (once)."""
        if self.pool is not None:
            return
        self._configure(self._resolve_processor())
        out = self._output_dir()
        skipped_path = out / "skipped.jsonl" if out is not None else None
        if self._is_global_zero() and skipped_path is not None and skipped_path.exists():
            skipped_path.unlink()  # a fresh run re-checks everything and rewrites the list
        self.skip_log = SkipLog(skipped_path, write_setup=self._is_global_zero())

        pool = self._build_pool(self.train_path, stage="train")
        if self.val_path is not None:
            val_pool = self._build_pool(self.val_path, stage="val")
        elif self.val_ratio > 0:
            pool, val_pool = self._split_held_out(pool)
        else:
            val_pool = None
        names = sorted(set(pool.task_names) | set(val_pool.task_names if val_pool else []))
        self.pool = _relabel(pool, names)
        self.val_pool = _relabel(val_pool, names) if val_pool is not None else None
        if self.val_pool is not None and self.max_val_per_task:
            self.val_pool = _cap_per_task(self.val_pool, self.max_val_per_task, self.seed)
        if self.train_indices is None:
            self.train_indices = np.arange(len(self.pool), dtype=np.int64)
        self._dataset = self._dataset_for(self.pool)
        self._val_dataset = self._dataset_for(self.val_pool, with_prompts=True) if self.val_pool is not None else None
        counts = Counter(self.pool.task_of(i) for i in range(len(self.pool)))
        rank_zero_info(
            f"[lightning_tive] pool: {len(self.pool)} examples in {len(counts)} tasks {dict(sorted(counts.items()))}; "
            f"held out: {len(self.val_pool) if self.val_pool else 0}; skipped: {self.skip_log.count}"
            + (f" (listed in {skipped_path})" if self.skip_log.count and skipped_path is not None else "")
        )
        if counts.get("unknown"):
            rank_zero_info(f"[lightning_tive] {counts['unknown']} pool examples matched no task rule: task 'unknown'")

    def _dataset_for(self, pool: Pool, with_prompts: bool = False) -> LlavaDataset:
        return LlavaDataset(
            pool=pool,
            encoder=self.encoder,
            image_transform=self.image_transform,
            image_folder=self.image_folder,
            on_bad_record=self.on_bad_record,
            skip_log=self.skip_log,
            with_prompts=with_prompts,
        )

    def _build_pool(self, path: str, stage: str) -> Pool:
        index = self._index(path)
        apply_policy(index.problems(), self.on_bad_record, self.skip_log, stage=stage, source=path)
        return Pool(index, np.arange(len(index), dtype=np.int64), np.asarray(index.label_ids, dtype=np.int64), index.labels)

    def _split_held_out(self, pool: Pool) -> tuple[Pool, Pool]:
        rng = np.random.default_rng(self.seed)
        held = np.zeros(len(pool), dtype=bool)
        for task_id in range(len(pool.task_names)):
            members = np.nonzero(pool.task_ids == task_id)[0]
            count = int(round(self.val_ratio * len(members)))
            if count and len(members) > 1:
                held[rng.choice(members, size=min(count, len(members) - 1), replace=False)] = True
        return pool.subset(np.nonzero(~held)[0]), pool.subset(np.nonzero(held)[0])

    # ---------------------------------------------------------------- what TIVE needs
    @property
    def pool_size(self) -> int:
        """Number of examples in the pool."""
        return len(self._require_pool())

    @property
    def task_names(self) -> list[str]:
        """Sorted task names shared by the pool and the held-out split."""
        return list(self._require_pool().task_names)

    @property
    def pool_task_ids(self) -> np.ndarray:
        """Task index (into `task_names`) of every pool example."""
        return self._require_pool().task_ids

    @property
    def pool_digest(self) -> str:
        """A digest of the pool's records and tasks, in pool order (the feature store's fingerprint)."""
        return self._require_pool().digest()

    @property
    def pool_lengths(self) -> np.ndarray:
        """Tokens per pool example (image tokens included): balanced valuation shards, length-sorted batches."""
        return self._require_pool().lengths

    def pool_answer_starts(self, indices: Sequence[int]) -> np.ndarray:
        """Token position of each example's first supervised (answer) token, image tokens included.

        A cut to `max_length` tokens leaves an example no supervised token when its start is >= max_length.
        """
        pool = self._require_pool()
        encoder = self._dataset.encoder
        starts = np.empty(len(indices), dtype=np.int64)
        for k, index in enumerate(indices):
            _, labels = pool.index.encoded(int(pool.rows[int(index)]), encoder.num_image_tokens, encoder.image_token_id)
            supervised = np.flatnonzero(labels != IGNORE_INDEX)
            starts[k] = supervised[0] if len(supervised) else len(labels)
        return starts

    def pool_record(self, index: int) -> dict:
        """The LLaVA record at a pool index, with its task filled in."""
        pool = self._require_pool()
        return {**pool.records[index], "task": pool.task_of(index)}

    def pool_dataloader(
        self,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        batches: Sequence[Sequence[int]] | None = None,
        max_length: int | None = None,
    ) -> DataLoader:
        """A loader over pool indices in the given order; each batch carries `pool_index`.

        `batches` gives the exact pool indices of every batch instead (sizes may differ, even be 0).
        `max_length` cuts each example to its first `max_length` tokens (the prompt first, then the answer).
        """
        pool = self._require_pool()
        collate = LlavaCollator(self._pad_id(), max_length=max_length)
        if batches is not None:
            return DataLoader(
                self._dataset,
                batch_sampler=[[int(i) for i in b] for b in batches],
                num_workers=self.num_workers,
                collate_fn=collate,
            )
        indices = np.arange(len(pool)) if indices is None else np.asarray(indices, dtype=np.int64)
        return DataLoader(
            IndexView(self._dataset, indices),
            batch_size=batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def set_train_indices(self, indices: Sequence[int]) -> None:
        """Train on this multiset of pool indices (repeats allowed) from the next loader on."""
        pool = self._require_pool()
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or len(indices) == 0:
            raise ValueError("set_train_indices needs a non-empty 1-D list of pool indices")
        bad = indices[(indices < 0) | (indices >= len(pool))]
        if len(bad):
            raise IndexError(f"pool indices out of range [0, {len(pool)}): {bad[:5].tolist()}")
        self.train_indices = indices.copy()

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Serves exactly `train_indices` (the whole pool until TIVE swaps it), in a seeded order.

        Each process gets its share of every global batch (`ResumableDistributedSampler`), grouped by
        length with `group_by_length`; a resumed fit continues the epoch where its checkpoint left it.
        """
        self._require_pool()
        view = IndexView(self._dataset, self.train_indices)
        world, rank = self._data_parallel()
        self._train_sampler = ResumableDistributedSampler(
            view, self._modality_lengths(self.train_indices), self.batch_size, world, rank,
            seed=self._shuffle_seed(), group_by_length=self.group_by_length,
        )
        if self._resume is not None:
            self._train_sampler.resume(*self._resume)
        return DataLoader(
            view,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            num_workers=self.num_workers,
            collate_fn=LlavaCollator(self._pad_id()),
            persistent_workers=False,
        )

    def _data_parallel(self) -> tuple[int, int]:
        """(processes, this one's rank) among those that split the training data."""
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        if not kwargs:
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    def padding_efficiency(self, indices: Sequence[int] | None = None) -> float:
        """Real / padded tokens over every process's training batches of the first epoch (default: `train_indices`)."""
        world, _ = self._data_parallel()
        lengths = self._modality_lengths(np.asarray(self.train_indices if indices is None else indices, dtype=np.int64))
        plan = epoch_plan(lengths, self.batch_size, world, self._shuffle_seed(), 0, self.group_by_length)
        return padding_efficiency([b for r in range(world) for b in rank_batches(plan, world, r)], lengths)

    def _shuffle_seed(self) -> int:
        if self._order_seed is not None:  # restored from a checkpoint: the interrupted run's order
            return self._order_seed
        if self.shuffle_seed is not None:
            return self.shuffle_seed
        run_seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything, also in spawned processes
        return int(run_seed) if run_seed is not None else self.seed

    def val_dataloader(self) -> DataLoader | list:
        """Held-out examples with prompts and reference answers for generation metrics."""
        self._require_pool()
        if self._val_dataset is None:
            return []
        return DataLoader(
            self._val_dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=LlavaCollator(self._pad_id(), generation=True),
        )

    def test_dataloader(self) -> DataLoader | list:
        """Same as validation: the held-out split."""
        return self.val_dataloader()

    # ---------------------------------------------------------------- metrics support
    def task_eval_kind(self, task: str) -> EvalKind:
        """Metric for a task: configured, else the demo's, else exact match for short held-out answers."""
        if task in self.task_eval_kinds:
            return self.task_eval_kinds[task]
        if self.demo is not None:
            from lightning_tive.data.demo import TASK_EVAL_KIND

            if task in TASK_EVAL_KIND:
                return TASK_EVAL_KIND[task]
        pool = self.val_pool
        if pool is None:
            return "loss_only"
        task_id = self.task_names.index(task)
        answers = [pool.records[i]["conversations"][-1]["value"] for i in np.nonzero(pool.task_ids == task_id)[0]]
        if answers and max(len(a.split()) for a in answers) <= SHORT_ANSWER_WORDS:
            return "exact_match"
        return "token_f1"

    def _modality_lengths(self, indices: np.ndarray) -> np.ndarray:
        # LLaVA's modality lengths, in tokens: negative for text-only records.
        pool = self._require_pool()
        lengths = pool.lengths[indices]
        return np.where(pool.has_image[indices], lengths, -lengths)

    def _pad_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _require_pool(self) -> Pool:
        if self.pool is None:
            raise RuntimeError("the DataModule is not set up yet: call setup() first")
        return self.pool

    def state_dict(self) -> dict:
        """The training multiset and where the training order stands, so a resumed fit continues it exactly."""
        state: dict[str, Any] = {"train_indices": None if self.train_indices is None else self.train_indices.tolist()}
        trainer = self.trainer
        if trainer is not None and self.pool is not None:
            epoch = trainer.current_epoch
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler = getattr(self, "_train_sampler", None)
            if sampler is not None and done >= sampler.num_batches:  # saved at an epoch's end
                epoch, done = epoch + 1, 0
            state["order"] = {"seed": self._shuffle_seed(), "epoch": int(epoch), "batches_done": int(done)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the training multiset and the training order's position."""
        if state_dict.get("train_indices") is not None:
            self.train_indices = np.asarray(state_dict["train_indices"], dtype=np.int64)
        order = state_dict.get("order")
        if order is not None:
            self._order_seed = int(order["seed"])
            self._resume = (int(order["epoch"]), int(order["batches_done"]))
            # A strategy that restores after set-up (ModelParallelStrategy) built the loader already.
            sampler = getattr(self, "_train_sampler", None)
            if sampler is not None:
                sampler.seed = self._order_seed
                sampler.resume(*self._resume)


def _relabel(pool: Pool, names: list[str]) -> Pool:
    index = {name: i for i, name in enumerate(names)}
    remap = np.array([index[n] for n in pool.task_names], dtype=np.int64)
    return Pool(pool.index, pool.rows, remap[pool.task_ids] if len(pool) else pool.task_ids, names)


def _cap_per_task(pool: Pool, cap: int, seed: int) -> Pool:
    rng = np.random.default_rng(seed + 1)
    keep = []
    for task_id in range(len(pool.task_names)):
        members = np.nonzero(pool.task_ids == task_id)[0]
        keep.extend(members if len(members) <= cap else np.sort(rng.choice(members, cap, replace=False)))
    return pool.subset(np.sort(np.asarray(keep, dtype=np.int64)))
