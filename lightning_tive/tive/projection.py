"""Seeded random projections of per-example gradients of linear layers.

Every projector maps the per-example gradients of an ordered list of linear layers (layer ``l`` has a
weight of shape ``(d_out, d_in)``) to one vector of ``proj_dim`` numbers. The reference definition is
:meth:`Projector.project`, which takes the full per-example gradients; the gradient engine uses the
cheaper per-layer entry point :meth:`Projector.project_layer`, which for ``kronecker`` works on the
layer's inputs and output-gradients directly.

All random matrices are drawn on the CPU from ``torch.Generator`` objects seeded with
:func:`derive_seed` ``(seed, kind, layer, block/side)``. They never touch the global RNG, so every
process (and every device, since they are moved after being drawn) sees the same projection.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "PROJECTOR_KINDS",
    "IdentityProjector",
    "KroneckerProjector",
    "Projector",
    "RademacherProjector",
    "build_projector",
    "derive_seed",
    "kronecker_shares",
]

PROJECTOR_KINDS = ("identity", "rademacher", "kronecker")

LayerShape = tuple[int, int]


def derive_seed(seed: int, *keys: object) -> int:
    """Return a 63-bit seed derived from ``seed`` and ``keys``, identical in every process."""
    # Python's hash() is salted per process, so a cryptographic digest is used instead.
    text = ":".join([str(int(seed)), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def _rademacher(rows: int, cols: int, seed: int) -> Tensor:
    """Return a ``rows x cols`` float32 matrix of ±1 drawn from a generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # randint on the CPU is a serial stream, so the draw does not depend on the thread count.
    return torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.float32).mul_(2).sub_(1)


def _check_shapes(layer_shapes: Sequence[Sequence[int]]) -> tuple[LayerShape, ...]:
    shapes = tuple((int(s[0]), int(s[1])) for s in layer_shapes)
    if not shapes:
        raise ValueError("layer_shapes is empty: there are no adapter layers to project")
    for i, (d_out, d_in) in enumerate(shapes):
        if d_out <= 0 or d_in <= 0:
            raise ValueError(f"layer_shapes[{i}] = {(d_out, d_in)} must have positive sizes")
    return shapes


class Projector(ABC):
    """Maps per-example gradients of an ordered list of linear layers to ``proj_dim`` features."""

    kind: str = ""
    #: True when :meth:`project_layer` needs the materialised per-example layer gradient.
    needs_full_grad: bool = True

    def __init__(self, proj_dim: int, seed: int, layer_shapes: Sequence[Sequence[int]]) -> None:
        self.layer_shapes = _check_shapes(layer_shapes)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)

    @property
    def full_dim(self) -> int:
        """Number of gradient coordinates over all layers."""
        return sum(o * i for o, i in self.layer_shapes)

    @abstractmethod
    def project_layer(
        self,
        out: Tensor,
        layer: int,
        *,
        grad: Tensor | None = None,
        inputs: Tensor | None = None,
        grad_outputs: Tensor | None = None,
    ) -> None:
        """Add layer ``layer``'s share to ``out`` [B, proj_dim] from its grad [B, d_out, d_in] or factors."""

    def project(self, grads: Sequence[Tensor]) -> Tensor:
        """Project full per-example gradients (one [B, d_out, d_in] tensor per layer) to [B, proj_dim]."""
        if len(grads) != len(self.layer_shapes):
            raise ValueError(f"expected {len(self.layer_shapes)} layer gradients, got {len(grads)}")
        first = grads[0]
        out = torch.zeros(first.shape[0], self.proj_dim, device=first.device, dtype=torch.float32)
        for layer, g in enumerate(grads):
            if tuple(g.shape[1:]) != self.layer_shapes[layer]:
                raise ValueError(
                    f"layer {layer}: gradient shape {tuple(g.shape[1:])} != {self.layer_shapes[layer]}"
                )
            self.project_layer(out, layer, grad=g.float())
        return out

    def describe(self) -> dict:
        """Return a JSON-able description (kind, dims, seed, per-layer shares)."""
        return {"kind": self.kind, "proj_dim": self.proj_dim, "seed": self.seed, "full_dim": self.full_dim}


class IdentityProjector(Projector):
    """The full flattened gradient, layers concatenated in order (each row-major, like ``weight.flatten()``)."""

    kind = "identity"

    def __init__(self, proj_dim: int | None, seed: int, layer_shapes: Sequence[Sequence[int]]) -> None:
        shapes = _check_shapes(layer_shapes)
        full = sum(o * i for o, i in shapes)
        if proj_dim is not None and int(proj_dim) != full:
            raise ValueError(
                f"projector='identity' keeps the full gradient of {full} dims, but proj_dim={proj_dim}; "
                f"set proj_dim to None or {full}"
            )
        super().__init__(full, seed, shapes)
        self.offsets = [0]
        for o, i in shapes:
            self.offsets.append(self.offsets[-1] + o * i)

    def project_layer(self, out, layer, *, grad=None, inputs=None, grad_outputs=None) -> None:
        """Copy layer ``layer``'s flattened gradient into its slice of ``out``."""
        if grad is None:
            raise ValueError("identity projector needs the full per-example gradient")
        out[:, self.offsets[layer] : self.offsets[layer + 1]] += grad.reshape(grad.shape[0], -1)


class RademacherProjector(Projector):
    """Dense JL projection ``f = R g / sqrt(proj_dim)`` with ``R`` of ±1 (the TRAK/LESS projector).

    ``R`` has one column per gradient coordinate. Its columns are drawn in blocks of ``block_size``
    consecutive coordinates of one layer, block ``b`` of layer ``l`` from seed
    ``derive_seed(seed, "rademacher", l, b)``; so ``R`` is defined without ever being stored whole.
    Blocks are kept in memory up to ``cache_bytes`` and redrawn on every call beyond that.
    """

    kind = "rademacher"

    def __init__(
        self,
        proj_dim: int,
        seed: int,
        layer_shapes: Sequence[Sequence[int]],
        block_size: int = 1024,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        super().__init__(proj_dim, seed, layer_shapes)
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = int(block_size)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}
        self._cached_bytes = 0

    def _block(self, layer: int, block: int, rows: int, device: torch.device) -> Tensor:
        key = (layer, block, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        mat = _rademacher(rows, self.proj_dim, derive_seed(self.seed, self.kind, layer, block)).to(device)
        size = mat.numel() * mat.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = mat
            self._cached_bytes += size
        return mat

    def project_layer(self, out, layer, *, grad=None, inputs=None, grad_outputs=None) -> None:
        """Add ``R_l g_l / sqrt(proj_dim)`` for layer ``layer`` to ``out``."""
        if grad is None:
            raise ValueError("rademacher projector needs the full per-example gradient")
        flat = grad.reshape(grad.shape[0], -1).float()
        scale = 1.0 / math.sqrt(self.proj_dim)
        for block, start in enumerate(range(0, flat.shape[1], self.block_size)):
            stop = min(start + self.block_size, flat.shape[1])
            out.add_(flat[:, start:stop] @ self._block(layer, block, stop - start, flat.device), alpha=scale)

    def describe(self) -> dict:
        """Return a JSON-able description including the block size."""
        return {**super().describe(), "block_size": self.block_size}


def _side_cost(k: int, d: int, used: float) -> float:
    # A +-1 side averages over min(k, used) independent rows (relative variance ~ 1/rows); a whole side is exact.
    return 0.0 if k >= d else 1.0 / min(k, used)


def kronecker_shares(proj_dim: int, layer_shapes: Sequence[Sequence[int]]) -> list[dict]:
    """Split ``proj_dim`` over layers for the kronecker projector; return one dict per layer.

    Shares: every layer gets ``proj_dim // L`` dims and the first ``proj_dim % L`` layers one more
    (``L`` = number of layers), so the shares add up to ``proj_dim`` exactly.

    Per layer with share ``s`` and weight ``(d_out, d_in)``:

    * ``s >= d_out*d_in`` (mode ``exact``): the layer's gradient is kept as is, row major, followed by
      ``s - d_out*d_in`` zeros.
    * otherwise (mode ``projected``): ``k_out x k_in`` entries ``p_out_i^T G p_in_j`` with
      ``k_side <= d_side`` and ``k_in = ceil(s / k_out)``; ``k_out`` minimises the variance proxy
      ``[k_out<d_out]/min(k_out, s/k_in) + [k_in<d_in]/min(k_in, s/k_out)`` (ties: fewer entries,
      then smaller ``k_out``), which is the most square pair unless one side is small enough to be
      kept whole. A side kept whole
      (``k == d``) is a seeded signed permutation scaled by ``sqrt(d)`` (exact), any other side is
      ±1. The entries are flattened with a whole side innermost and the first ``s`` are kept.
    """
    shapes = _check_shapes(layer_shapes)
    n = len(shapes)
    if proj_dim < n:
        raise ValueError(
            f"proj_dim={proj_dim} is too small for projector='kronecker' over {n} adapter layers: "
            f"each layer needs at least one dimension, so proj_dim must be >= {n}"
        )
    base, extra = divmod(int(proj_dim), n)
    rows, offset = [], 0
    for layer, (d_out, d_in) in enumerate(shapes):
        share = base + (1 if layer < extra else 0)
        row = {"layer": layer, "d_out": d_out, "d_in": d_in, "share": share, "offset": offset}
        if share >= d_out * d_in:
            row.update(
                mode="exact", k_out=d_out, k_in=d_in, out_side="identity", in_side="identity", inner="in"
            )
        else:
            best = None
            for k_out in range(1, min(d_out, share) + 1):
                k_in = -(-share // k_out)
                if k_in > d_in:
                    continue
                cost = _side_cost(k_out, d_out, share / k_in) + _side_cost(k_in, d_in, share / k_out)
                key = (cost, k_out * k_in, k_out)
                if best is None or key < best[0]:
                    best = (key, k_out, k_in)
            _, k_out, k_in = best
            out_side = "permutation" if k_out == d_out else "rademacher"
            in_side = "permutation" if k_in == d_in else "rademacher"
            # The truncated tail must cut across a +-1 side so that every kept whole-side block stays exact.
            inner = "out" if out_side == "permutation" and in_side != "permutation" else "in"
            row.update(
                mode="projected", k_out=k_out, k_in=k_in, out_side=out_side, in_side=in_side, inner=inner
            )
        rows.append(row)
        offset += share
    return rows


class _Side:
    """One side's projection ``y -> P y`` for P either ±1 [k, d] or a scaled signed permutation [d, d]."""

    def __init__(self, kind: str, k: int, d: int, seed: int) -> None:
        self.kind, self.k, self.d = kind, k, d
        if kind == "rademacher":
            self.matrix = _rademacher(k, d, seed)
        elif kind == "permutation":
            gen = torch.Generator(device="cpu").manual_seed(seed)
            self.perm = torch.randperm(d, generator=gen)
            signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.float32).mul_(2).sub_(1)
            self.signs = signs * math.sqrt(d)
        else:
            raise ValueError(kind)

    def to(self, device: torch.device) -> _Side:
        other = object.__new__(_Side)
        other.__dict__ = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return other

    def apply(self, y: Tensor) -> Tensor:
        """Return ``y @ P^T`` for ``y`` [..., d]."""
        if self.kind == "rademacher":
            return y @ self.matrix.T
        return y[..., self.perm] * self.signs

    def dense(self) -> Tensor:
        """Return ``P`` as a dense [k, d] matrix (for reference computations)."""
        if self.kind == "rademacher":
            return self.matrix.clone()
        out = torch.zeros(self.d, self.d, device=self.signs.device, dtype=torch.float32)
        out[torch.arange(self.d), self.perm] = self.signs
        return out


class KroneckerProjector(Projector):
    """LoGra-style projection: per layer ``vec(P_out G P_in^T)[:share] / sqrt(share)``.

    Every kept entry ``p_out_i^T G p_in_j`` has ``E[p p^T] = I`` on both sides, so its expected
    square is ``||G||_F^2`` and dividing by ``sqrt(share)`` preserves inner products in expectation,
    whichever entries are kept. Because ``G = sum_t go_t x_t^T``, the same numbers come from
    projecting the inputs ``x_t`` and output-gradients ``go_t`` first (see :meth:`project_layer`),
    which never forms ``G``. Shares, factor sizes and side types are given by
    :func:`kronecker_shares`; matrices are seeded by ``derive_seed(seed, "kronecker", layer, side)``.
    """

    kind = "kronecker"
    needs_full_grad = False

    def __init__(self, proj_dim: int, seed: int, layer_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(proj_dim, seed, layer_shapes)
        self.shares = kronecker_shares(self.proj_dim, self.layer_shapes)
        self._sides: dict[int, tuple[_Side, _Side]] = {}
        self._on_device: dict[tuple[int, torch.device], tuple[_Side, _Side]] = {}

    def _layer_sides(self, layer: int, device: torch.device) -> tuple[_Side, _Side]:
        key = (layer, device)
        if key not in self._on_device:
            row = self.shares[layer]
            if layer not in self._sides:
                self._sides[layer] = (
                    _Side(
                        row["out_side"],
                        row["k_out"],
                        row["d_out"],
                        derive_seed(self.seed, self.kind, layer, "out"),
                    ),
                    _Side(
                        row["in_side"],
                        row["k_in"],
                        row["d_in"],
                        derive_seed(self.seed, self.kind, layer, "in"),
                    ),
                )
            # Per-layer factors are small (k x d or d indices), so all of them stay cached.
            self._on_device[key] = tuple(side.to(device) for side in self._sides[layer])
        return self._on_device[key]

    def matrices(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """Return dense ``(P_out, P_in)`` of a projected layer (None for an exact one), for reference use."""
        if self.shares[layer]["mode"] == "exact":
            return None
        p_out, p_in = self._layer_sides(layer, torch.device("cpu"))
        return p_out.dense(), p_in.dense()

    def project_layer(self, out, layer, *, grad=None, inputs=None, grad_outputs=None) -> None:
        """Write layer ``layer``'s share into ``out`` from factors [B, T, d] (preferred) or its gradient."""
        row = self.shares[layer]
        share, start = row["share"], row["offset"]
        factors = inputs is not None and grad_outputs is not None
        if not factors and grad is None:
            raise ValueError("kronecker projector needs either grad or (inputs, grad_outputs)")
        if row["mode"] == "exact":
            if factors:
                grad = torch.bmm(grad_outputs.float().transpose(1, 2), inputs.float())
            flat = grad.reshape(grad.shape[0], -1).float()
            out[:, start : start + flat.shape[1]] += flat
            return
        p_out, p_in = self._layer_sides(layer, out.device)
        if factors:
            a = p_out.apply(grad_outputs.float())  # [B, T, k_out]
            c = p_in.apply(inputs.float())  # [B, T, k_in]
            proj = torch.bmm(a.transpose(1, 2), c)  # [B, k_out, k_in] = P_out G P_in^T
        else:
            proj = p_in.apply(p_out.apply(grad.float().transpose(1, 2)).transpose(1, 2))
        if row["inner"] == "out":
            proj = proj.transpose(1, 2)
        out[:, start : start + share] += proj.reshape(proj.shape[0], -1)[:, :share] / math.sqrt(share)

    def describe(self) -> dict:
        """Return a JSON-able description including every layer's share and factor sizes."""
        return {**super().describe(), "layers": [dict(r) for r in self.shares]}


def build_projector(
    kind: str, proj_dim: int | None, seed: int, layer_shapes: Sequence[Sequence[int]], **options
) -> Projector:
    """Build the projector named ``kind`` (identity | rademacher | kronecker) for ``layer_shapes``."""
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"projector={kind!r} is not one of {', '.join(PROJECTOR_KINDS)}")
    if kind == "identity":
        if proj_dim is not None and (isinstance(proj_dim, bool) or int(proj_dim) <= 0):
            raise ValueError(f"proj_dim must be a positive integer or None, got {proj_dim!r}")
        return IdentityProjector(proj_dim, seed, layer_shapes, **options)
    if proj_dim is None or isinstance(proj_dim, bool) or int(proj_dim) != proj_dim or int(proj_dim) <= 0:
        raise ValueError(f"proj_dim must be a positive integer for projector={kind!r}, got {proj_dim!r}")
    if kind == "rademacher":
        return RademacherProjector(int(proj_dim), seed, layer_shapes, **options)
    return KroneckerProjector(int(proj_dim), seed, layer_shapes, **options)
