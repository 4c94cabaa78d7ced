"""The cheaper-valuation settings: `tive.gradient_layers` and `tive.valuation_max_length`.

Checked against brute force: features over the last k layers are the full gradient's columns of those
layers (identity projector), and the lower layers' backward does not run; an example valued with a
cut is valued as its cut copy would be, by a batch-of-one autograd pass with the stored reference
adapter, while the warm-up and the training see whole examples. Both settings are in the store's
fingerprint: a resumed store or a `features_from` folder valued otherwise is refused.
"""

from __future__ import annotations

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from fit_helpers import BATCH, DEMO, run_fit

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.dataset import LlavaCollator
from lightning_tive.model import LlavaModule, TinyLlavaConfig
from lightning_tive.phases import ReferencePhases
from lightning_tive.reference_adapter import feature_layers, only_differentiating
from lightning_tive.tive.grads import layer_shapes, per_example_grads
from lightning_tive.tive.projection import build_projector
from lightning_tive.tive_config import ATTENTION_MODULES, ReferenceLora, TIVEConfig

LORA = ReferenceLora(r=4, alpha=8, dropout=0.0)  # fit_helpers' reference adapter
SEED = 3  # fit_helpers' seed
CUT = 72  # cuts the captions' answers (start ~58, length 77-93) and keeps every other answer
EXACT = dict(projector="identity", feature_dtype="float32", stop_after_selection=True)


class LengthProbe(L.Callback):
    """Tokens of every example the main training sees, by pool index."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for index, count in zip(batch["pool_index"].tolist(), batch["attention_mask"].sum(1).tolist(), strict=True):
            self.tokens[index] = count


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A module with the reference adapter, the test pool, and a batch from it."""
    module = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora")
    dm = LlavaDataModule(demo=DEMO, batch_size=BATCH, max_length=256, output_dir=str(tmp_path_factory.mktemp("dm")))
    dm.attach_processor(module.processor)
    dm.setup("fit")
    adapter = module.add_reference_adapter(LORA, SEED)
    return module, dm, adapter


def load_reference(module: LlavaModule, adapter: list, path) -> None:
    """Load a run's saved reference model (adapter layers by name, projector by position)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, layer in adapter:
            layer.weight.copy_(state[name])
        for k, param in enumerate(module.projector_parameters()):
            param.copy_(state[f"projector.{k}"])


def brute_force_norm(module: LlavaModule, weights: list, batch: dict) -> float:
    """‖∇ L(s)‖ over `weights` for a batch of one, by plain autograd (float64 sum)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(module.per_example_loss(batch)[0], weights)
    return float(torch.cat([g.reshape(-1) for g in grads]).double().norm())


# ---------------------------------------------------------------- gradient_layers, at the engine
def test_last_layer_features_are_the_full_gradients_columns_of_that_layer(setup):
    module, dm, adapter = setup
    batch = next(iter(dm.pool_dataloader(np.arange(BATCH), batch_size=BATCH)))
    every = feature_layers(adapter, list(ATTENTION_MODULES), None)
    last = feature_layers(adapter, list(ATTENTION_MODULES), 1)
    assert len(last) == len(every) // 2 and all(".layers.1." in name for name, _ in last)
    full = per_example_grads(every, build_projector("identity", None, 0, layer_shapes(every)), module.per_example_loss, batch)
    with only_differentiating(adapter, last):
        part = per_example_grads(last, build_projector("identity", None, 0, layer_shapes(last)), module.per_example_loss, batch)
    # The identity projector lays the layers' flattened gradients side by side, in order.
    offsets = np.cumsum([0] + [o * i for o, i in layer_shapes(every)])
    names = [name for name, _ in every]
    columns = np.concatenate([np.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n, _ in last])
    torch.testing.assert_close(part.features, full.features[:, columns], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(part.norms, full.features[:, columns].norm(dim=1), rtol=1e-5, atol=0)
    assert (part.norms < full.norms).all()
    single = next(iter(dm.pool_dataloader([0], batch_size=1)))
    assert float(part.norms[0]) == pytest.approx(brute_force_norm(module, [m.weight for _, m in last], single), rel=1e-5)
    # the flags are back: every adapter weight trains again after the block
    assert all(m.weight.requires_grad for _, m in adapter)


def test_the_layers_below_the_feature_layers_run_no_backward(setup):
    module, dm, adapter = setup
    batch = next(iter(dm.pool_dataloader(np.arange(BATCH), batch_size=BATCH)))
    first = next(m for n, m in module.named_modules() if n.endswith("language_model.layers.0"))
    seen = {"requires_grad": [], "backward": 0}

    def tap(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen["requires_grad"].append(hidden.requires_grad)
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: seen.__setitem__("backward", seen["backward"] + 1))

    handle = first.register_forward_hook(tap)
    try:
        last = feature_layers(adapter, list(ATTENTION_MODULES), 1)
        projector = build_projector("identity", None, 0, layer_shapes(last))
        with only_differentiating(adapter, last, enabled=False):  # autograd alone prunes the backward below
            per_example_grads(last, projector, module.per_example_loss, batch)
        assert seen == {"requires_grad": [True], "backward": 0}
        seen["requires_grad"].clear()
        with only_differentiating(adapter, last):  # as the valuation runs: no graph below either
            per_example_grads(last, projector, module.per_example_loss, batch)
        assert seen == {"requires_grad": [False], "backward": 0}
        every = feature_layers(adapter, list(ATTENTION_MODULES), None)  # control: all layers run backward
        seen["requires_grad"].clear()
        per_example_grads(every, build_projector("identity", None, 0, layer_shapes(every)), module.per_example_loss, batch)
        assert seen == {"requires_grad": [True], "backward": 1}
    finally:
        handle.remove()


def test_gradient_layers_above_the_layer_count_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.setattr(ReferencePhases, "warm_up", lambda *a, **k: pytest.fail("warm-up ran"))
    with pytest.raises(ValueError, match=r"tive.gradient_layers=3 is more than the language model's 2 decoder layers"):
        run_fit(tmp_path, gradient_layers=3, stop_after_selection=True)


@pytest.mark.parametrize("name", ["gradient_layers", "valuation_max_length"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "two"])
def test_non_positive_or_non_integer_values_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"tive.{name}: .* is not a valid .*PositiveInt"):
        TIVEConfig(**{name: value})


def test_both_settings_are_feature_settings():
    settings = TIVEConfig(gradient_layers=1, valuation_max_length=100).feature_settings()
    assert settings["gradient_layers"] == 1 and settings["valuation_max_length"] == 100
    assert TIVEConfig().feature_settings()["gradient_layers"] is None


# ---------------------------------------------------------------- the fits
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Identity-projector runs with float32 rows: plain, last layer only, and cut to CUT tokens (then trained
    on half the pool, to see what training gets)."""
    tmp = tmp_path_factory.mktemp("cost_runs")
    run_fit(tmp / "plain", **EXACT)
    run_fit(tmp / "last", gradient_layers=1, **EXACT)
    lengths = LengthProbe()
    *_, dm = run_fit(tmp / "cut", valuation_max_length=CUT, projector="identity", feature_dtype="float32",
                     ratio=0.5, callbacks=[lengths])
    return tmp, lengths, dm


def stored(folder) -> dict:
    """A run's stored features as raw (unit row x length) float64 rows, with its norms and tokens."""
    features = folder / "tive" / "features"
    rows = np.load(features / "features.npy").astype(np.float64)
    return {
        "raw": rows * np.load(features / "feature_norms.npy").astype(np.float64)[:, None],
        "norms": np.load(features / "grad_norms.npy").astype(np.float64),
        "tokens": np.load(features / "tokens.npy"),
    }


def test_a_fit_with_gradient_layers_stores_the_last_layers_columns_of_the_same_reference_model(runs, setup):
    tmp = runs[0]
    module, _, adapter = setup
    # the warm-up does not depend on the setting: the same reference model, bit for bit
    plain_ref = torch.load(tmp / "plain" / "tive" / "reference_adapter.pt", weights_only=True)
    last_ref = torch.load(tmp / "last" / "tive" / "reference_adapter.pt", weights_only=True)
    assert plain_ref.keys() == last_ref.keys() and all(torch.equal(plain_ref[k], last_ref[k]) for k in plain_ref)
    plain, last = stored(tmp / "plain"), stored(tmp / "last")
    every = feature_layers(adapter, list(ATTENTION_MODULES), None)
    offsets = np.cumsum([0] + [o * i for o, i in layer_shapes(every)])
    columns = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k, (n, _) in enumerate(every) if ".layers.1." in n])
    assert last["raw"].shape == (plain["raw"].shape[0], len(columns))
    np.testing.assert_allclose(last["raw"], plain["raw"][:, columns], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(last["norms"], np.linalg.norm(plain["raw"][:, columns], axis=1), rtol=1e-5)
    summary = json.loads((tmp / "last" / "tive" / "summary.json").read_text())
    assert summary["settings"]["gradient_layers"] == 1


def test_a_cut_example_is_valued_as_its_cut_copy_and_training_sees_it_whole(runs, setup):
    tmp, lengths, dm = runs
    module, _, adapter = setup
    pool_lengths = np.asarray(dm.pool_lengths)
    cut = np.flatnonzero(pool_lengths > CUT)
    assert len(cut) >= 6  # the captions, and the count examples' last token
    # brute force: each example cut by hand, alone in its batch, with the run's stored reference model
    load_reference(module, adapter, tmp / "cut" / "tive" / "reference_adapter.pt")
    weights = [m.weight for _, m in feature_layers(adapter, list(ATTENTION_MODULES), None)]
    collate = LlavaCollator(dm._pad_id())
    values, plain = stored(tmp / "cut"), stored(tmp / "plain")
    for index in [*cut[:4], int(np.argmin(pool_lengths))]:
        item = dm._dataset[int(index)]
        item = {**item, "input_ids": item["input_ids"][:CUT], "labels": item["labels"][:CUT]}
        batch = collate([item])
        assert values["norms"][index] == pytest.approx(brute_force_norm(module, weights, batch), rel=1e-5)
        assert values["tokens"][index] == int((batch["labels"][0, 1:] != -100).sum())
    # same reference model as the plain run (the warm-up saw whole examples): uncut examples value alike,
    # cut ones otherwise
    plain_ref = torch.load(tmp / "plain" / "tive" / "reference_adapter.pt", weights_only=True)
    cut_ref = torch.load(tmp / "cut" / "tive" / "reference_adapter.pt", weights_only=True)
    assert all(torch.equal(plain_ref[k], cut_ref[k]) for k in plain_ref)
    whole = np.flatnonzero(pool_lengths <= CUT)
    np.testing.assert_allclose(values["norms"][whole], plain["norms"][whole], rtol=1e-5)
    assert not np.allclose(values["norms"][cut], plain["norms"][cut], rtol=1e-3)
    assert (values["tokens"][cut] < plain["tokens"][cut]).all()
    # the main training got every example at its full length
    assert any(pool_lengths[i] > CUT for i in lengths.tokens)
    assert all(lengths.tokens[i] == pool_lengths[i] for i in lengths.tokens)


def test_valuation_shards_and_batches_go_by_the_cut_lengths(tmp_path, monkeypatch):
    import lightning_tive.phases as phases

    seen = {}
    real = phases.open_process_store

    def spy(*args, **kwargs):
        seen["lengths"] = np.asarray(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(phases, "open_process_store", spy)
    _, tive, _, dm = run_fit(tmp_path, valuation_max_length=CUT, stop_after_selection=True)
    np.testing.assert_array_equal(seen["lengths"], np.minimum(dm.pool_lengths, CUT))
    summary = json.loads((tmp_path / "tive" / "summary.json").read_text())
    assert summary["settings"]["valuation_max_length"] == CUT


def test_a_cut_that_leaves_an_answer_empty_is_refused_before_the_warm_up(tmp_path, monkeypatch):
    monkeypatch.setattr(ReferencePhases, "warm_up", lambda *a, **k: pytest.fail("warm-up ran"))
    # 70 tokens: the count examples' answers start at token 70 (image tokens included)
    with pytest.raises(ValueError, match=r"tive.valuation_max_length=70 cuts every answer token of 8 pool example\(s\) "
                                         r"\(the first: pool index \d+, id '[^']+', whose answer starts at token 70\); "
                                         r"use at least 71, or null"):
        run_fit(tmp_path, valuation_max_length=70, stop_after_selection=True)


def test_a_data_module_that_cannot_cut_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.delattr(LlavaDataModule, "pool_answer_starts")
    with pytest.raises(TypeError, match=r"tive.valuation_max_length needs a DataModule .* LlavaDataModule lacks them"):
        run_fit(tmp_path, valuation_max_length=CUT, stop_after_selection=True)


# ---------------------------------------------------------------- the fingerprint
@pytest.mark.parametrize(
    "setting, expected",
    [({"gradient_layers": 1}, "extra.settings.gradient_layers: folder has None, requested 1"),
     ({"valuation_max_length": CUT}, f"extra.settings.valuation_max_length: folder has None, requested {CUT}")],
)
def test_a_resumed_store_valued_otherwise_is_refused(runs, tmp_path, setting, expected):
    shutil.copytree(runs[0] / "plain" / "tive" / "features", tmp_path / "tive" / "features")
    with pytest.raises(ValueError, match="does not match the requested settings") as refused:
        run_fit(tmp_path, **EXACT, **setting)
    assert expected in str(refused.value)


def test_features_from_a_store_valued_otherwise_is_refused(runs, tmp_path):
    tmp = runs[0]
    with pytest.raises(ValueError, match=r"was valued with other settings \(gradient_layers: folder has None, this run sets 1\)"):
        run_fit(tmp_path / "a", features_from=str(tmp / "plain" / "tive" / "features"), gradient_layers=1, **EXACT)
    with pytest.raises(ValueError, match=r"gradient_layers: folder has 1, this run sets None"):
        run_fit(tmp_path / "b", features_from=str(tmp / "last" / "tive" / "features"), **EXACT)
    with pytest.raises(ValueError, match=rf"valuation_max_length: folder has {CUT}, this run sets None"):
        run_fit(tmp_path / "c", features_from=str(tmp / "cut" / "tive" / "features"), **EXACT)
    # the same settings re-select from it
    _, again, _, _ = run_fit(tmp_path / "d", features_from=str(tmp / "last" / "tive" / "features"), gradient_layers=1,
                             **EXACT)
    import csv

    first = [int(row["times_selected"]) for row in csv.DictReader(open(tmp / "last" / "tive" / "values.csv"))]
    assert np.bincount(again.selected, minlength=len(first)).tolist() == first
