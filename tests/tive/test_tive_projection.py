"""Projectors: settings validation, seeding, exact identities, and JL accuracy."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lightning_tive.tive.projection import (
    KroneckerProjector,
    RademacherProjector,
    build_projector,
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


def test_projection_is_identical_in_another_process():
    code = (
        "import torch; from lightning_tive.tive.projection import build_projector;"
        "shapes=[(8, 96), (96, 8)]; g=[torch.arange(o*i, dtype=torch.float32).reshape(1,o,i).sin() for o,i in shapes];"
        "print(repr([build_projector(k, 40, 3, shapes).project(g).sum().item() for k in ('rademacher','kronecker')]))"
    )
    here = [
        build_projector(k, 40, 3, [(8, 96), (96, 8)])
        .project(
            [torch.arange(o * i, dtype=torch.float32).reshape(1, o, i).sin() for o, i in [(8, 96), (96, 8)]]
        )
        .sum()
        .item()
        for k in ("rademacher", "kronecker")
    ]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr(here)


def test_rademacher_equals_its_dense_matrix_built_from_blocks():
    shapes = [(3, 5), (4, 6)]
    proj = RademacherProjector(16, 0, shapes, block_size=7, cache_bytes=0)
    columns = []
    for layer, (o, i) in enumerate(shapes):
        n = o * i
        for block, start in enumerate(range(0, n, 7)):
            columns.append(proj._block(layer, block, min(7, n - start), torch.device("cpu")))
    dense = torch.cat(columns, dim=0)  # [D, k]
    assert set(dense.unique().tolist()) == {-1.0, 1.0}
    grads = gradient_like(shapes, 4, 3)
    torch.testing.assert_close(proj.project(grads), flat(grads) @ dense / math.sqrt(16))
    # The cache only changes where blocks live, not their values.
    cached = RademacherProjector(16, 0, shapes, block_size=7)
    assert torch.equal(cached.project(grads), proj.project(grads))


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
