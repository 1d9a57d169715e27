"""The OBS solver on columns alone (GPTQ: one input Hessian, no row coupling): against an independent dense OBS
solve, lazy batching against column-by-column, against RTN; partial and static groups, dead inputs. The row-coupled
solves (BoA, TurboBoA) are in test_row_coupled_solver.py. Damping relative to the mean or the median diagonal."""
import pytest
import torch

import boa
from boa.algorithms import obs_solve, rtn
from boa.core.hessian import damp, layer_loss
from boa.core.gguf_grids import SUPER_BLOCK, gguf_type, super_units
from boa.core.quantizer import QuantSpec, dequantize, find_grid, quantize

from problems import correlated_problem


def dense_obs(W, H, spec, order, percdamp=0.01, units=None):
    """Optimal Brain Surgeon, one weight column at a time, on the explicit inverse of the remaining block of H
    (no Cholesky, no lazy batching). Grids per group are chosen when the group's first column is reached
    (in processing order), from the compensated weights (GGUF K types: on the super-blocks' `units`)."""
    W = W.clone()
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    cols = W.shape[1]
    width = spec.group_width(cols)
    codes = torch.zeros_like(W)
    remaining = list(order)
    for pos, j in enumerate(order):
        if pos % width == 0:
            group = order[pos : pos + width]
            unit = None if units is None else units[:, j // SUPER_BLOCK]
            grid = find_grid(W[:, group], spec, unit=unit)
        Hinv = torch.linalg.inv(H[remaining][:, remaining])
        c = quantize(W[:, j : j + 1], grid.scale, grid.zero, spec.maxq, grid.offset)
        codes[:, j : j + 1] = c
        err = W[:, j] - dequantize(c, grid.scale, grid.zero, grid.offset)[:, 0]
        W[:, remaining] -= err[:, None] * Hinv[0][None, :] / Hinv[0, 0]
        remaining.pop(0)
    return codes


@pytest.mark.parametrize("group_size", [-1, 4, 5])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_dense_obs(group_size, act_order):
    W, H = correlated_problem(6, 12)
    spec = QuantSpec(bits=3, group_size=group_size)
    got = obs_solve(W, H, spec, block_size=4, act_order=act_order)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(12)
    expected = dense_obs(W, H, spec, order.tolist())
    assert torch.equal(got.codes.double(), expected)


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K"])
def test_gptq_on_grids_with_block_minimums_equals_dense_obs(name):
    """GGUF's block minimums, w = s·c − o: the column pass rounds w + o on s·c (and spreads the same errors); the
    dense solve quantizes with the offset itself. The super-blocks' (d, dmin) come from the weights before any
    update."""
    kind = gguf_type(name)
    W, H = correlated_problem(6, 512, seed=5)
    spec = QuantSpec(bits=kind.bits, group_size=kind.block, gguf=name)
    got = obs_solve(W, H, spec, block_size=64)
    expected = dense_obs(W, H, spec, list(range(512)), units=super_units(W, kind))
    assert torch.equal(got.codes.double(), expected)
    assert bool((got.offset > 0).any()) and bool((got.zero == 0).all())


@pytest.mark.parametrize("group_size", [-1, 32, 48])
def test_lazy_batch_equals_column_by_column(group_size):
    W, H = correlated_problem(16, 100, seed=1)
    spec = QuantSpec(bits=4, group_size=group_size)
    lazy = obs_solve(W, H, spec, block_size=32)
    one = obs_solve(W, H, spec, block_size=1)
    assert torch.equal(lazy.codes, one.codes)
    assert torch.equal(lazy.g_idx, one.g_idx)


@pytest.mark.parametrize("bits,group_size", [(2, -1), (3, -1), (4, 16)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    W, H = correlated_problem(32, 64, seed=2, dtype=torch.float32)
    spec = QuantSpec(bits=bits, group_size=group_size)
    loss_gptq = layer_loss(W, obs_solve(W, H, spec).dequantize(), H)
    loss_rtn = layer_loss(W, rtn(W, spec).dequantize(), H)
    assert loss_gptq < 0.9 * loss_rtn


def test_partial_last_group_and_static_groups():
    W, H = correlated_problem(8, 576 // 8, seed=3, dtype=torch.float32)  # 72 columns = 4.5 groups of 16
    spec = QuantSpec(bits=4, group_size=16)
    for static in (False, True):
        q = obs_solve(W, H, spec, act_order=True, static_groups=static)
        assert q.scale.shape == (8, 5)
        assert int(q.g_idx.max()) == 4
        if static:  # groups by original column index
            assert torch.equal(q.g_idx.long(), torch.arange(72) // 16)
        assert torch.bincount(q.g_idx.long()).tolist() == [16, 16, 16, 16, 8]


def test_dead_inputs_are_zeroed():
    W, H = correlated_problem(4, 8, seed=4)
    H[3, :] = 0
    H[:, 3] = 0
    q = obs_solve(W, H, QuantSpec(bits=4))
    assert torch.all(q.dequantize()[:, 3] == 0)


def massive_channel_problem(seed: int):
    """Inputs with 3 massive channels (×300: SmolLM2's down_proj inputs have diag(H) max 32686, median 0.04) that
    carry no weight, 17 ordinary and 44 small ones: damping by 1% of the mean diagonal then swamps the curvature
    of every channel but the massive ones."""
    g = torch.Generator().manual_seed(seed)
    C = 64
    scales = torch.full((C,), 0.05, dtype=torch.float64)
    scales[:3], scales[3:20] = 300.0, 1.0
    mix = torch.eye(C, dtype=torch.float64) + 0.3 * torch.randn(C, C, generator=g, dtype=torch.float64) * (scales < 100)
    X = torch.randn(4096, C, generator=g, dtype=torch.float64) @ mix * scales
    W = torch.randn(32, C, generator=g, dtype=torch.float64)
    W[:, :3] = 0
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("seed", range(3))
def test_median_damping_keeps_the_small_channels_curvature(seed):
    """On a Hessian whose mean diagonal is set by a few massive channels, damping relative to the median solves as
    stably (finite, on the grid) and reaches a clearly lower true (undamped) loss than mean damping."""
    W, H = massive_channel_problem(seed)
    spec = QuantSpec(bits=3, group_size=-1)
    losses = {}
    for reference in ("mean", "median"):
        q = obs_solve(W, H, spec, damp_reference=reference)
        assert torch.isfinite(q.scale).all() and int(q.codes.max()) <= spec.maxq
        losses[reference] = layer_loss(W, q.dequantize(), H)
    assert losses["median"] < 0.8 * losses["mean"]


def test_damping_adds_a_multiple_of_the_diagonals_mean_or_median():
    H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1000.0], dtype=torch.float64)) + 0.1
    for reference, level in (("mean", (1.1 + 2.1 + 3.1 + 1000.1) / 4), ("median", 2.1)):  # the lower median
        expected = H + 0.01 * level * torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(damp(H, 0.01, reference), expected, rtol=0, atol=1e-12)
    with pytest.raises(boa.BoaError, match="damp_reference='max'"):
        boa.GPTQ(damp_reference="max")
