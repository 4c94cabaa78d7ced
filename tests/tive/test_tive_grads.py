"""Per-example gradients: exact against a loop over batches of one, in every supported setting."""

from __future__ import annotations

import warnings

import pytest
import torch
from tive_testutils import add_lora, make_batch, naive_reference, per_example_loss, tiny_llama

from lightning_tive.tive.grads import find_lora_layers, layer_shapes, per_example_grads
from lightning_tive.tive.modes import deterministic_train_mode
from lightning_tive.tive.projection import build_projector

RTOL = 1e-5
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
LENGTHS = [5, 11, 8, 3, 9]
PROMPTS = [2, 6, 1, 1, 4]


def assert_matches(result, ref_norms, ref_feats, rows=None):
    rows = list(range(ref_norms.shape[0])) if rows is None else rows
    norms, feats = result.norms[rows].double(), result.features[rows].double()
    assert (norms - ref_norms[rows]).abs().max() <= RTOL * ref_norms[rows].max()
    assert (feats - ref_feats[rows].double()).abs().max() <= RTOL * ref_feats[rows].abs().max()


@pytest.fixture(scope="module")
def lora_model():
    return add_lora(tiny_llama())


def test_find_lora_layers_lists_a_and_b_of_the_adapter(lora_model):
    layers = find_lora_layers(lora_model)
    assert len(layers) == 2 * 4 * 2  # decoder layers x (q,k,v,o) x (A,B)
    names = [n for n, _ in layers]
    assert names[0].endswith("layers.0.self_attn.q_proj.lora_A.default")
    assert names[1].endswith("layers.0.self_attn.q_proj.lora_B.default")
    assert layer_shapes(layers)[:2] == [(4, 64), (64, 4)]
    with pytest.raises(ValueError, match="adapter 'other'.*default"):
        find_lora_layers(lora_model, "other")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "kind, dim, norm_method",
    [
        ("identity", None, "auto"),
        ("rademacher", 96, "auto"),
        ("kronecker", 96, "materialise"),
        ("kronecker", 96, "gram"),
        ("kronecker", 4096, "auto"),  # larger than some layers: their share is exact
    ],
)
def test_batched_equals_batch_of_one(lora_model, side, kind, dim, norm_method):
    layers = find_lora_layers(lora_model)
    proj = build_projector(kind, dim, 0, layer_shapes(layers))
    batch = make_batch(LENGTHS, PROMPTS, side=side)
    result = per_example_grads(layers, proj, lambda b: per_example_loss(lora_model, b), batch, norm_method)
    ref_norms, ref_feats = naive_reference(lora_model, layers, proj, batch)
    assert result.finite.all()
    assert result.features.shape == (len(LENGTHS), proj.proj_dim)
    assert ref_norms.min() > 0
    assert_matches(result, ref_norms, ref_feats)
    for _, layer in layers:
        assert layer.weight.grad is None  # never accumulates into .grad


@pytest.mark.parametrize("targets", [ATTENTION, ATTENTION + MLP])
def test_gradient_checkpointing_non_reentrant(targets):
    # With down_proj targeted, the last tensor a decoder layer saves is a target layer's input, where
    # checkpointing's early stop ends the recomputation.
    reference_model = add_lora(tiny_llama(), targets=targets)
    model = add_lora(tiny_llama(), targets=targets)
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.train()  # transformers only checkpoints in training mode; every dropout here is 0
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    calls = []
    handle = lora_a.register_forward_hook(lambda *a: calls.append(1))
    layers = find_lora_layers(model)
    proj = build_projector("kronecker", 96, 0, layer_shapes(layers))
    batch = make_batch(LENGTHS, PROMPTS, side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = per_example_grads(layers, proj, lambda b: per_example_loss(model, b), batch)
    handle.remove()
    assert len(calls) == 2  # the target layer really ran again during backward
    ref_layers = find_lora_layers(reference_model)
    ref_norms, ref_feats = naive_reference(reference_model, ref_layers, proj, batch)
    assert_matches(result, ref_norms, ref_feats)


def test_reentrant_checkpointing_is_refused_clearly():
    model = add_lora(tiny_llama())
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    model.train()
    layers = find_lora_layers(model)
    proj = build_projector("kronecker", 96, 0, layer_shapes(layers))
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="use_reentrant=False"):
        warnings.simplefilter("ignore")
        per_example_grads(layers, proj, lambda b: per_example_loss(model, b), make_batch([4, 6], [1, 1]))


def test_4bit_nf4_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    model = add_lora(base)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    layers = find_lora_layers(model)
    for kind, dim in [("identity", None), ("kronecker", 96)]:
        proj = build_projector(kind, dim, 0, layer_shapes(layers))
        batch = make_batch(LENGTHS, PROMPTS, side="right")
        result = per_example_grads(layers, proj, lambda b: per_example_loss(model, b), batch)
        ref_norms, ref_feats = naive_reference(model, layers, proj, batch)
        assert_matches(result, ref_norms, ref_feats)


class _NanGradForRow(torch.autograd.Function):
    """Identity forward; backward poisons one row's gradient with NaN (a finite loss, a NaN gradient)."""

    @staticmethod
    def forward(ctx, x, row):
        ctx.row = row
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.row] = float("nan")
        return grad, None


def test_non_finite_examples_are_flagged_not_propagated(lora_model):
    layers = find_lora_layers(lora_model)
    proj = build_projector("kronecker", 96, 0, layer_shapes(layers))
    # Example 1 has no supervised token (loss 0/0 = NaN); example 3's gradient is NaN with a finite loss.
    batch = make_batch(LENGTHS, [2, 11, 1, 1, 4], side="right")

    def loss_fn(b):
        mask = b["attention_mask"]
        hidden = lora_model.base_model.model.model(
            input_ids=b["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)
        ).last_hidden_state
        logits = lora_model.base_model.model.lm_head(_NanGradForRow.apply(hidden, 3))[:, :-1]
        labels = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return nll.sum(-1) / (labels != -100).sum(-1)

    result = per_example_grads(layers, proj, loss_fn, batch)
    assert result.finite.tolist() == [True, False, True, False, True]
    assert torch.isnan(result.norms[[1, 3]]).all()
    assert (result.features[[1, 3]] == 0).all()
    ref_norms, ref_feats = naive_reference(
        lora_model, layers, proj, {k: v[[0, 2, 4]] for k, v in batch.items()}
    )
    full_norms = torch.zeros(5, dtype=torch.float64)
    full_feats = torch.zeros(5, proj.proj_dim)
    full_norms[[0, 2, 4]], full_feats[[0, 2, 4]] = ref_norms, ref_feats
    assert_matches(result, full_norms, full_feats, rows=[0, 2, 4])


def test_plain_linear_layers_on_2d_inputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 5, bias=False), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False)
    )
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    layers = [net[0], net[2]]
    proj = build_projector("identity", None, 0, layer_shapes(layers))

    def loss_fn(idx):
        return torch.nn.functional.cross_entropy(net(x[idx]), y[idx], reduction="none")

    result = per_example_grads(layers, proj, loss_fn, torch.arange(7))
    for i in range(7):
        grads = torch.autograd.grad(loss_fn(torch.tensor([i]))[0], [m.weight for m in layers])
        torch.testing.assert_close(result.features[i], torch.cat([g.flatten() for g in grads]))


def test_state_is_restored_and_no_grad_context_is_fine(lora_model):
    layers = find_lora_layers(lora_model)
    proj = build_projector("kronecker", 96, 0, layer_shapes(layers))
    batch = make_batch(LENGTHS, PROMPTS)
    expected = per_example_grads(layers, proj, lambda b: per_example_loss(lora_model, b), batch)
    for _, m in layers:
        m.weight.requires_grad_(False)
    try:
        with torch.no_grad():
            result = per_example_grads(layers, proj, lambda b: per_example_loss(lora_model, b), batch)
        assert all(not m.weight.requires_grad for _, m in layers)
    finally:
        for _, m in layers:
            m.weight.requires_grad_(True)
    assert torch.equal(result.features, expected.features)
    assert all(not m._forward_hooks for _, m in layers)


def test_bad_inputs_are_refused(lora_model):
    layers = find_lora_layers(lora_model)
    proj = build_projector("kronecker", 96, 0, layer_shapes(layers))
    batch = make_batch([4, 6], [1, 1])
    with pytest.raises(ValueError, match="per-example loss vector"):
        per_example_grads(layers, proj, lambda b: per_example_loss(lora_model, b).mean(), batch)
    with pytest.raises(ValueError, match="layer shapes"):
        per_example_grads(layers[:4], proj, lambda b: per_example_loss(lora_model, b), batch)
    with pytest.raises(ValueError, match="norm_method"):
        per_example_grads(layers, proj, lambda b: per_example_loss(lora_model, b), batch, norm_method="exact")


def test_inputs_modified_in_place_after_forward_are_detected():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False)
    proj = build_projector("identity", None, 0, layer_shapes([lin]))

    def loss_fn(x):
        hidden = x * 1.0
        out = lin(hidden)
        hidden.mul_(2)  # the output-gradient hook runs before autograd would notice this itself
        return out.pow(2).sum(-1)

    with pytest.raises(RuntimeError, match="modified in place"):
        per_example_grads([lin], proj, loss_fn, torch.randn(2, 4))


def _input_storages(model, layers):
    """Forward hooks keeping weak references to every target layer input's storage (recomputations excluded)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    refs: list = []
    seen: set = set()

    def hook(module, args, output):
        if id(module) not in seen:  # a checkpoint recomputation runs the layer again: keep the first
            seen.add(id(module))
            refs.append(StorageWeakRef(args[0].untyped_storage()))

    return refs, [m.register_forward_hook(hook) for _, m in layers]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_layer_inputs_live_no_longer_than_autograd_keeps_them(checkpointing):
    import gc

    model = add_lora(tiny_llama())
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    layers = find_lora_layers(model)
    proj = build_projector("kronecker", 96, 0, layer_shapes(layers))
    refs, handles = _input_storages(model, layers)
    alive_after_forward = []

    def loss_fn(b):
        losses = per_example_loss(model, b)
        gc.collect()
        alive_after_forward.append(sum(not r.expired() for r in refs))
        return losses

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_example_grads(layers, proj, loss_fn, make_batch(LENGTHS, PROMPTS))
    finally:
        for handle in handles:
            handle.remove()
    gc.collect()
    assert len(refs) == len(layers)
    if checkpointing:
        # Inputs made inside a checkpointed decoder layer are dropped with its other activations.
        assert alive_after_forward == [0]
    else:
        assert alive_after_forward == [len(layers)]
    assert all(r.expired() for r in refs)  # nothing outlives the backward


def test_target_layer_outputs_may_be_modified_in_place():
    torch.manual_seed(0)
    net = torch.nn.ModuleList([torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 3, bias=False)])
    x = torch.randn(4, 6)
    layers = list(net)
    proj = build_projector("identity", None, 0, layer_shapes(layers))

    def loss_fn(idx):
        hidden = net[0](x[idx])
        hidden.mul_(2).tanh_()  # legal on a plain layer output, so it must stay legal with the engine
        return net[1](hidden).pow(2).sum(-1)

    result = per_example_grads(layers, proj, loss_fn, torch.arange(4))
    for i in range(4):
        grads = torch.autograd.grad(loss_fn(torch.tensor([i]))[0], [m.weight for m in layers])
        torch.testing.assert_close(result.features[i], torch.cat([g.flatten() for g in grads]))


def _dropout_model():
    """LoRA dropout 0.3 and attention dropout 0.3, checkpointing on, in eval mode."""
    model = add_lora(tiny_llama(attention_dropout=0.3), dropout=0.3)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return model


def test_deterministic_train_mode_checkpoints_without_dropout():
    model = _dropout_model()
    layers = find_lora_layers(model)
    proj = build_projector("kronecker", 96, 0, layer_shapes(layers))
    batch = make_batch(LENGTHS, PROMPTS, side="left")
    # A pre-hook: checkpointing's early stop may end the recomputation inside the layer's last module,
    # before that module's forward hooks would run.
    mlp = model.base_model.model.model.layers[0].mlp  # inside the checkpointed decoder layer
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *a: calls.append(1))

    def run():
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = per_example_grads(layers, proj, lambda b: per_example_loss(model, b), batch)
        return result, len(calls)

    try:
        evaluated, eval_calls = run()
        with deterministic_train_mode(model):
            first, first_calls = run()
            second, _ = run()
        model.train()
        noisy, train_calls = run()  # the dropout really is there outside the context
        model.eval()
    finally:
        handle.remove()
    assert (eval_calls, first_calls, train_calls) == (1, 2, 2)  # checkpointing recomputes in training mode only
    assert torch.equal(first.features, second.features) and torch.equal(first.norms, second.norms)
    assert_matches(first, evaluated.norms.double(), evaluated.features)
    assert not torch.allclose(noisy.features, evaluated.features, rtol=1e-3)


def test_deterministic_train_mode_restores_flags_and_probabilities_exactly():
    model = _dropout_model()
    inner = model.base_model.model.model
    inner.layers[1].train()  # a mixed state must come back as it was
    q_proj = inner.layers[0].self_attn.q_proj
    attention = inner.layers[0].self_attn
    before = {name: m.training for name, m in model.named_modules()}
    assert q_proj.lora_dropout["default"].p == 0.3 and attention.attention_dropout == 0.3
    with pytest.raises(KeyError), deterministic_train_mode(model):
        assert all(m.training for m in model.modules())
        assert q_proj.lora_dropout["default"].p == 0.0 and attention.attention_dropout == 0.0
        raise KeyError("body fails")
    assert {name: m.training for name, m in model.named_modules()} == before
    assert q_proj.lora_dropout["default"].p == 0.3 and attention.attention_dropout == 0.3
    with deterministic_train_mode(model), deterministic_train_mode(model):  # nesting is harmless
        pass
    assert {name: m.training for name, m in model.named_modules()} == before
    assert q_proj.lora_dropout["default"].p == 0.3 and attention.attention_dropout == 0.3


@pytest.fixture
def bf16_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as Lightning's bf16-true precision does
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _capture_factors(layers):
    """Each target layer's (input, output-gradient) from the same pass, kept for an fp64 reference."""
    store: dict[int, list] = {}

    def forward_hook(index):
        def hook(module, args, output):
            store[index] = [args[0].detach()]
            output.register_hook(lambda go: store[index].append(go.detach()))

        return hook

    return store, [m.register_forward_hook(forward_hook(i)) for i, (_, m) in enumerate(layers)]


@pytest.mark.parametrize("kind, dim", [("kronecker", 96), ("identity", None)])
def test_bf16_default_dtype_accumulates_in_float32(bf16_default, kind, dim):
    model = add_lora(tiny_llama())
    assert next(model.parameters()).dtype == torch.bfloat16
    layers = find_lora_layers(model)
    proj = build_projector(kind, dim, 0, layer_shapes(layers))
    batch = make_batch(LENGTHS, PROMPTS)
    store, handles = _capture_factors(layers)
    try:
        result = per_example_grads(layers, proj, lambda b: per_example_loss(model, b), batch)
    finally:
        for handle in handles:
            handle.remove()
    assert result.features.dtype == torch.float32 and result.norms.dtype == torch.float32
    # fp64 reference of the very gradients this bf16 pass defines: G_s = sum_t go_t x_t^T per layer.
    grads = [
        torch.einsum("bto,bti->boi", go.double().reshape(len(LENGTHS), -1, go.shape[-1]),
                     x.double().reshape(len(LENGTHS), -1, x.shape[-1]))
        for x, go in (store[i] for i in range(len(layers)))
    ]
    ref_norms = torch.sqrt(sum(g.pow(2).sum(dim=(1, 2)) for g in grads))
    ref_feats = proj.project([g.float() for g in grads]).double()
    err_norms = ((result.norms.double() - ref_norms).abs() / ref_norms).max()
    err_feats = (result.features.double() - ref_feats).abs().max() / ref_feats.abs().max()
    # Any bf16 accumulator rounds the result at least once; the float32 one is far inside that.
    bf16_norms = ((ref_norms.bfloat16().double() - ref_norms).abs() / ref_norms).max()
    bf16_feats = (ref_feats.bfloat16().double() - ref_feats).abs().max() / ref_feats.abs().max()
    assert err_norms < 1e-5 < bf16_norms / 10
    assert err_feats < 1e-5 < bf16_feats / 10
    # And against the definition, a loop over batches of one, within what a bf16 model reproduces.
    loop_norms, loop_feats = naive_reference(model, layers, proj, batch)
    assert ((result.norms.double() - loop_norms).abs() / loop_norms).max() < 1e-2
    assert (result.features - loop_feats.float()).abs().max() / loop_feats.float().abs().max() < 1e-2
