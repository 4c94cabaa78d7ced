"""Hide optional packages from this interpreter, as on a machine that never installed them.

Put this folder first on ``PYTHONPATH`` and name the packages in ``LIGHTNING_TIVE_HIDE``
(comma-separated import names, e.g. ``jsonargparse,wandb,bitsandbytes,gguf``). Python imports
``sitecustomize`` at start-up; this one wraps the path finder so that those top-level names are not
found (``import`` raises ``ModuleNotFoundError``, ``importlib.util.find_spec`` returns None) and
their installed-distribution metadata is not listed (``importlib.metadata.version`` raises
``PackageNotFoundError``), which is how transformers, peft and Lightning probe for them.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys

HIDDEN = {name.strip() for name in os.environ.get("LIGHTNING_TIVE_HIDE", "").split(",") if name.strip()}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


_HIDDEN_DISTS = {_normal(name) for name in HIDDEN}


class _HidingFinder:
    """The path finder, minus the hidden packages and their distributions."""

    def __init__(self, inner: type) -> None:
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in self.inner.find_distributions(*args, **kwargs):
            if _normal(dist.metadata["Name"] or "") not in _HIDDEN_DISTS:
                yield dist

    def __getattr__(self, name):
        return getattr(self.inner, name)


if HIDDEN:
    sys.meta_path[:] = [
        _HidingFinder(finder) if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path
    ]
    for _name in list(sys.modules):
        if _name.partition(".")[0] in HIDDEN:
            del sys.modules[_name]
