"""The uniform quantizer and its grid searches, against brute force."""
import pytest
import torch

import boa.core.quantizer as quantizer
from boa.core.quantizer import MSE_NORM, QuantSpec, fake_quantize, find_grid, grids_by_group


def hessian_error(w, q, H):
    e = q - w
    return ((e @ H) * e).sum(-1)


@pytest.mark.parametrize("sym", [False, True])
def test_searched_grids_beat_minmax_on_their_own_objective(sym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    w[:, 0] *= 6  # an outlier per row makes clipping worthwhile
    X = torch.randn(256, 32, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 256
    base = QuantSpec(bits=3, sym=sym)
    q_minmax = fake_quantize(w, *find_grid(w, base)[:2], base.maxq)
    mse = QuantSpec(bits=3, sym=sym, grid="mse")
    q_mse = fake_quantize(w, *find_grid(w, mse)[:2], mse.maxq)
    hes = QuantSpec(bits=3, sym=sym, grid="hessian")
    q_hes = fake_quantize(w, *find_grid(w, hes, H)[:2], hes.maxq)
    err_mse = (q_mse - w).abs().pow(MSE_NORM).sum(-1)
    err_minmax = (q_minmax - w).abs().pow(MSE_NORM).sum(-1)
    assert torch.all(err_mse <= err_minmax + 1e-12) and torch.any(err_mse < 0.9 * err_minmax)
    assert torch.all(hessian_error(w, q_hes, H) <= hessian_error(w, q_minmax, H) + 1e-12)
    assert hessian_error(w, q_hes, H).sum() < hessian_error(w, q_mse, H).sum()


def test_minmax_grid_is_exact_on_grid_points():
    """Weights already on a 4-bit grid (as SmolLM2's Q4_1 blocks are) are reproduced exactly."""
    scale = torch.tensor([[0.1], [0.25]])
    zero = torch.tensor([[3.0], [7.0]])
    codes = torch.tensor([[0, 15, 3, 7], [15, 0, 7, 2]], dtype=torch.float32)
    w = scale * (codes - zero)
    spec = QuantSpec(bits=4)
    assert torch.allclose(fake_quantize(w, *find_grid(w, spec)[:2], spec.maxq), w, atol=1e-6)


def test_symmetric_grid_is_centred_and_partial_groups_get_their_own_grid():
    w = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=4, sym=True, group_size=8)
    scale, zero, _ = grids_by_group(w, spec)
    assert scale.shape == (4, 3) and torch.all(zero == 8)
    last = w[:, 16:]
    assert torch.allclose(scale[:, 2], 2 * last.abs().amax(-1) / 15)


def brute_force_hessian_grid(w, H, spec):
    """Every clip ratio with both zero roundings (and the min-max grid's rounded zero), one row at a time."""
    best = []
    for row in w:
        candidates = []
        for i in range(100):
            p = 1 - i / 100
            lo, hi = p * min(float(row.min()), 0.0), p * max(float(row.max()), 0.0)
            scale = (hi - lo) / spec.maxq
            zeros = [torch.floor(torch.tensor(-lo / scale)), torch.ceil(torch.tensor(-lo / scale))]
            for zero in zeros + ([torch.round(torch.tensor(-lo / scale))] if i == 0 else []):
                q = scale * (torch.clamp(torch.round(row / scale) + zero, 0, spec.maxq) - zero)
                candidates.append(float((q - row) @ H @ (q - row)))
        best.append(min(candidates))
    return torch.tensor(best, dtype=w.dtype)


def test_coarse_to_fine_hessian_search_is_close_to_exhaustive():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    w[:, 3] *= 5
    X = torch.randn(512, 40, generator=g, dtype=torch.float64) * torch.rand(40, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 512
    spec = QuantSpec(bits=3, grid="hessian")
    ours = hessian_error(w, fake_quantize(w, *find_grid(w, spec, H)[:2], spec.maxq), H)
    exhaustive = brute_force_hessian_grid(w, H, spec)
    assert torch.all(ours >= exhaustive * (1 - 1e-6))  # nothing better than the optimum over all candidates
    assert float(ours.sum()) <= 1.01 * float(exhaustive.sum())


def massive_channel_problem(seed: int, rows: int = 24, cols: int = 40):
    """Weights with an outlier column and a Hessian whose channels differ in scale by orders of magnitude (as
    SmolLM2's massive activations make them), so that the diagonal alone ranks candidates imperfectly."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    w[:, 3] *= 5
    X = torch.randn(512, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                              dtype=torch.float64)
    X[:, 7] *= 30
    return w, 2 * X.T @ X / 512


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [-1, 8])
def test_fast_hessian_search_is_the_exact_one_when_the_shortlist_holds_every_candidate(monkeypatch, sym, group):
    w, H = massive_channel_problem(3)
    exact = grids_by_group(w, QuantSpec(bits=3, sym=sym, group_size=group, grid="hessian"), H)
    monkeypatch.setattr(quantizer, "SHORTLIST", 1000)
    fast = grids_by_group(w, QuantSpec(bits=3, sym=sym, group_size=group, grid="hessian-fast"), H)
    assert torch.equal(fast.scale, exact.scale) and torch.equal(fast.zero, exact.zero)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_hessian_search_stays_close_to_exhaustive_and_never_loses_to_minmax(seed):
    """On correlated inputs with a massive channel: within 3.5% of the best of all 200 candidates in total, each row
    no worse than its min-max grid."""
    w, H = massive_channel_problem(seed)
    spec = QuantSpec(bits=3, grid="hessian-fast")
    fast = hessian_error(w, fake_quantize(w, *find_grid(w, spec, H)[:2], spec.maxq), H)
    minmax = hessian_error(w, fake_quantize(w, *find_grid(w, QuantSpec(bits=3))[:2], spec.maxq), H)
    exhaustive = brute_force_hessian_grid(w, H, spec)
    assert torch.all(fast >= exhaustive * (1 - 1e-6)) and torch.all(fast <= minmax * (1 + 1e-12))
    assert float(fast.sum()) <= 1.035 * float(exhaustive.sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grid", ["minmax", "mse", "hessian", "hessian-fast"])
@pytest.mark.parametrize("sign", [-1, 1])
def test_one_signed_rows_get_zero_points_on_the_grid(bits, grid, sign):
    """Rows with no positive (or no negative) weight: every grid's zero point is a b-bit integer. (The clip search
    once offered ceil(maxq·(1+ε)) = maxq + 1 for all-negative rows, which the packed kernels then read wrongly.)"""
    torch.manual_seed(bits)
    w = sign * torch.rand(16, 32, dtype=torch.float64)
    scale, zero, _ = find_grid(w, QuantSpec(bits, grid=grid), torch.eye(32, dtype=torch.float64))
    assert int(zero.min()) >= 0 and int(zero.max()) <= 2**bits - 1
    assert torch.equal(zero, torch.round(zero)) and bool((scale > 0).all())
