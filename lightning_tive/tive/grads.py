"""Batched per-example gradient norms and projected features of adapter (e.g. LoRA) weights.

For a linear layer ``y_t = W x_t`` (``t`` runs over the tokens of one example), the gradient of
that example's loss with respect to ``W`` is ``G = sum_t go_t x_t^T``, where ``go_t`` is the
gradient of the loss with respect to ``y_t``. In one forward pass a tiny autograd node on every
target layer's output saves the layer's input ``x`` (as autograd's own saved tensor, so non-reentrant
checkpointing drops and recomputes it like any other activation); one backward pass of
``sum_s L(s)`` hands each node its layer's output-gradient ``go``. Because no
operation in a transformer mixes examples of a batch, ``go`` of example ``s`` is exactly the
output-gradient of ``L(s)`` alone, so the per-example gradients come out exactly as a loop over
batches of one would give them (up to float rounding), for any padding, with activation
checkpointing (non-reentrant) and with quantised base weights.

The engine never writes ``.grad`` and calls :func:`torch.autograd.grad` on the module it is given,
so it must be the unwrapped module (not a DDP wrapper). It differentiates with respect to the weight
tensors each target layer actually ran with, read in the forward hook: under FSDP2 those are the
all-gathered (unsharded) parameters, not the sharded DTensors registered between forwards, which
are no part of the autograd graph; without FSDP they are the parameters themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .projection import Projector

__all__ = ["ExampleGrads", "find_lora_layers", "layer_shapes", "per_example_grads"]

NORM_METHODS = ("auto", "materialise", "gram")


@dataclass
class ExampleGrads:
    """Per-example results of one batch (all on the device of the first target layer)."""

    #: [B] float32 exact L2 norm of the full adapter gradient; NaN where not finite.
    norms: Tensor
    #: [B, proj_dim] float32 projected gradient; zeros where not finite.
    features: Tensor
    #: [B] bool, False where the loss, the norm or any feature was NaN/inf.
    finite: Tensor
    #: [B] the per-example losses returned by the loss function (detached).
    losses: Tensor


def find_lora_layers(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, nn.Linear]]:
    """Return ``(name, Linear)`` for every ``lora_A``/``lora_B`` of ``adapter_name`` in module order."""
    found: list[tuple[str, nn.Linear]] = []
    adapters: set[str] = set()
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        adapters.update(lora_a.keys())
        if adapter_name not in lora_a:
            continue
        for side, container in (("lora_A", lora_a), ("lora_B", lora_b)):
            layer = container[adapter_name]
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name}.{side}.{adapter_name} is {type(layer).__name__}, not nn.Linear")
            found.append((f"{name}.{side}.{adapter_name}" if name else f"{side}.{adapter_name}", layer))
    if not found:
        known = ", ".join(sorted(adapters)) or "none"
        raise ValueError(f"no LoRA layers for adapter {adapter_name!r} (adapters found: {known})")
    return found


def _as_linears(layers: Sequence[nn.Linear] | Sequence[tuple[str, nn.Linear]]) -> list[nn.Linear]:
    out = [item[1] if isinstance(item, tuple) else item for item in layers]
    for i, layer in enumerate(out):
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layers[{i}] is {type(layer).__name__}, not nn.Linear")
    if not out:
        raise ValueError("no target layers given")
    return out


def layer_shapes(layers: Sequence[nn.Linear] | Sequence[tuple[str, nn.Linear]]) -> list[tuple[int, int]]:
    """Return the ``(d_out, d_in)`` weight shape of every target layer, in order."""
    return [(m.out_features, m.in_features) for m in _as_linears(layers)]


class _Tap(torch.autograd.Function):
    """Identity on a target layer's output whose backward hands (input, output-gradient) to the recorder.

    The input is held by autograd as a saved tensor, not by the recorder: under non-reentrant
    checkpointing it is dropped after the forward and recomputed for the backward, and otherwise it
    is freed as soon as this node's backward ran. It is the very tensor the layer itself saved for
    its weight gradient, so it costs no extra memory.
    """

    @staticmethod
    def forward(ctx: Any, recorder: _Recorder, index: int, x: Tensor, output: Tensor) -> Tensor:
        ctx.recorder, ctx.index = recorder, index
        ctx.save_for_backward(x)
        # A fresh alias rather than the input itself: autograd would make that a view, on which later
        # in-place operations (legal on a plain layer output) are forbidden.
        return output.detach()

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> tuple[None, None, None, Tensor]:
        try:
            (x,) = ctx.saved_tensors
        except RuntimeError as err:
            if "inplace" not in str(err):
                raise
            raise RuntimeError(
                f"the input of target layer {ctx.index} was modified in place after the forward pass"
            ) from err
        ctx.recorder.on_grad(ctx.index, x, go)
        return None, None, None, go


class _Recorder:
    """Forward hooks that tap each target layer's output, and the accumulation of its (input, output-gradient)."""

    def __init__(self, num_layers: int, projector: Projector, norm_method: str) -> None:
        self.projector = projector
        self.norm_method = norm_method
        self.calls = [0] * num_layers
        self.weights: list[Tensor | None] = [None] * num_layers  # the weight each layer ran with
        self.forward_done = False
        self.sq: Tensor | None = None
        self.out: Tensor | None = None

    def forward_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if not self.forward_done:
                self.calls[index] += 1
                if self.calls[index] > 1:
                    raise RuntimeError(
                        f"target layer {index} ran twice in one forward pass; shared layers are not supported"
                    )
                self.weights[index] = module.weight
            if not output.requires_grad:
                raise RuntimeError(
                    f"the output of target layer {index} does not require grad: run outside no_grad, and use "
                    "non-reentrant gradient checkpointing (use_reentrant=False)"
                )
            # Also in the recomputation of non-reentrant checkpointing (after forward_done): it must save
            # the same tensors as the original forward, whose saved input it then supplies. The nodes it
            # builds there are never run backward, so each layer still reports once.
            return _Tap.apply(self, index, args[0], output)

        return hook

    def on_grad(self, index: int, x: Tensor, go: Tensor) -> None:
        with torch.no_grad():
            batch = x.shape[0]
            x3 = x.detach().reshape(batch, -1, x.shape[-1]).float()
            g3 = go.detach().reshape(batch, -1, go.shape[-1]).float()
            if self.out is None:
                # float32 whatever the default dtype (bf16 under Lightning's bf16-true precision).
                self.out = torch.zeros(batch, self.projector.proj_dim, device=x.device, dtype=torch.float32)
                self.sq = torch.zeros(batch, device=x.device, dtype=torch.float32)
            d_out, d_in = g3.shape[-1], x3.shape[-1]
            tokens = x3.shape[1]
            method = self.norm_method
            if self.projector.needs_full_grad:
                method = "materialise"
            elif method == "auto":
                # Flop counts of the two exact formulas: B*T*d_out*d_in vs B*T^2*(d_out+d_in).
                method = "materialise" if d_out * d_in <= tokens * (d_out + d_in) else "gram"
            target = self.out if x.device == self.out.device else torch.zeros_like(self.out, device=x.device)
            if method == "materialise":
                grad = torch.bmm(g3.transpose(1, 2), x3)  # [B, d_out, d_in]
                sq = grad.pow(2).sum(dim=(1, 2))
            else:
                # ||sum_t a_t b_t^T||^2 = sum_{t,t'} (a_t.a_t')(b_t.b_t')
                sq = (torch.bmm(g3, g3.transpose(1, 2)) * torch.bmm(x3, x3.transpose(1, 2))).sum(dim=(1, 2))
                grad = None
            if self.projector.needs_full_grad:
                self.projector.project_layer(target, index, grad=grad)
            else:
                self.projector.project_layer(target, index, inputs=x3, grad_outputs=g3)
            if target is not self.out:
                self.out += target.to(self.out.device)
            self.sq += sq.to(self.sq.device)


def per_example_grads(
    layers: Sequence[nn.Linear] | Sequence[tuple[str, nn.Linear]],
    projector: Projector,
    loss_fn: Callable[[Any], Tensor],
    batch: Any,
    norm_method: str = "auto",
    sync_backward: bool = False,
) -> ExampleGrads:
    """Compute exact per-example gradient norms and projected features of ``layers``' weights on ``batch``.

    ``loss_fn(batch)`` must run the forward pass and return the per-example loss vector [B] (each
    example's own mean token NLL). Gradients are taken with respect to the layers' weights only (not
    biases), in one forward and one backward pass. Run it under :func:`.modes.deterministic_train_mode`
    (training mode, so gradient checkpointing applies, with every dropout at 0) or in eval mode for
    dropout-free, reproducible gradients. Features and norms are float32 whatever the default dtype.
    ``norm_method`` picks how the kronecker projector gets the exact norm:
    ``materialise`` (per-example ``[d_out, d_in]`` gradients), ``gram`` (token Gram matrices) or
    ``auto`` (the cheaper by flop count); the other projectors always materialise. ``sync_backward`` runs
    the backward even when no loss is finite (under FSDP every process must run it: it is a collective).
    """
    linears = _as_linears(layers)
    if norm_method not in NORM_METHODS:
        raise ValueError(f"norm_method={norm_method!r} is not one of {', '.join(NORM_METHODS)}")
    if [tuple(s) for s in projector.layer_shapes] != layer_shapes(linears):
        raise ValueError(
            f"projector was built for layer shapes {list(projector.layer_shapes)}, "
            f"but the target layers have {layer_shapes(linears)}"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError("per_example_grads cannot run under torch.inference_mode()")

    recorder = _Recorder(len(linears), projector, norm_method)
    weights = [m.weight for m in linears]
    saved_flags = [w.requires_grad for w in weights]
    handles = [m.register_forward_hook(recorder.forward_hook(i)) for i, m in enumerate(linears)]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            losses = loss_fn(batch)
            recorder.forward_done = True
            if losses.dim() != 1:
                raise ValueError(
                    f"loss_fn must return a per-example loss vector [B], got shape {tuple(losses.shape)}"
                )
            finite = torch.isfinite(losses.detach())
            if sync_backward or bool(finite.any()):
                # Non-finite examples are cut off at the loss so their gradients stay zero; examples never
                # mix inside the network, so the others are unaffected.
                total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
                ran = [w for w in recorder.weights if w is not None]
                if ran:
                    torch.autograd.grad(total, ran, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for w, flag in zip(weights, saved_flags, strict=True):
            w.requires_grad_(flag)

    batch_size = losses.shape[0]
    device = weights[0].device
    out = (
        recorder.out
        if recorder.out is not None
        else torch.zeros(batch_size, projector.proj_dim, device=device, dtype=torch.float32)
    )
    sq = recorder.sq if recorder.sq is not None else torch.zeros(batch_size, device=device, dtype=torch.float32)
    if out.shape[0] != batch_size:
        raise ValueError(
            f"loss_fn returned {batch_size} losses but the target layers saw a batch of {out.shape[0]}; "
            "layer inputs must have the batch as their first dimension"
        )
    finite = finite.to(out.device) & torch.isfinite(sq) & torch.isfinite(out).all(dim=1)
    features = torch.where(finite[:, None], out, torch.zeros_like(out))
    norms = torch.where(finite, sq.clamp_min(0).sqrt(), torch.full_like(sq, float("nan")))
    return ExampleGrads(norms=norms, features=features, finite=finite, losses=losses.detach())
