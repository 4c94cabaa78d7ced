"""`tive.reference_model`: a proxy LLaVA warms up and values the pool; the main model trains on the subset.

The proxy is what is differentiated (the identity projector's features have the proxy adapter's size and
equal a direct run of the phases on that proxy), the main model is bit-identical across selection, the
store's fingerprint names the proxy, and a proxy that would tokenise the pool otherwise is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from fit_helpers import run_fit

from lightning_tive.model import LlavaModule, TinyLlavaConfig
from lightning_tive.phases import ReferencePhases
from lightning_tive.proxy import build_reference_model, check_same_tokenisation
from lightning_tive.tive.grads import layer_shapes
from lightning_tive.tive_config import ReferenceLora, TIVEConfig

ROOT = Path(__file__).resolve().parents[1]
PROXY = {"tiny": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}, "finetune": "lora"}
EXACT = dict(projector="identity", feature_dtype="float32", ratio=0.25)
LORA = ReferenceLora(r=4, alpha=8, dropout=0.0)  # fit_helpers' reference adapter


def adapter_size(module: LlavaModule, modules=("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
    """Weights of the reference adapter's attention layers on `module` (the identity feature's dimension)."""
    from lightning_tive.reference_adapter import feature_layers

    adapter = module.add_reference_adapter(LORA, 3)
    try:
        return sum(o * i for o, i in layer_shapes(feature_layers(adapter, list(modules), None)))
    finally:
        module.remove_reference_adapter()


def features(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Stored unit rows and gradient norms."""
    return np.load(folder / "features.npy"), np.load(folder / "grad_norms.npy")


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
    """A select-then-train fit of the tiny model with a narrower tiny proxy as reference model."""
    tmp = tmp_path_factory.mktemp("proxy")
    trainer, tive, probe, dm = run_fit(tmp, reference_model=PROXY, **EXACT)
    return tmp, trainer, tive, probe, dm


def test_the_proxy_values_the_pool_and_the_main_model_trains_on_the_subset(proxy_run):
    tmp, trainer, tive, probe, dm = proxy_run
    rows, norms = features(tmp / "tive" / "features")
    proxy = build_reference_model(PROXY, "cpu")
    main_size, proxy_size = adapter_size(trainer.lightning_module), adapter_size(proxy)
    assert proxy_size < main_size and rows.shape == (dm.pool_size, proxy_size)
    assert np.isfinite(norms).all()
    # the main model came out of the selection bit for bit, and then trained on the subset
    before, after = probe.weights_at_setup, probe.weights_at_train_start
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(tive.selected) == round(0.25 * dm.pool_size) and set(probe.seen) <= set(tive.selected.tolist())
    assert trainer.global_step > 0 and not any(".tive_reference." in n for n, _ in trainer.lightning_module.named_parameters())
    summary = json.loads((tmp / "tive" / "summary.json").read_text())
    assert summary["settings"]["reference_model"] == PROXY
    assert summary["features"]["settings"]["reference_model"] == PROXY
    assert summary["timings_s"]["proxy_build_s"] > 0 and summary["timings_s"]["valuation_s"] > 0


def test_the_features_are_those_of_the_phases_run_on_the_proxy_itself(proxy_run, tmp_path):
    tmp, _, tive, _, dm = proxy_run
    proxy = build_reference_model(PROXY, "cpu")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, precision="32-true")
    ReferencePhases(tive.config, trainer, proxy, dm, sharded=False).run(tmp_path)
    ours, theirs = features(tmp / "tive" / "features"), features(tmp_path / "features")
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_the_proxy_is_not_kept_after_valuation(tmp_path, monkeypatch):
    import weakref

    import lightning_tive.callback as callback

    built = []
    real = callback.build_reference_model

    def spy(*args, **kwargs):
        built.append(weakref.ref(proxy := real(*args, **kwargs)))
        return proxy

    monkeypatch.setattr(callback, "build_reference_model", spy)
    run_fit(tmp_path, reference_model=PROXY, stop_after_selection=True, proj_dim=16)
    assert len(built) == 1 and built[0]() is None


def test_a_restored_selection_does_not_rebuild_the_proxy(proxy_run, tmp_path, monkeypatch):
    import lightning_tive.callback as callback

    tmp, _, tive, _, _ = proxy_run
    monkeypatch.setattr(callback, "build_reference_model", lambda *a, **k: pytest.fail("the proxy was rebuilt"))
    _, again, _, _ = run_fit(tmp, max_epochs=2, ckpt_path=str(tmp / "ckpt" / "last.ckpt"), reference_model=PROXY, **EXACT)
    np.testing.assert_array_equal(again.selected, tive.selected)


@pytest.mark.parametrize(
    "other, expected",
    [({**PROXY, "tiny": {**PROXY["tiny"], "hidden_size": 48}}, "reference_model.tiny.hidden_size: folder has 32, requested 48"),
     (None, "extra.settings.reference_model.finetune: folder has 'lora', requested None")],
)
def test_a_store_valued_with_another_reference_model_is_refused(proxy_run, tmp_path, other, expected):
    shutil.copytree(proxy_run[0] / "tive" / "features", tmp_path / "tive" / "features")
    with pytest.raises(ValueError, match="does not match the requested settings") as refused:
        run_fit(tmp_path, reference_model=other, **EXACT)
    assert expected in str(refused.value)


def test_a_proxy_that_tokenises_otherwise_is_refused_naming_both(tmp_path):
    from transformers import AutoTokenizer

    from lightning_tive.data.tokenizer import demo_tokenizer_path

    main = LlavaModule(tiny=TinyLlavaConfig(), finetune="lora")
    tokenizer = AutoTokenizer.from_pretrained(str(demo_tokenizer_path()))
    tokenizer.add_tokens(["zebra-crossing"])
    tokenizer.save_pretrained(tmp_path / "tok")
    other = build_reference_model({"tiny": PROXY["tiny"], "tokenizer": str(tmp_path / "tok")}, "cpu")
    with pytest.raises(ValueError, match=r"the main model \(tiny=\{'hidden_size': 128.*\) and the proxy \(tiny=.*"
                                         r"tokenizer=.*tok\) differ in vocabulary") as refused:
        check_same_tokenisation(main, other)
    assert "not supported" in str(refused.value)
    patches = build_reference_model({"tiny": {**PROXY["tiny"], "patch_size": 8}, "tokenizer": "demo"}, "cpu")
    with pytest.raises(ValueError, match=r"image tokens: 16 \(main\) vs 64 \(proxy\)"):
        check_same_tokenisation(main, patches)
    check_same_tokenisation(main, build_reference_model(PROXY, "cpu"))  # the same tokenizer passes


@pytest.mark.parametrize(
    "settings, named",
    [({"tinyy": {}}, "tive.reference_model.tinyy is not a model argument"),
     ({"tiny": {"hidden": 32}}, "tive.reference_model.tiny.hidden is not a setting of TinyLlavaConfig"),
     ({"tiny": {}, "optimizer": "torch.optim.SGD"}, "tive.reference_model.optimizer is not a model argument"),
     ("tiny", "must be a mapping")],
)
def test_a_bad_reference_model_key_is_refused_naming_it(settings, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        TIVEConfig(reference_model=settings)


def test_the_demo_proxy_overlay_parses(tmp_path):
    from lightning_tive.callback import TIVESelectionCallback
    from lightning_tive.cli import run_cli

    files = ["demo.yaml", "smoke.yaml", "demo_proxy.yaml"]
    args = [a for f in files for a in ("--config", str(ROOT / "configs" / f))]
    cli = run_cli([*args, "--trainer.default_root_dir", str(tmp_path)], run=False)
    tive = next(c for c in cli.trainer.callbacks if isinstance(c, TIVESelectionCallback))
    proxy = tive.config.reference_model
    assert proxy["tiny"]["hidden_size"] < TinyLlavaConfig().hidden_size
    check_same_tokenisation(cli.model, build_reference_model(proxy, "cpu"))


def test_a_proxy_values_unsharded_while_fsdp2_shards_the_main_model(tmp_path):
    """One process under FSDP2Strategy (the CLI, in a subprocess: FSDP2 sets up its own process group)."""
    import subprocess
    import sys

    (tmp_path / "fsdp.yaml").write_text(
        "trainer:\n  strategy:\n    class_path: lightning_tive.sharding.FSDP2Strategy\n  logger: false\n"
        "  limit_train_batches: 2\n  limit_val_batches: 0\n"
    )
    files = [ROOT / "configs" / f for f in ("demo.yaml", "smoke.yaml", "demo_proxy.yaml")] + [tmp_path / "fsdp.yaml"]
    args = [a for f in files for a in ("--config", str(f))]
    done = subprocess.run(
        [sys.executable, "-m", "lightning_tive", "fit", *args, "--trainer.default_root_dir", str(tmp_path / "run"),
         "--torch_threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "valuing the pool with the proxy reference model" in done.stderr + done.stdout
    summary = json.loads((tmp_path / "run" / "tive" / "summary.json").read_text())
    assert summary["settings"]["reference_model"]["tiny"]["hidden_size"] == 64 and summary["selected"] == 40
    assert "proxy_build_s" in summary["timings_s"] and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_sharded_main_model_gets_no_reserved_adapter_with_a_proxy(monkeypatch):
    from types import SimpleNamespace

    import lightning_tive.callback as callback

    monkeypatch.setattr(callback, "is_sharded", lambda strategy: True)
    monkeypatch.setattr(callback, "data_parallel_mesh", lambda mesh: mesh)
    module = LlavaModule.__new__(LlavaModule)
    reserved = []
    module.reserve_reference_adapter = lambda *a: reserved.append(a)
    trainer = SimpleNamespace(strategy=SimpleNamespace(device_mesh=None), datamodule=None)
    monkeypatch.setattr(callback, "SUPPORTED_STRATEGIES", ("SimpleNamespace",))
    callback.TIVESelectionCallback(reference_model=PROXY).setup(trainer, module, "fit")
    assert reserved == []
    callback.TIVESelectionCallback().setup(trainer, module, "fit")  # without a proxy the adapter is reserved
    assert len(reserved) == 1
