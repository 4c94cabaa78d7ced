"""TIVESelectionCallback end to end on the tiny model and a small demo mixture."""

from __future__ import annotations

import json
import math
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from fit_helpers import BATCH, DEMO, POOL, SimulatedKill, run_fit
from torch.utils.data import DataLoader

from lightning_tive.callback import TIVESelectionCallback
from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.demo import DemoConfig
from lightning_tive.model import LlavaModule, TinyLlavaConfig
from lightning_tive.phases import ReferencePhases
from lightning_tive.tive_config import ReferenceLora


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    return tmp, *run_fit(tmp)


def test_subset_has_exactly_budget_and_tasks_csv_sums_to_it(lora_run):
    tmp, trainer, tive, probe, dm = lora_run
    budget = round(0.25 * POOL)
    assert len(tive.selected) == budget
    rows = list(__import__("csv").DictReader(open(tmp / "tive" / "tasks.csv")))
    assert sum(int(r["budget"]) for r in rows) == budget
    assert sum(int(r["selected"]) for r in rows) == budget
    subset = json.loads((tmp / "tive" / "subset.json").read_text())
    assert len(subset) == budget and all("task" in r and "conversations" in r for r in subset)
    assert [r["id"] for r in subset] == [dm.pool_record(i)["id"] for i in tive.selected]
    values = list(__import__("csv").DictReader(open(tmp / "tive" / "values.csv")))
    assert [int(v["index"]) for v in values] == list(range(POOL))
    assert sum(int(v["times_selected"]) for v in values) == budget
    summary = json.loads((tmp / "tive" / "summary.json").read_text())
    assert summary["pool_size"] == POOL and summary["budget"] == budget
    assert {"warmup_s", "valuation_s", "selection_s"} <= set(summary["timings_s"])
    assert (tmp / "tive" / "report.png").stat().st_size > 10_000
    features = np.load(tmp / "tive" / "features" / "features.npy")
    assert features.shape == (POOL, 64) and np.load(tmp / "tive" / "features" / "grad_norms.npy").shape == (POOL,)


def test_training_loader_serves_exactly_the_subset(lora_run):
    _, trainer, tive, probe, dm = lora_run
    assert Counter(probe.seen) == Counter(tive.selected.tolist())
    assert dm.train_indices.tolist() == tive.selected.tolist()


def test_scheduler_length_matches_the_subset(lora_run):
    _, trainer, tive, _, _ = lora_run
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == math.ceil(len(tive.selected) / BATCH) * 1
    assert trainer.global_step == scheduler.total_steps


@pytest.mark.parametrize("finetune", ["full", "lora", "qlora"])
def test_main_weights_are_bit_identical_across_warm_up(tmp_path, finetune):
    _, _, probe, _ = run_fit(tmp_path, finetune=finetune, stop_after_selection=True)
    before, after = probe.weights_at_setup, probe.weights_at_train_start
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("tive_reference" in k for k in after)


def test_stop_after_selection_writes_files_and_trains_nothing(tmp_path):
    trainer, tive, probe, dm = run_fit(tmp_path, stop_after_selection=True)
    assert trainer.global_step == 0 and probe.seen == []
    for name in ("tasks.csv", "values.csv", "subset.json", "summary.json", "report.png"):
        assert (tmp_path / "tive" / name).exists(), name


def test_features_from_reproduces_the_selection(lora_run, tmp_path, monkeypatch):
    src, _, tive, _, _ = lora_run
    calls = []
    monkeypatch.setattr(ReferencePhases, "warm_up", lambda *a, **k: calls.append("warm-up"))
    _, again, _, _ = run_fit(tmp_path, features_from=str(src / "tive" / "features"), stop_after_selection=True)
    assert calls == []
    assert again.selected.tolist() == tive.selected.tolist()
    # a different ratio re-selects from the same features in seconds
    _, half, _, _ = run_fit(tmp_path / "b", features_from=str(src / "tive" / "features"), ratio=0.5, stop_after_selection=True)
    assert len(half.selected) == round(0.5 * POOL)


def test_checkpoint_holds_only_plain_values(lora_run):
    src = lora_run[0]
    checkpoint = torch.load(src / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in checkpoint["callbacks"].items() if "TIVESelectionCallback" in k)
    assert state["selected"] == lora_run[2].selected.tolist()


def test_resumed_fit_reapplies_the_subset_without_new_valuation(lora_run, tmp_path, monkeypatch):
    src, trainer, tive, _, _ = lora_run
    ran = []
    monkeypatch.setattr(ReferencePhases, "run", lambda *a, **k: ran.append(1))
    _, resumed, probe, dm = run_fit(tmp_path, max_epochs=2, ckpt_path=str(src / "ckpt" / "last.ckpt"))
    assert ran == []
    assert resumed.selected.tolist() == tive.selected.tolist()
    assert Counter(probe.seen) == Counter(tive.selected.tolist())  # the second epoch, on the same subset


def test_interrupted_valuation_resumes_from_stored_chunks(tmp_path, monkeypatch):
    full, first, _, _ = run_fit(tmp_path / "ref", stop_after_selection=True)
    reference = np.load(tmp_path / "ref" / "tive" / "features" / "features.npy")

    from lightning_tive.tive.store import FeatureStore

    original = FeatureStore.write_chunk
    written = []

    def crash_after_two(self, chunk_id, *args, **kwargs):
        if len(written) == 2:
            raise SimulatedKill("killed mid-valuation")
        written.append(chunk_id)
        return original(self, chunk_id, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", crash_after_two)
    with pytest.raises(SimulatedKill):
        run_fit(tmp_path / "run", stop_after_selection=True)
    monkeypatch.setattr(FeatureStore, "write_chunk", original)
    warmups = []
    real_warm_up = ReferencePhases.warm_up
    monkeypatch.setattr(ReferencePhases, "warm_up", lambda *a, **k: (warmups.append(1), real_warm_up(*a, **k)))
    _, second, _, _ = run_fit(tmp_path / "run", stop_after_selection=True)
    assert warmups == []  # the saved reference adapter was reused
    assert sorted(written) == [0, 1]
    assert np.array_equal(np.load(tmp_path / "run" / "tive" / "features" / "features.npy"), reference)
    assert second.selected.tolist() == first.selected.tolist()


class CapturingWandb:
    """A WandbLogger whose run is a recorder: what TIVE logs is kept, nothing is sent or written."""

    @staticmethod
    def make(save_dir):
        from types import SimpleNamespace

        from lightning.pytorch.loggers import WandbLogger

        class Capturing(WandbLogger):
            logged: list

            @property
            def experiment(self):
                return SimpleNamespace(log=self.logged.append, config=SimpleNamespace(update=lambda *a, **k: None),
                                       define_metric=lambda *a, **k: None)

        logger = Capturing(project="capture", offline=True, save_dir=str(save_dir))
        logger.logged = []
        return logger


def test_wandb_payload_holds_value_histograms_per_task(tmp_path):
    import wandb

    logger = CapturingWandb.make(tmp_path)
    _, tive, _, _ = run_fit(tmp_path, logger=logger, stop_after_selection=True)
    merged = {k: v for row in logger.logged for k, v in row.items()}
    values = list(__import__("csv").DictReader(open(tmp_path / "tive" / "values.csv")))
    for task in DEMO.train_sizes:
        histogram = merged[f"tive/instance_value/{task}"]
        assert isinstance(histogram, wandb.Histogram) and isinstance(merged[f"tive/grad_norm/{task}"], wandb.Histogram)
        # the histogram counts exactly the task's examples
        assert sum(histogram.histogram) == sum(v["task"] == task for v in values)
    assert merged["tive/budget"] == round(0.25 * POOL) and merged["tive/pool_size"] == POOL
    table = merged["tive/tasks"]
    assert isinstance(table, wandb.Table) and [row[0] for row in table.data] == sorted(DEMO.train_sizes)
    assert isinstance(merged["tive/report"], wandb.Image)
    assert any("tive/warmup_loss" in row for row in logger.logged)


@pytest.mark.slow
def test_wandb_offline_run_file_holds_the_histograms(tmp_path, monkeypatch):
    """The real library, offline: the run file written to disk holds what was logged."""
    from lightning.pytorch.loggers import WandbLogger
    from wandb_offline import find_offline_run, read_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="lightning_tive_test", offline=True, save_dir=str(tmp_path))
    run_fit(tmp_path, logger=logger, stop_after_selection=True)
    logger.experiment.finish()
    import wandb

    wandb.teardown()  # stops W&B's service, which flushes the run file
    rows = read_history(find_offline_run(tmp_path), wait_s=5)
    merged = {k: v for row in rows for k, v in row.items()}
    for task in DEMO.train_sizes:
        assert merged[f"tive/instance_value/{task}"]["_type"] == "histogram"
        assert merged[f"tive/grad_norm/{task}"]["_type"] == "histogram"
    assert merged["tive/budget"] == round(0.25 * POOL) and merged["tive/pool_size"] == POOL
    # the table and the image reach the file through wandb's own serialisation
    assert merged["tive/tasks"]["_type"] == "table-file" and merged["tive/report"]["_type"] == "image-file"
    assert any("tive/warmup_loss" in row for row in rows)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "tive.ratio"),
        ({"ratio": 1.5}, "tive.ratio"),
        ({"projector": "gaussian"}, "tive.projector"),
        ({"proj_dim": 0}, "tive.proj_dim"),
        ({"temperature": 0.0}, "tive.temperature"),
        ({"sampling": "greedy"}, "tive.sampling"),
    ],
)
def test_impossible_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TIVESelectionCallback(**kwargs)


def test_unsupported_strategy_is_refused_before_any_work(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    tive = TIVESelectionCallback()

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(RuntimeError, match="not FSDPStrategy. To shard the model, use FSDP2: .*lightning_tive.sharding.FSDP2Strategy"):
        tive.setup(FakeTrainer(), LlavaModule.__new__(LlavaModule), "fit")

    class DeepSpeedStrategy:  # the real one needs the deepspeed package; the callback goes by the class name
        pass

    FakeTrainer.strategy = DeepSpeedStrategy()
    with pytest.raises(RuntimeError, match="not DeepSpeedStrategy. To shard the model, use FSDP2"):
        tive.setup(FakeTrainer(), LlavaModule.__new__(LlavaModule), "fit")


def test_identity_projector_stores_the_whole_adapter_gradient(tmp_path):
    trainer, tive, _, _ = run_fit(tmp_path, projector="identity", stop_after_selection=True)
    features = np.load(tmp_path / "tive" / "features" / "features.npy")
    norms = np.load(tmp_path / "tive" / "features" / "grad_norms.npy")
    # the adapter covers every linear layer, the features its attention part (gradient_modules' default):
    # r=4 LoRA on q/k/v/o of 2 layers of width 128: 8 modules x (4x128 + 128x4)
    assert features.shape == (POOL, 8 * 2 * 4 * 128)
    # rows are unit vectors; their lengths, kept apart, are the exact gradient norms (identity projection)
    np.testing.assert_allclose(np.linalg.norm(features.astype(np.float64), axis=1), 1.0, rtol=2e-3)
    lengths = np.load(tmp_path / "tive" / "features" / "feature_norms.npy")
    np.testing.assert_allclose(lengths, norms, rtol=1e-4)


def test_gradient_modules_choose_the_feature_layers(tmp_path):
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    run_fit(tmp_path, projector="identity", gradient_modules=every, stop_after_selection=True)
    features = np.load(tmp_path / "tive" / "features" / "features.npy")
    mlp = 2 * (2 * (4 * 128 + 256 * 4) + (4 * 256 + 128 * 4))  # gate/up 128->256, down 256->128, 2 layers
    assert features.shape == (POOL, 8 * 2 * 4 * 128 + mlp)
    with pytest.raises(ValueError, match="subset of tive.reference_lora.target_modules"):
        TIVESelectionCallback(reference_lora=ReferenceLora(target_modules=["q_proj"]), gradient_modules=["v_proj"])


@pytest.mark.parametrize("projector_lr", [1e-2, None])
def test_warm_up_trains_the_projector_only_when_asked(tmp_path, projector_lr):
    initial = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora").projector_parameters()
    _, _, probe, _ = run_fit(tmp_path, warmup_projector_lr=projector_lr, stop_after_selection=True)
    saved = torch.load(tmp_path / "tive" / "reference_adapter.pt", weights_only=True)
    warmed = [saved[f"projector.{k}"] for k in range(len(initial))]
    moved = [not torch.equal(a, b) for a, b in zip(initial, warmed, strict=True)]
    assert all(moved) if projector_lr else not any(moved)
    # and the main model's projector is back, bit for bit, before the main training
    projector = {k: v for k, v in probe.weights_at_train_start.items() if "multi_modal_projector" in k}
    assert len(projector) == 4
    assert all(torch.equal(v, probe.weights_at_setup[k]) for k, v in projector.items())


def test_features_from_another_process_count_are_not_mixed_in(tmp_path):
    from lightning_tive.tive.store import write_shard_index

    (tmp_path / "tive" / "features").mkdir(parents=True)
    write_shard_index(tmp_path / "tive" / "features", POOL, 16, world_size=2)
    with pytest.raises(RuntimeError, match="written by 2 process"):
        run_fit(tmp_path, stop_after_selection=True)


def test_features_from_a_different_pool_of_the_same_size_is_refused(lora_run, tmp_path):
    src = lora_run[0]
    other = DemoConfig(train_sizes=dict(DEMO.train_sizes), val_size=2, seed=1)  # same sizes, other records
    tive = TIVESelectionCallback(features_from=str(src / "tive" / "features"), output_dir=str(tmp_path / "tive"))
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora")
    dm = LlavaDataModule(demo=other, batch_size=BATCH, max_length=256, output_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[tive],
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="computed for a different pool"):
        trainer.fit(module, dm)


def test_features_from_a_plain_npy_pair_is_accepted_with_a_warning(lora_run, tmp_path, caplog):
    src, _, tive, _, _ = lora_run
    folder = tmp_path / "plain"
    folder.mkdir()
    np.save(folder / "features.npy", np.load(src / "tive" / "features" / "features.npy"))
    np.save(folder / "grad_norms.npy", np.load(src / "tive" / "features" / "grad_norms.npy"))
    _, again, _, _ = run_fit(tmp_path, features_from=str(folder), stop_after_selection=True)
    assert "has no meta.json" in caplog.text and "cannot be checked" in caplog.text
    assert again.selected.tolist() == tive.selected.tolist()
    np.save(folder / "grad_norms.npy", np.zeros(POOL - 1, dtype=np.float32))
    with pytest.raises(ValueError, match="do not match the pool"):
        run_fit(tmp_path / "bad", features_from=str(folder), stop_after_selection=True)


def test_unknown_excluded_task_is_refused_before_warm_up(tmp_path, monkeypatch):
    monkeypatch.setattr(ReferencePhases, "warm_up", lambda *a, **k: pytest.fail("warm-up ran"))
    with pytest.raises(ValueError, match=r"tive.exclude_tasks names unknown task\(s\) \['textcaps'\]"):
        run_fit(tmp_path, exclude_tasks=["textcaps"])


def test_stale_features_from_another_model_are_refused_naming_the_setting(lora_run, tmp_path):
    import shutil

    src = lora_run[0]
    shutil.copytree(src / "tive" / "features", tmp_path / "tive" / "features")
    with pytest.raises(ValueError, match=r"extra\.model\.finetune: folder has 'lora', requested 'full'"):
        run_fit(tmp_path, finetune="full", stop_after_selection=True)


def test_cli_typed_settings_become_plain_numbers():
    """Values parsed by the CLI are instances of jsonargparse's restricted types; checkpoints must not pickle those."""
    from jsonargparse.typing import PositiveFloat, PositiveInt

    from lightning_tive.tive_config import Fraction

    tive = TIVESelectionCallback(ratio=Fraction(0.5), proj_dim=PositiveInt(64), temperature=PositiveFloat(2.0))
    config = tive.config
    assert type(config.ratio) is float and type(config.proj_dim) is int and type(config.temperature) is float
    assert all(type(v) in (bool, int, float, str, list, dict, type(None)) for v in config.as_dict().values())


def test_too_slow_a_projection_is_refused_before_the_warm_up(tmp_path, monkeypatch):
    from lightning_tive.tive.projection import ProjectionTooSlow

    monkeypatch.setattr(ReferencePhases, "warm_up", lambda *a, **k: pytest.fail("warm-up ran"))
    with pytest.raises(ProjectionTooSlow, match=r"s per example, above the limit tive\.max_projection_s_per_example=1e-09"):
        run_fit(tmp_path, projector="rademacher", max_projection_s_per_example=1e-9)


@pytest.mark.parametrize(
    "change, names",
    [
        ({"warmup_batch_size": 4}, ["extra.settings.warmup_batch_size", "extra.warmup_global_batch"]),
        ({"precision": "bf16-mixed"}, ["extra.precision: folder has '32-true', requested 'bf16-mixed'"]),
    ],
)
def test_a_store_from_another_warm_up_batch_or_precision_is_refused_naming_it(lora_run, tmp_path, change, names,
                                                                               monkeypatch):
    import shutil

    from lightning_tive.tive.store import FeatureStore

    shutil.copytree(lora_run[0] / "tive" / "features", tmp_path / "tive" / "features")
    with pytest.raises(ValueError, match="does not match the requested settings") as refused:
        run_fit(tmp_path, stop_after_selection=True, **change)
    assert all(name in str(refused.value) for name in names), str(refused.value)
    # the same settings, on the same copied store: no warm-up, no chunk valued again, the same selection
    monkeypatch.setattr(ReferencePhases, "warm_up", lambda *a, **k: pytest.fail("warm-up ran"))
    monkeypatch.setattr(FeatureStore, "write_chunk", lambda *a, **k: pytest.fail("a chunk was valued again"))
    _, same, _, _ = run_fit(tmp_path, stop_after_selection=True)
    assert json.loads((tmp_path / "tive" / "ranks" / "rank-00000.json").read_text())["valued_this_run"] == 0
    assert same.selected.tolist() == lora_run[2].selected.tolist()


class ThirdPartyData(L.LightningDataModule):
    """A DataModule written to the documented TIVEData protocol only: text records, its own batches."""

    def __init__(self, tokenizer, size: int = 24):
        super().__init__()
        self.tokenizer = tokenizer
        self.records = [
            {"id": f"q{i}", "task": ["sums", "words"][i % 2],
             "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": str(2 * i)}]}
            for i in range(size)
        ]
        self.task_names = ["sums", "words"]
        self.pool_size = size
        self.pool_task_ids = np.array([i % 2 for i in range(size)])
        self.train_indices = np.arange(size)

    def _batch(self, indices):
        rows = []
        for i in indices:
            record = self.records[int(i)]
            prompt = self.tokenizer(f"Q: {record['conversations'][0]['value']} A:").input_ids
            answer = self.tokenizer(f" {record['conversations'][1]['value']}", add_special_tokens=False).input_ids
            rows.append((prompt + answer + [self.tokenizer.eos_token_id], len(prompt)))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([[-100] * cut + ids[cut:] + [-100] * (width - len(ids)) for ids, cut in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": None,
                "pool_index": torch.tensor([int(i) for i in indices])}

    def pool_dataloader(self, indices=None, batch_size=None, batches=None):
        if batches is None:
            order = np.arange(self.pool_size) if indices is None else np.asarray(indices)
            size = batch_size or 4
            batches = [order[k : k + size] for k in range(0, len(order), size)]
        empty = {"pool_index": torch.tensor([], dtype=torch.long)}  # a process's share of a tiny batch
        return DataLoader([self._batch(b) if len(b) else empty for b in batches], batch_size=None)

    def pool_record(self, index):
        return self.records[index]

    def set_train_indices(self, indices):
        self.train_indices = np.asarray(indices)

    def train_dataloader(self):
        return DataLoader([self._batch(self.train_indices[k : k + 4]) for k in range(0, len(self.train_indices), 4)],
                          batch_size=None)


def test_a_third_party_datamodule_written_to_the_protocol_works(tmp_path, tokenizer):
    from lightning_tive.protocols import TIVEData

    dm = ThirdPartyData(tokenizer)
    assert isinstance(dm, TIVEData)
    trainer, tive, probe, _ = run_fit(tmp_path, datamodule=dm, ratio=0.5, warmup_ratio=0.5)
    assert len(tive.selected) == 12 and sorted(set(probe.seen)) == sorted(set(tive.selected.tolist()))
    subset = json.loads((tmp_path / "tive" / "subset.json").read_text())
    assert [r["id"] for r in subset] == [f"q{i}" for i in tive.selected]
