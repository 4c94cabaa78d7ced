"""The reference adapter under FSDP2 (one process, gloo): reserved before sharding, trained, removed, main weights kept."""

from __future__ import annotations

import pytest
import torch
from fit_helpers import DEMO

from lightning_tive.distributed import Collectives
from lightning_tive.model import LlavaModule, TinyLlavaConfig
from lightning_tive.reference_adapter import adapter_state, reference_model, tensor_digest
from lightning_tive.sharding import full, is_dtensor
from lightning_tive.tive_config import ReferenceLora, TIVEConfig

CONFIG = TIVEConfig(reference_lora=ReferenceLora(r=4, alpha=8, dropout=0.0), seed=3)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this session")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def batch(processor):
    from lightning_tive.data.datamodule import LlavaDataModule

    dm = LlavaDataModule(demo=DEMO, batch_size=4, max_length=256)
    dm.attach_processor(processor)
    dm.setup("fit")
    return next(iter(dm.pool_dataloader(list(range(0, 40, 5)), batch_size=8)))


class FakeTrainer:
    def __init__(self, precision: str) -> None:
        self.precision, self.strategy, self.world_size = precision, object(), 1


def sharded(finetune: str, precision: str = "32-true") -> tuple[LlavaModule, dict, dict]:
    """A module sharded as under ModelParallelStrategy, with its weights' digests and flags from before."""
    from torch.distributed.device_mesh import init_device_mesh

    module = LlavaModule(tiny=TinyLlavaConfig(), finetune=finetune)
    module._trainer = FakeTrainer(precision)
    digests = whole_digests(module)
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    module.reserve_reference_adapter(CONFIG.reference_lora, CONFIG.seed)
    module._device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    module.configure_model()
    return module, digests, flags


def whole_digests(module: LlavaModule) -> dict[str, str]:
    return {name: tensor_digest(full(p.detach())) for name, p in module.trainable_parameters()}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_main_weights_are_bit_identical_after_a_sharded_warm_up(process_group, batch, finetune):
    module, before, flags = sharded(finetune)
    assert module.sharded and all(is_dtensor(p) for p in module.parameters())
    # the reserved adapter starts as the one add_reference_adapter gives an unsharded module
    plain = LlavaModule(tiny=TinyLlavaConfig(), finetune=finetune)
    expected = adapter_state(plain.add_reference_adapter(CONFIG.reference_lora, CONFIG.seed), [])
    with reference_model(module, CONFIG, Collectives(1, 0, "cpu")) as (adapter, extra):
        assert adapter_state(adapter, []).keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in adapter_state(adapter, []).items())
        assert all(is_dtensor(layer.weight) for _, layer in adapter)
        for p in extra:
            p.requires_grad_(True)
        params = [p for p in module.parameters() if p.requires_grad]
        assert {id(p) for p in params} == {id(layer.weight) for _, layer in adapter} | {id(p) for p in extra}
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(2):  # an ordinary backward and optimizer step over the sharded adapter
            module.per_example_loss(batch).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        trained = adapter_state(adapter, extra)
        assert any(not torch.equal(v, expected[k]) for k, v in trained.items() if k in expected)
    assert whole_digests(module) == before  # the projector was trained too, and restored
    assert {name: p.requires_grad for name, p in module.named_parameters()} == flags
    loss = module.per_example_loss(batch).mean()  # the main model still trains under FSDP
    loss.backward()
    assert all(p.grad is not None for _, p in module.trainable_parameters())


def test_a_changed_main_weight_is_caught_under_sharding(process_group):
    module, _, _ = sharded("full")
    with pytest.raises(RuntimeError, match="changed the main model's trainable weights"):
        with reference_model(module, CONFIG, Collectives(1, 0, "cpu")):
            weight = module.llava.model.language_model.layers[0].mlp.down_proj.weight
            with torch.no_grad():
                weight.to_local()[0, 0] += 1.0


def test_bf16_mixed_keeps_fp32_weights_and_gradients_after_the_warm_up(process_group, batch):
    module, _, _ = sharded("full", "bf16-mixed")
    with reference_model(module, CONFIG, Collectives(1, 0, "cpu")):
        module.per_example_loss(batch).mean().backward()  # FSDP fixes its gradient dtypes at this first forward
        for p in module.parameters():
            p.grad = None
    loss = module.per_example_loss(batch).mean()  # the LM (frozen during the warm-up) trains now
    assert loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for _, p in module.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_padding_the_loss_chunks_calls_the_head_as_often_without_changing_the_loss():
    from lightning_tive.model import chunked_per_example_nll

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, -100, 3, 4], [-100, -100, 5, 6, -100, -100]])
    plain = chunked_per_example_nll(hidden, labels, head, chunk_tokens=2)
    assert len(calls) == 3  # 6 supervised next-token positions (4 + 2) in chunks of 2: no padding unless asked
    calls.clear()
    padded = chunked_per_example_nll(hidden, labels, head, chunk_tokens=2, min_chunks=5)
    assert len(calls) == 5  # the same 3 chunks, padded to 5 (every process runs lm_head alike)
    for a, b in zip(plain, padded, strict=True):
        assert torch.equal(a, b)
    grads = [torch.autograd.grad(out[0].sum(), [hidden, head.weight]) for out in (plain, padded)]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_param_groups_are_read_from_either_layout_of_fsdp2s_unit_state():
    from types import SimpleNamespace

    from lightning_tive.sharding import fsdp_param_groups

    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_groups=("a", "b"))) == ["a", "b"]  # torch 2.12 on
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_group="a")) == ["a"]  # torch 2.11: one per unit
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_group=None)) == []  # a unit without parameters
