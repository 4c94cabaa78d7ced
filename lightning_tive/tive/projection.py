"""Seeded random projections of per-example gradients of linear layers.

Every projector maps the per-example gradients of an ordered list of linear layers (layer ``l`` has a
weight of shape ``(d_out, d_in)``) to one vector of ``proj_dim`` numbers. The reference definition is
:meth:`Projector.project`, which takes the full per-example gradients; the gradient engine uses the
cheaper per-layer entry point :meth:`Projector.project_layer`, which for ``kronecker`` works on the
layer's inputs and output-gradients directly.

Random matrices never touch the global RNG, so every process, rank and device sees the same
projection. ``rademacher`` computes its ±1 entries on the gradient's device from a counter-based
integer hash of ``(seed, layer, coordinate, output dim)``; ``kronecker``'s small per-layer factors
are drawn once on the CPU from ``torch.Generator`` objects seeded with :func:`derive_seed` and
cached on the device. :func:`estimate_projection_cost` times a representative piece of any
projector and extrapolates, so a caller can refuse a projection that would be too slow
(:func:`check_projection_cost`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "MAX_COST_SETTING",
    "PROJECTOR_KINDS",
    "IdentityProjector",
    "KroneckerProjector",
    "ProjectionTooSlow",
    "Projector",
    "RademacherProjector",
    "build_projector",
    "check_projection_cost",
    "derive_seed",
    "estimate_projection_cost",
    "format_projection_cost",
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


#: Name and version of the counter-based ±1 generator of :class:`RademacherProjector` (in ``describe()``).
RADEMACHER_GENERATOR = "ctr32-lowbias32"
RADEMACHER_GENERATOR_VERSION = 1
#: Default size of one drawn float32 block of ``R`` (block_size = this / (4 * proj_dim rounded up to 32)).
DEFAULT_BLOCK_BYTES = 256 * 2**20
_MASK32 = 0xFFFFFFFF
_MIX_MUL1 = 0x7FEB352D
_MIX_MUL2 = 0x846CA68B
# Signs generated per row chunk of a block: bounds the integer temporaries (~2.5 bytes a sign) while
# keeping each kernel large (a default block at proj_dim 8192 is one chunk).
_CHUNK_ENTRIES = 2**26


def _padded_width(proj_dim: int) -> int:
    return 32 * -(-proj_dim // 32)


def _layer_keys(seed: int, layer: int) -> tuple[int, int]:
    """Return the two 32-bit keys of ``layer``'s ±1 matrix: the low and high halves of a derived seed."""
    key = derive_seed(seed, "rademacher", RADEMACHER_GENERATOR, RADEMACHER_GENERATOR_VERSION, layer)
    return key & _MASK32, (key >> 32) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """Return the lowbias32 finaliser of int64 ``x`` in [0, 2**32) (a bijection of 32-bit integers)."""
    # Values stay in [0, 2**32), so >> is a logical shift. A product x * m with m < 2**31 stays below 2**63,
    # so no backend ever sees a signed overflow; the multiplier 0x846ca68b >= 2**31 is applied as
    # x * (m - 2**31) + ((x & 1) << 31), which is the same modulo 2**32.
    x = x ^ (x >> 16)
    x.mul_(_MIX_MUL1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    low = (x & 1).bitwise_left_shift_(31)
    x.mul_(_MIX_MUL2 - 2**31).add_(low).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _rademacher_words(
    keys: tuple[int, int], start: int, stop: int, words: int, device: torch.device
) -> Tensor:
    """Return the int64 [stop-start, words] hash words ``h(c, w)`` of coordinates ``start:stop``."""
    k1, k2 = keys
    a = _mix32(torch.arange(start, stop, device=device, dtype=torch.int64) ^ k1)[:, None]
    b = _mix32(torch.arange(words, device=device, dtype=torch.int64) ^ k2)[None, :]
    # A second round keyed by a_c breaks the pairing a lone mix(a ^ b) has (a ^ a' = b ^ b' makes two rows
    # share two words); a single mix((a ^ b) + a) is not enough (a' = a ^ 2**31 gives identical rows).
    return _mix32(_mix32(a ^ b).add_(a).bitwise_and_(_MASK32))


def _sign_table(device: torch.device) -> Tensor:
    """Return the float32 [256, 8] table whose row v holds +1 where bit i of v is set, else -1."""
    v = torch.arange(256, device=device, dtype=torch.int64)[:, None]
    bits = (v >> torch.arange(8, device=device, dtype=torch.int64)) & 1
    return bits.to(torch.float32).mul_(2).sub_(1)


def _rademacher_block(
    keys: tuple[int, int], start: int, stop: int, proj_dim: int, device: torch.device
) -> Tensor:
    """Return rows ``start:stop`` of one layer's ``R`` as float32 ±1 [stop-start, proj_dim], built on ``device``."""
    width = _padded_width(proj_dim)
    words = width // 32
    rows = stop - start
    buf = torch.empty(rows, width, dtype=torch.float32, device=device)
    table = _sign_table(device)
    shifts = torch.arange(0, 32, 8, device=device, dtype=torch.int64)
    step = max(1, _CHUNK_ENTRIES // width)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        h = _rademacher_words(keys, start + r0, start + r1, words, device)
        # Byte k of word w holds output dims 32w + 8k .. 32w + 8k + 7 (bit i -> dim 32w + 8k + i); a lookup
        # writes 8 signs per index, far cheaper than one elementwise op per sign.
        index = ((h[:, :, None] >> shifts) & 255).view(-1)
        torch.index_select(table, 0, index, out=buf[r0:r1].view(-1, 8))
    return buf[:, :proj_dim]


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

    ``R`` has one row per gradient coordinate and one column per output dim. Every entry is a pure
    function of ``(seed, layer, coordinate c, output dim j)``, computed with exact integer arithmetic
    on the device of the gradient, so ``R`` is the same on every device, in every process and for
    every block size and thread count::

        K = derive_seed(seed, "rademacher", "ctr32-lowbias32", 1, layer); k1 = K mod 2**32; k2 = K >> 32
        mix(x): x ^= x >> 16; x = x * 0x7feb352d mod 2**32;
                x ^= x >> 15; x = x * 0x846ca68b mod 2**32; x ^= x >> 16
        a = mix(c ^ k1); b = mix((j // 32) ^ k2); h = mix((mix(a ^ b) + a) mod 2**32)
        R[c, j] = +1 if bit (j % 32) of h is set, else -1

    ``c`` is the coordinate's row-major index in the layer's weight (``weight.flatten()``), ``c < 2**32``.
    One 32-bit hash gives 32 output dims, which is what makes drawing ``R`` cheap.

    A batch is projected block by block: ``block_size`` consecutive coordinates of one layer are
    drawn once per :meth:`project_layer` call and used for the whole batch in one matmul (default:
    as many coordinates as make a 256 MiB float32 block, 8192 at ``proj_dim`` 8192). ``R`` is kept
    in memory only when all of it fits in ``cache_bytes`` (small adapters); otherwise every block is
    redrawn on every call.
    """

    kind = "rademacher"

    def __init__(
        self,
        proj_dim: int,
        seed: int,
        layer_shapes: Sequence[Sequence[int]],
        block_size: int | None = None,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        super().__init__(proj_dim, seed, layer_shapes)
        width = _padded_width(self.proj_dim)
        if block_size is None:
            block_size = max(1, DEFAULT_BLOCK_BYTES // (4 * width))
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        for layer, (d_out, d_in) in enumerate(self.layer_shapes):
            if d_out * d_in > 2**32:
                raise ValueError(
                    f"layer {layer} has {d_out * d_in} coordinates; the rademacher generator indexes "
                    "at most 2**32"
                )
        self.block_size = int(block_size)
        self.cache_bytes = int(cache_bytes)
        # All or nothing: a partial cache would hold memory for a negligible share of a large R.
        self.caches_all = self.full_dim * width * 4 <= self.cache_bytes
        self._cache: dict[tuple[int, int, int, torch.device], Tensor] = {}
        self._keys = [_layer_keys(self.seed, layer) for layer in range(len(self.layer_shapes))]

    def block(self, layer: int, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
        """Return rows ``start:stop`` of layer ``layer``'s ``R`` as a float32 ±1 [stop-start, proj_dim] matrix."""
        n = self.layer_shapes[layer][0] * self.layer_shapes[layer][1]
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows {start}:{stop} are outside layer {layer}'s {n} coordinates")
        device = torch.device(device)
        key = (layer, start, stop, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        mat = _rademacher_block(self._keys[layer], start, stop, self.proj_dim, device)
        # Only the projector's own partition is cached, so other requested ranges cannot grow the cache.
        if self.caches_all and start % self.block_size == 0 and stop == min(start + self.block_size, n):
            self._cache[key] = mat
        return mat

    def project_layer(self, out, layer, *, grad=None, inputs=None, grad_outputs=None) -> None:
        """Add ``R_l g_l / sqrt(proj_dim)`` for layer ``layer`` to ``out``, one drawn block at a time."""
        if grad is None:
            raise ValueError("rademacher projector needs the full per-example gradient")
        flat = grad.reshape(grad.shape[0], -1).float()
        scale = 1.0 / math.sqrt(self.proj_dim)
        for start in range(0, flat.shape[1], self.block_size):
            stop = min(start + self.block_size, flat.shape[1])
            out.add_(flat[:, start:stop] @ self.block(layer, start, stop, flat.device), alpha=scale)

    def describe(self) -> dict:
        """Return a JSON-able description with the generator's name and version (the block size changes no entry)."""
        return {
            **super().describe(),
            "generator": RADEMACHER_GENERATOR,
            "generator_version": RADEMACHER_GENERATOR_VERSION,
        }


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


#: The callback setting that bounds :func:`estimate_projection_cost`'s seconds per example.
MAX_COST_SETTING = "tive.max_projection_s_per_example"


class ProjectionTooSlow(ValueError):
    """The estimated projection time per example exceeds the configured limit."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Return the fastest of ``repeats`` timed calls of ``fn`` (after its caller's warm-up)."""
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _estimate_rademacher(proj: RademacherProjector, device: torch.device, batch: int, repeats: int) -> dict:
    rows = min(proj.block_size, max(o * i for o, i in proj.layer_shapes))
    keys = proj._keys[0]
    scale = 1.0 / math.sqrt(proj.proj_dim)
    # Warm-up on a tiny block: kernel loading and allocator start-up are not part of the steady state.
    _rademacher_block(keys, 0, min(rows, 32), proj.proj_dim, device)
    # float32 whatever the default dtype (a bf16-true run sets bf16): the engine projects in float32.
    grads = torch.full((batch, rows), 0.01, device=device, dtype=torch.float32)
    out = torch.zeros(batch, proj.proj_dim, device=device, dtype=torch.float32)
    held: list[Tensor] = []

    def draw() -> None:
        held.clear()  # free the previous block first: two would double the peak memory
        held.append(_rademacher_block(keys, 0, rows, proj.proj_dim, device))

    draw_s = _best_time(draw, device, repeats)
    matmul_s = _best_time(lambda: out.add_(grads @ held[0], alpha=scale), device, repeats)
    factor = proj.full_dim / rows
    entries = proj.full_dim * proj.proj_dim
    draw_batch = 0.0 if proj.caches_all else draw_s * factor
    return {
        "seconds_per_batch": draw_batch + matmul_s * factor,
        "draw_s_per_batch": draw_batch,
        "matmul_s_per_batch": matmul_s * factor,
        "first_batch_s": (draw_s + matmul_s) * factor,
        "random_entries": entries,
        "random_entries_per_batch": 0 if proj.caches_all else entries,
        "block_size": proj.block_size,
        "cached": proj.caches_all,
        "scale": factor,
        "timed": (
            f"one block of {rows} coordinates x {proj.proj_dim} dims "
            f"(draw {draw_s:.3g} s, matmul {matmul_s:.3g} s)"
        ),
    }


def _estimate_by_layer(proj: Projector, device: torch.device, batch: int, tokens: int, repeats: int) -> dict:
    """Time one ``project_layer`` call per distinct layer shape and multiply by how many layers share it."""
    groups: dict[LayerShape, list[int]] = {}
    for layer, shape in enumerate(proj.layer_shapes):
        groups.setdefault(shape, []).append(layer)
    total, parts = 0.0, []
    for (d_out, d_in), layers in groups.items():
        layer = layers[0]
        if isinstance(proj, IdentityProjector):
            # A one-layer identity of this shape: the full [B, full_dim] output would not fit at 7B.
            target, layer = IdentityProjector(None, proj.seed, [(d_out, d_in)]), 0
        else:
            target = proj
        f32 = {"device": device, "dtype": torch.float32}
        out = torch.zeros(batch, target.proj_dim, **f32)
        if target.needs_full_grad:
            kwargs = {"grad": torch.full((batch, d_out, d_in), 0.01, **f32)}
        else:
            kwargs = {
                "inputs": torch.full((batch, tokens, d_in), 0.01, **f32),
                "grad_outputs": torch.full((batch, tokens, d_out), 0.01, **f32),
            }
        target.project_layer(out, layer, **kwargs)  # warm-up: draws and caches kronecker factors
        seconds = _best_time(functools.partial(target.project_layer, out, layer, **kwargs), device, repeats)
        total += seconds * len(layers)
        parts.append(f"{(d_out, d_in)} x{len(layers)}: {seconds:.3g} s")
    entries = 0
    if isinstance(proj, KroneckerProjector):
        for row in proj.shares:
            if row["mode"] == "projected":
                for k, d, side in (
                    (row["k_out"], row["d_out"], row["out_side"]),
                    (row["k_in"], row["d_in"], row["in_side"]),
                ):
                    entries += k * d if side == "rademacher" else 2 * d
    return {
        "seconds_per_batch": total,
        "random_entries": entries,
        # Kronecker's factors are drawn once and cached; identity draws nothing.
        "random_entries_per_batch": 0,
        "scale": len(proj.layer_shapes) / len(groups),
        "timed": "one project_layer call per layer shape (" + "; ".join(parts) + ")",
    }


def estimate_projection_cost(
    projector: Projector,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    tokens: int = 1024,
    repeats: int = 1,
) -> dict:
    """Time a representative piece of ``projector`` on ``device`` and extrapolate to one batch of the adapter.

    ``rademacher`` times one block (draw + matmul) and scales by ``full_dim / block rows``;
    ``kronecker`` times one call per distinct layer shape on ``tokens``-token factors (``tokens`` is
    used by kronecker only); ``identity`` one copy per shape. Covers the projection only
    (``project_layer``), not the forward/backward or materialising per-example gradients.
    Returns ``seconds_per_batch``, ``seconds_per_example``, ``random_entries_per_batch`` (±1 entries
    generated per batch in steady state), ``random_entries`` (all entries defining the projection),
    ``timed`` (what was measured), ``scale`` and ``estimate_wall_s``, plus the settings.
    """
    device = torch.device(device)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(tokens, bool) or int(tokens) != tokens or tokens <= 0:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    clock = time.perf_counter()
    with torch.no_grad():
        if isinstance(projector, RademacherProjector):
            est = _estimate_rademacher(projector, device, int(batch_size), max(1, repeats))
        else:
            est = _estimate_by_layer(projector, device, int(batch_size), int(tokens), max(1, repeats))
    return {
        "kind": projector.kind,
        "device": str(device),
        "batch_size": int(batch_size),
        "tokens": int(tokens),
        "proj_dim": projector.proj_dim,
        "full_dim": projector.full_dim,
        **est,
        "seconds_per_example": est["seconds_per_batch"] / batch_size,
        "estimate_wall_s": time.perf_counter() - clock,
    }


def format_projection_cost(estimate: dict) -> str:
    """Return a one-line, human-readable summary of an :func:`estimate_projection_cost` result."""
    return (
        f"projector={estimate['kind']} on {estimate['device']}: "
        f"~{estimate['seconds_per_example']:.3g} s per example "
        f"({estimate['seconds_per_batch']:.3g} s per batch of {estimate['batch_size']}, "
        f"{estimate['random_entries_per_batch']:.3g} random entries per batch; "
        f"estimated from {estimate['timed']})"
    )


def check_projection_cost(estimate: dict, limit_s_per_example: float | None) -> None:
    """Raise :class:`ProjectionTooSlow` when ``estimate`` exceeds ``limit_s_per_example`` (None: no limit)."""
    if limit_s_per_example is None:
        return
    seconds = estimate["seconds_per_example"]
    if not seconds <= limit_s_per_example:
        hint = (
            "use `projector: kronecker` (structured, never forms the full gradient)"
            if estimate["kind"] != "kronecker"
            else "lower proj_dim"
        )
        raise ProjectionTooSlow(
            f"the projection is estimated at {seconds:.3g} s per example, above the limit "
            f"{MAX_COST_SETTING}={limit_s_per_example:g} ({format_projection_cost(estimate)}); "
            f"{hint}, or raise {MAX_COST_SETTING}"
        )


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
