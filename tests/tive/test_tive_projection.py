"""Projectors: settings validation, seeding, exact identities, and JL accuracy."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lightning_tive.tive.projection import (
    KroneckerProjector,
    ProjectionTooSlow,
    RademacherProjector,
    build_projector,
    check_projection_cost,
    estimate_projection_cost,
    kronecker_shares,
)

# LoRA-like shapes: A is (r, d), B is (d, r).
LORA_SHAPES = [(8, 96), (96, 8), (8, 96), (96, 8)]


def gradient_like(shapes, n: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Per-example gradients sum_t go_t x_t^T that share a component, so their cosines spread out."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.linspace(-1.5, 1.5, n)
    grads = []
    for d_out, d_in in shapes:
        common_g = torch.randn(tokens, d_out, generator=gen)
        common_x = torch.randn(tokens, d_in, generator=gen)
        per = []
        for s in range(n):
            go = weights[s] * common_g + torch.randn(tokens, d_out, generator=gen)
            x = common_x + 0.5 * torch.randn(tokens, d_in, generator=gen)
            per.append(go.T @ x)
        grads.append(torch.stack(per))
    return grads


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def cosines(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=1)
    return x @ x.T


@pytest.mark.parametrize(
    "kind, dim, match",
    [
        ("gaussian", 64, "projector='gaussian'"),
        ("rademacher", 0, "proj_dim"),
        ("kronecker", -3, "proj_dim"),
        ("rademacher", None, "proj_dim"),
        ("kronecker", 3, "proj_dim=3 is too small"),
        ("identity", 17, "identity"),
    ],
)
def test_build_projector_rejects_bad_settings(kind, dim, match):
    with pytest.raises(ValueError, match=match):
        build_projector(kind, dim, 0, LORA_SHAPES)


def test_identity_is_the_flattened_gradient():
    grads = gradient_like(LORA_SHAPES, 3, 2)
    proj = build_projector("identity", None, 0, LORA_SHAPES)
    assert proj.proj_dim == sum(o * i for o, i in LORA_SHAPES)
    torch.testing.assert_close(proj.project(grads), flat(grads), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["rademacher", "kronecker"])
def test_projection_is_seeded_and_ignores_global_rng(kind):
    grads = gradient_like(LORA_SHAPES, 3, 4)
    torch.manual_seed(1)
    a = build_projector(kind, 64, 7, LORA_SHAPES).project(grads)
    torch.manual_seed(2)
    b = build_projector(kind, 64, 7, LORA_SHAPES).project(grads)
    c = build_projector(kind, 64, 8, LORA_SHAPES).project(grads)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def reference_rademacher(seed: int, layer: int, coords: range, proj_dim: int) -> torch.Tensor:
    """R[c, j] entry by entry in plain Python, from the hash documented in RademacherProjector."""
    text = f"{seed}:rademacher:ctr32-lowbias32:1:{layer}"
    key = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
    k1, k2 = key % 2**32, key >> 32

    def mix(x: int) -> int:
        x ^= x >> 16
        x = x * 0x7FEB352D % 2**32
        x ^= x >> 15
        x = x * 0x846CA68B % 2**32
        return x ^ (x >> 16)

    rows = []
    for c in coords:
        a = mix(c ^ k1)
        row = []
        for j in range(proj_dim):
            h = mix((mix(a ^ mix((j // 32) ^ k2)) + a) % 2**32)
            row.append(1.0 if (h >> (j % 32)) & 1 else -1.0)
        rows.append(row)
    return torch.tensor(rows)


def dense_rademacher(proj: RademacherProjector, device: str = "cpu") -> torch.Tensor:
    """The projector's whole R [full_dim, proj_dim], layers stacked, assembled from its own blocks."""
    parts = []
    for layer, (o, i) in enumerate(proj.layer_shapes):
        n = o * i
        parts += [
            proj.block(layer, s, min(s + proj.block_size, n), device) for s in range(0, n, proj.block_size)
        ]
    return torch.cat(parts)


def test_rademacher_equals_an_independent_reference_of_its_hash():
    shapes = [(3, 5), (4, 6)]  # proj_dim 40 is not a multiple of 32: the second word is cut
    proj = RademacherProjector(40, 5, shapes, block_size=7, cache_bytes=0)
    explicit = torch.cat(
        [reference_rademacher(5, layer, range(o * i), 40) for layer, (o, i) in enumerate(shapes)]
    )
    assert torch.equal(dense_rademacher(proj), explicit)
    grads = gradient_like(shapes, 4, 3)
    torch.testing.assert_close(proj.project(grads), flat(grads) @ explicit / math.sqrt(40))
    # Coordinates far into a large layer follow the same definition (c is the row-major weight index).
    big = RademacherProjector(64, 5, [(8, 9), (4096, 300)], cache_bytes=0)
    torch.testing.assert_close(
        big.block(1, 1_000_000, 1_000_003),
        reference_rademacher(5, 1, range(1_000_000, 1_000_003), 64),
        rtol=0,
        atol=0,
    )


def test_rademacher_entries_are_balanced_and_uncorrelated():
    proj = RademacherProjector(1024, 0, [(64, 64), (64, 64)], cache_bytes=0)
    a = proj.block(0, 0, 4096)
    assert a.shape == (4096, 1024) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 5 / math.sqrt(a.numel())
    # Independent signs: over n entries a correlation has std 1/sqrt(n), and the largest of ~500K
    # (columns) or ~8M (rows) such pairs stays near 5.2 and 5.7 stds. A structured hash (e.g. rows
    # that repeat) gives far more.
    cols = (a.T.double() @ a.double()) / a.shape[0]
    rows = (a.double() @ a.T.double()) / a.shape[1]
    assert (cols - torch.eye(1024, dtype=cols.dtype)).abs().max() < 6.5 / math.sqrt(a.shape[0])
    assert (rows - torch.eye(4096, dtype=rows.dtype)).abs().max() < 6.5 / math.sqrt(a.shape[1])
    # Layers, blocks and seeds give different matrices (about half the signs agree).
    other_layer = proj.block(1, 0, 4096)
    other_rows = proj.block(0, 0, 4096 - 7)
    other_seed = RademacherProjector(1024, 1, [(64, 64), (64, 64)], cache_bytes=0).block(0, 0, 4096)
    for other in (other_layer, other_seed):
        assert abs((other == a).double().mean().item() - 0.5) < 0.01
    assert torch.equal(other_rows, a[: 4096 - 7])  # a shorter block is a prefix, not a new draw


def test_block_size_and_cache_do_not_change_r():
    shapes = [(5, 40), (40, 5), (3, 7)]
    grads = gradient_like(shapes, 3, 2)
    reference = RademacherProjector(96, 2, shapes, block_size=1, cache_bytes=0)
    dense = dense_rademacher(reference)
    for block_size in (3, 64, 200, None):
        for cache in (0, 2**30):
            proj = RademacherProjector(96, 2, shapes, block_size=block_size, cache_bytes=cache)
            assert proj.caches_all == bool(cache)
            assert torch.equal(dense_rademacher(proj), dense)
            torch.testing.assert_close(proj.project(grads), flat(grads) @ dense / math.sqrt(96))
    cached, uncached = (RademacherProjector(96, 2, shapes, block_size=64, cache_bytes=c) for c in (2**30, 0))
    first = cached.project(grads)
    assert torch.equal(cached.project(grads), first) and torch.equal(uncached.project(grads), first)


def test_default_block_is_bounded_and_describe_names_the_generator():
    proj = RademacherProjector(8192, 0, [(128, 4096), (4096, 128)] * 128)  # LLaVA-7B attention LoRA r=128
    assert proj.full_dim == 134_217_728
    assert proj.block_size * 8192 * 4 <= 256 * 2**20
    assert not proj.caches_all  # 4 TiB of R is never cached
    desc = proj.describe()
    # the block size changes no entry of R, so it is not part of the description (the store's fingerprint)
    assert desc["kind"] == "rademacher" and "block_size" not in desc
    assert RademacherProjector(8192, 0, [(128, 4096)], block_size=64).describe() == RademacherProjector(
        8192, 0, [(128, 4096)]).describe()
    assert (desc["generator"], desc["generator_version"]) == ("ctr32-lowbias32", 1)
    with pytest.raises(ValueError, match="block_size"):
        RademacherProjector(64, 0, LORA_SHAPES, block_size=0)


class TensorDevices(TorchFunctionMode):
    """Records the device type of every tensor that goes into or comes out of a torch call."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[str] = set()
        self.calls: list[str] = []

    def _note(self, value) -> None:
        if isinstance(value, torch.Tensor):
            self.devices.add(value.device.type)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._note(item)
        elif isinstance(value, dict):
            for item in value.values():
                self._note(item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append(getattr(func, "__name__", str(func)))
        self._note(args)
        self._note(kwargs)
        out = func(*args, **kwargs)
        self._note(out)
        return out


@pytest.mark.parametrize("cache_bytes", [0, 2**30])
def test_rademacher_blocks_are_built_on_the_gradient_device(cache_bytes):
    # On the meta device nothing can be computed on the host and copied over: any CPU tensor (a CPU
    # generator's draw, a host-side block moved with .to) shows up in the log as an input or output.
    shapes = [(64, 512), (512, 64)]
    proj = RademacherProjector(256, 0, shapes, block_size=1000, cache_bytes=cache_bytes)
    out = torch.zeros(4, 256, device="meta")
    with TensorDevices() as log:
        for layer, (o, i) in enumerate(shapes):
            proj.project_layer(out, layer, grad=torch.empty(4, o, i, device="meta"))
    assert log.devices == {"meta"}
    assert not {"randint", "rand", "randn", "randperm", "bernoulli"} & set(log.calls)
    assert proj.block(0, 0, 10, "meta").device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rademacher_is_bit_identical_on_cuda():
    shapes = [(16, 300), (300, 16)]
    proj = RademacherProjector(8192, 3, shapes, block_size=1000, cache_bytes=0)
    assert torch.equal(dense_rademacher(proj, "cuda").cpu(), dense_rademacher(proj))
    grads = gradient_like(shapes, 4, 3)
    on_gpu = proj.project([g.cuda() for g in grads])
    torch.testing.assert_close(on_gpu.cpu(), proj.project(grads), rtol=1e-4, atol=1e-4)


def _matrices_and_features(threads: int) -> dict:
    """Hashes of every random matrix, and the projections, of both projectors on a fixed input."""
    torch.set_num_threads(threads)
    shapes = [(8, 96), (96, 8)]
    grads = [torch.arange(o * i, dtype=torch.float32).reshape(1, o, i).sin() for o, i in shapes]
    result = {}
    for kind in ("rademacher", "kronecker"):
        proj = build_projector(kind, 40, 3, shapes)
        if kind == "rademacher":
            mats = [dense_rademacher(proj)]
        else:
            mats = [m for layer in range(len(shapes)) for m in (proj.matrices(layer) or ())]
        digest = hashlib.sha256(b"".join(m.contiguous().numpy().tobytes() for m in mats))
        result[kind] = {"sha256": digest.hexdigest(), "features": proj.project(grads)[0].tolist()}
    return result


def test_projection_is_identical_in_another_process():
    # The random matrices must match bit for bit; the float sums of the matmul may round differently with
    # another thread count, so the features are compared to a tight tolerance instead.
    code = (
        "import json, sys; sys.path.insert(0, 'tests/tive'); import test_tive_projection as t;"
        "print(json.dumps(t._matrices_and_features(threads=2)))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    there = json.loads(out.strip().splitlines()[-1])
    here = _matrices_and_features(threads=1)
    for kind in ("rademacher", "kronecker"):
        assert there[kind]["sha256"] == here[kind]["sha256"]
        a, b = torch.tensor(there[kind]["features"]), torch.tensor(here[kind]["features"])
        # float32 sums of 768 terms in another order: ~1e-6 of the largest feature apart, not more.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("proj_dim", [4, 37, 100, 1000, 5000])
def test_kronecker_shares_add_up_and_are_explicit(proj_dim):
    shapes = [(8, 96), (96, 8), (8, 96), (96, 8)]
    rows = kronecker_shares(proj_dim, shapes)
    assert sum(r["share"] for r in rows) == proj_dim
    base, extra = divmod(proj_dim, len(shapes))
    assert [r["share"] for r in rows] == [base + (i < extra) for i in range(len(shapes))]
    assert [r["offset"] for r in rows] == [sum(r["share"] for r in rows[:i]) for i in range(len(rows))]
    for r in rows:
        if r["mode"] == "exact":
            assert r["share"] >= r["d_out"] * r["d_in"]
        else:
            assert r["k_out"] <= r["d_out"] and r["k_in"] <= r["d_in"]
            assert r["share"] <= r["k_out"] * r["k_in"] < r["share"] + r["k_out"]


def test_kronecker_shares_prefer_square_unless_a_side_fits_whole():
    (row,) = kronecker_shares(36, [(4096, 4096)])
    assert (row["k_out"], row["k_in"]) == (6, 6)
    (row,) = kronecker_shares(64, [(8, 4096)])  # LoRA A with r=8: keep the r side whole
    assert (row["k_out"], row["k_in"], row["out_side"]) == (8, 8, "permutation")


@pytest.mark.parametrize("proj_dim", [13, 200, 3000])
def test_kronecker_factored_path_equals_explicit_kronecker_matrix(proj_dim):
    shapes = [(5, 12), (12, 5), (3, 4)]
    proj = KroneckerProjector(proj_dim, 11, shapes)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, i, generator=gen) for _, i in shapes]
    gos = [torch.randn(2, 7, o, generator=gen) for o, _ in shapes]
    grads = [torch.einsum("bto,bti->boi", go, x) for go, x in zip(gos, xs, strict=True)]
    factored = torch.zeros(2, proj_dim)
    for layer in range(len(shapes)):
        proj.project_layer(factored, layer, inputs=xs[layer], grad_outputs=gos[layer])
    torch.testing.assert_close(factored, proj.project(grads), rtol=1e-5, atol=1e-5)
    # Brute force: rows of kron(P_out, P_in) applied to vec(G), in the documented order.
    brute = torch.zeros(2, proj_dim)
    for layer, row in enumerate(proj.shares):
        share, start = row["share"], row["offset"]
        g = grads[layer].reshape(2, -1)
        if row["mode"] == "exact":
            brute[:, start : start + g.shape[1]] = g
            continue
        p_out, p_in = proj.matrices(layer)
        if row["inner"] == "out":
            big = torch.kron(p_in, p_out)  # index (j, i) with i innermost
            g = grads[layer].transpose(1, 2).reshape(2, -1)
        else:
            big = torch.kron(p_out, p_in)
        brute[:, start : start + share] = (g @ big.T)[:, :share] / math.sqrt(share)
    torch.testing.assert_close(factored, brute, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["rademacher", "kronecker"])
def test_projection_preserves_inner_products_in_expectation(kind):
    # The mean over S independent seeds of <Pg,Ph> has std <= sqrt(2/(k*S))*|g||h| (k = effective rows,
    # see effective_rows); a wrong scale or a biased truncation shifts it by far more than 5 such stds.
    shapes = [(8, 40), (40, 8), (6, 5)]
    grads = gradient_like(shapes, 3, 2, seed=3)
    g = flat(grads).double()
    seeds, k = 200, 30
    est = torch.zeros(3, 3, dtype=torch.float64)
    for seed in range(seeds):
        f = build_projector(kind, k, seed, shapes).project(grads).double()
        est += f @ f.T / seeds
    exact = g @ g.T
    scale = torch.outer(g.norm(dim=1), g.norm(dim=1))
    rows = effective_rows(build_projector(kind, k, 0, shapes), tokens=2)
    assert ((est - exact).abs() / scale).max() < 5 * math.sqrt(2 / (rows * seeds))


def effective_rows(proj, tokens: int) -> int:
    """Independent random rows behind the projection of a rank-``tokens`` layer gradient.

    A dense JL has ``proj_dim``. A kronecker layer with a whole (exact) side and a +-1 side of ``k`` rows
    acts on a rank-1 gradient ``a b^T`` through ``||P b||^2 / k`` only: ``k`` rows (two +-1 sides: the
    smaller); a rank-R gradient averages R such directions, up to the layer's share. Layers add up.
    """
    if proj.kind != "kronecker":
        return proj.proj_dim
    total = 0
    for row in proj.shares:
        if row["mode"] == "exact":
            total += row["share"]
            continue
        sides = [
            k
            for k, kind in ((row["k_out"], row["out_side"]), (row["k_in"], row["in_side"]))
            if kind == "rademacher"
        ]
        total += min(row["share"], min(sides) * tokens)
    return total


@pytest.mark.parametrize("kind", ["rademacher", "kronecker"])
@pytest.mark.parametrize("tokens", [1, 32])
def test_jl_cosines_are_preserved(kind, tokens):
    # For unit u, v a JL estimate of u.v from k independent rows has std <= sqrt(2/k); over the 66 pairs
    # below the largest deviation of a Gaussian is ~2.9 std (~4.1/sqrt(k)), and normalising both vectors
    # adds a little, hence 5/sqrt(k) with k the projector's effective rows (proj_dim for rademacher; see
    # effective_rows for kronecker, whose rows share factors). Same bound, 5*sqrt(2/k), for norms.
    grads = gradient_like(LORA_SHAPES, 12, tokens, seed=1)
    exact = cosines(flat(grads))
    assert exact.min() < -0.3 and (exact - torch.eye(12, dtype=exact.dtype)).max() > 0.3
    proj = build_projector(kind, 2048, 0, LORA_SHAPES)
    k = effective_rows(proj, tokens)
    assert k >= 256
    f = proj.project(grads)
    assert f.shape == (12, 2048)
    assert (cosines(f) - exact).abs().max() < 5 / math.sqrt(k)
    ratio = f.double().norm(dim=1) ** 2 / flat(grads).double().norm(dim=1) ** 2
    assert (ratio - 1).abs().max() < 5 * math.sqrt(2 / k)


def test_describe_lists_kronecker_shares():
    proj = build_projector("kronecker", 100, 0, LORA_SHAPES)
    desc = proj.describe()
    assert desc["kind"] == "kronecker" and desc["proj_dim"] == 100
    assert [r["share"] for r in desc["layers"]] == [25, 25, 25, 25]


@pytest.mark.parametrize("kind", ["identity", "rademacher", "kronecker"])
def test_cost_estimate_is_positive_and_random_entries_scale_with_the_adapter(kind):
    dim = None if kind == "identity" else 256
    options = {"cache_bytes": 0} if kind == "rademacher" else {}
    small = build_projector(kind, dim, 0, LORA_SHAPES, **options)
    big = build_projector(kind, dim, 0, LORA_SHAPES * 4, **options)
    est = estimate_projection_cost(small, "cpu", batch_size=4, tokens=16)
    est_big = estimate_projection_cost(big, "cpu", batch_size=4, tokens=16)
    for e in (est, est_big):
        assert e["kind"] == kind and e["batch_size"] == 4
        assert 0 < e["seconds_per_batch"] < math.inf
        assert e["seconds_per_example"] == pytest.approx(e["seconds_per_batch"] / 4)
        assert e["estimate_wall_s"] < 5  # small adapters: a handful of tiny timed calls
        json.dumps(e)  # printable and storable as is
    if kind == "rademacher":
        assert est["random_entries_per_batch"] == est["random_entries"] == small.full_dim * 256
        assert est_big["random_entries_per_batch"] == 4 * est["random_entries_per_batch"]
    elif kind == "kronecker":
        # Small factors, drawn once and cached: nothing is drawn per batch; the count is the factors' size
        # (k x d for a +-1 side, d indices and d signs for a permutation).
        assert est["random_entries_per_batch"] == est_big["random_entries_per_batch"] == 0
        for proj, e in ((small, est), (big, est_big)):
            expected = sum(
                k * d if side == "rademacher" else 2 * d
                for r in proj.shares
                if r["mode"] == "projected"
                for k, d, side in (
                    (r["k_out"], r["d_out"], r["out_side"]),
                    (r["k_in"], r["d_in"], r["in_side"]),
                )
            )
            assert e["random_entries"] == expected > 0
    else:
        assert est["random_entries"] == est["random_entries_per_batch"] == 0


def test_rademacher_cost_estimate_counts_a_cached_r_once():
    proj = RademacherProjector(256, 0, LORA_SHAPES)  # R is 3 MiB: cached
    est = estimate_projection_cost(proj, "cpu", batch_size=2)
    assert est["cached"] and est["random_entries_per_batch"] == 0 and est["draw_s_per_batch"] == 0
    assert est["random_entries"] == proj.full_dim * 256
    assert est["first_batch_s"] >= est["seconds_per_batch"] > 0


def test_rademacher_cost_estimate_times_one_block_of_a_7b_adapter():
    # The whole R of LLaVA-7B's attention LoRA (r=128) has 1.1e12 entries per batch; the estimate must time
    # one block and extrapolate, so it takes about as long as one block.
    proj = RademacherProjector(8192, 0, [(128, 4096), (4096, 128)] * 128, block_size=512)
    est = estimate_projection_cost(proj, "cpu", batch_size=8)
    assert est["random_entries_per_batch"] == 134_217_728 * 8192
    assert est["scale"] == 134_217_728 / 512
    assert est["timed"].startswith("one block of 512 coordinates")
    assert est["seconds_per_batch"] == pytest.approx(est["draw_s_per_batch"] + est["matmul_s_per_batch"])
    assert est["estimate_wall_s"] < 10


def test_check_projection_cost_refuses_above_the_limit_and_names_the_setting():
    est = {
        "kind": "rademacher",
        "device": "cpu",
        "batch_size": 8,
        "seconds_per_batch": 9.6,
        "seconds_per_example": 1.2,
        "random_entries_per_batch": 1.1e12,
        "timed": "one block",
    }
    check_projection_cost(est, None)
    check_projection_cost(est, 1.5)
    with pytest.raises(ProjectionTooSlow) as info:
        check_projection_cost(est, 0.5)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for part in (
        "1.2 s per example",
        "tive.max_projection_s_per_example=0.5",
        "projector: kronecker",
        "1.1e+12",
    ):
        assert part in message
    with pytest.raises(ProjectionTooSlow, match="lower proj_dim"):
        check_projection_cost({**est, "kind": "kronecker"}, 0.5)
    with pytest.raises(ProjectionTooSlow):  # a NaN estimate is never taken as fast enough
        check_projection_cost({**est, "seconds_per_example": math.nan}, 0.5)


@pytest.mark.parametrize("kind", ["rademacher", "kronecker"])
def test_cost_estimate_works_under_a_bf16_default_dtype(kind):
    from lightning_tive.tive.projection import estimate_projection_cost

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what a bf16-true run sets
    try:
        estimate = estimate_projection_cost(build_projector(kind, 64, 0, LORA_SHAPES), "cpu", batch_size=2, tokens=8)
    finally:
        torch.set_default_dtype(before)
    assert estimate["seconds_per_example"] > 0
