"""Training mode without randomness: gradient checkpointing applies, dropout does not.

transformers only checkpoints a layer when the layer is in training mode, so valuation in ``eval()``
keeps every activation of the forward pass. :func:`deterministic_train_mode` puts the model in
training mode instead, with every dropout probability set to 0, so the features are the same as in
``eval()`` while memory stays that of a training step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["deterministic_train_mode"]


def _dropout_settings(module: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    for sub in module.modules():
        if isinstance(sub, _DropoutNd):
            yield sub, "p"
            continue
        # Attention modules keep their probability as a float attribute and pass it to a functional
        # dropout while training (`attention_dropout` in Llama, `dropout` in CLIP).
        for name, value in vars(sub).items():
            if "dropout" in name and type(value) is float:
                yield sub, name


@contextmanager
def deterministic_train_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in training mode with every dropout probability at 0; restore both exactly on exit.

    Covers ``nn.Dropout*`` modules (peft's ``lora_dropout``) and float attributes whose name contains
    ``dropout`` on any submodule (attention modules). A probability read from a config object at
    forward time is not covered. Every submodule's ``training`` flag and every changed probability
    get their previous value back, also when the body raises.
    """
    flags = [(sub, sub.training) for sub in module.modules()]
    changed: list[tuple[nn.Module, str, float]] = []
    try:
        module.train()
        for sub, name in list(_dropout_settings(module)):
            value = getattr(sub, name)
            if value != 0:
                changed.append((sub, name, value))
                setattr(sub, name, 0.0)
        yield module
    finally:
        for sub, name, value in reversed(changed):
            setattr(sub, name, value)
        for sub, flag in flags:
            sub.training = flag
