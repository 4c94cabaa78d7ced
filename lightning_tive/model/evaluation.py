"""Held-out evaluation: per-task losses, greedy answers scored by exact match or token F1, and their logging."""

from __future__ import annotations

import re

import torch

from lightning_tive.metrics import exact_match, token_f1


class EvaluationMixin:
    """`LlavaModule`'s validation and test hooks, and `generate_answers`.

    Uses the module's `model`, `processor`, `val_max_new_tokens`, `per_example_loss` and, sharded,
    `_spare` / `_max_over_processes`; its state is `val_metrics` (one MeanMetric per task and metric),
    with `task_names` and `eval_kinds` from the DataModule.
    """

    def _init_evaluation(self) -> None:
        self.val_metrics: torch.nn.ModuleDict | None = None

    def setup(self, stage: str) -> None:
        """Create per-task metrics for the tasks the DataModule holds out."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or self.val_metrics is not None or not hasattr(datamodule, "task_eval_kind"):
            return
        datamodule.setup(stage)
        if datamodule.val_pool is None:
            return
        self.task_names = list(datamodule.task_names)
        present = sorted(set(datamodule.val_pool.task_ids.tolist()))
        self.eval_kinds = {self.task_names[t]: datamodule.task_eval_kind(self.task_names[t]) for t in present}
        from torchmetrics import MeanMetric

        metrics = {}
        for task, kind in self.eval_kinds.items():
            metrics[_key(task, "loss")] = MeanMetric()
            if kind != "loss_only":
                metrics[_key(task, kind)] = MeanMetric()
        self.val_metrics = torch.nn.ModuleDict(metrics)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Per-task loss, and greedy-generation scores for tasks that have them."""
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Same metrics as validation."""
        self._eval_step(batch)

    def _eval_step(self, batch: dict) -> None:
        if self.val_metrics is None:
            return
        if "input_ids" not in batch:
            if self.sharded:  # every process runs the same forwards: a spare batch, not counted
                spare = self._spare(batch, "eval")
                self.per_example_loss(spare)
                if self._max_over_processes(0, self.device):
                    self.generate_answers(spare)
            return
        if self.sharded:
            self._spare_batches["eval"] = batch
        losses = self.per_example_loss(batch)
        tasks = [self.task_names[t] for t in batch["task_id"].tolist()]
        for task in set(tasks):
            rows = torch.tensor([t == task for t in tasks], device=losses.device)
            self.val_metrics[_key(task, "loss")].update(losses[rows])
        need = any(self.eval_kinds.get(t, "loss_only") != "loss_only" for t in tasks)
        if self.sharded:  # generation runs the model: on every process, or on none
            need = bool(self._max_over_processes(int(need), losses.device))
        if not need:
            return
        predictions = self.generate_answers(batch)
        for task, kind, prediction, answer, has_prompt in zip(
            tasks,
            (self.eval_kinds[t] for t in tasks),
            predictions,
            batch["answers"],
            batch["has_prompt"].tolist(),
            strict=True,
        ):
            if kind == "loss_only":
                continue
            score = 0.0 if not has_prompt else (exact_match if kind == "exact_match" else token_f1)(prediction, answer)
            self.val_metrics[_key(task, kind)].update(torch.tensor([score], device=losses.device))

    @torch.no_grad()
    def generate_answers(self, batch: dict, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to each example's last question (the prompt before its last answer)."""
        tokenizer = self.processor.tokenizer
        inputs = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_attention_mask"]}
        pixels = self._pixels(batch)
        if pixels is not None:  # transformers 5 generate() runs the vision tower even on pixel_values=None
            inputs["pixel_values"] = pixels
        if self.sharded:  # every process runs as many steps as the longest answer takes, and the vision tower
            inputs["synced_gpus"] = True
            self._needs_dummy_image = pixels is None
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens or self.val_max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["prompt_ids"].shape[1] :]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def on_validation_epoch_end(self) -> None:
        """Log `val/<task>/<metric>`, `val/loss` and `val/avg_accuracy`."""
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        """Log `test/<task>/<metric>`."""
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        if self.val_metrics is None:
            return
        import warnings

        losses, accuracies, scores = [], [], []
        # Every process computes every metric in the same order: compute() is a collective, and
        # processes that saw different tasks would otherwise wait on each other forever. A task no
        # process saw (e.g. limit_val_batches) computes to NaN and is not logged.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before the.*update.*")
            computed = {key: metric.compute() for key, metric in self.val_metrics.items()}
        for task, kind in self.eval_kinds.items():
            loss = computed[_key(task, "loss")]
            if not torch.isnan(loss):
                losses.append(loss)
                self.log(f"{prefix}/{task}/loss", loss, sync_dist=False)
            if kind == "loss_only":
                continue
            value = computed[_key(task, kind)]
            if not torch.isnan(value):
                name = "accuracy" if kind == "exact_match" else "token_f1"
                self.log(f"{prefix}/{task}/{name}", value, sync_dist=False)
                scores.append(value)
                if kind == "exact_match":
                    accuracies.append(value)
        for metric in self.val_metrics.values():
            metric.reset()
        if losses:
            self.log(f"{prefix}/loss", torch.stack(losses).mean(), prog_bar=True, sync_dist=False)
        if accuracies:
            self.log(f"{prefix}/avg_accuracy", torch.stack(accuracies).mean(), prog_bar=True, sync_dist=False)
        if scores:
            self.log(f"{prefix}/avg_score", torch.stack(scores).mean(), sync_dist=False)


def _key(task: str, metric: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', task)}__{metric}"
