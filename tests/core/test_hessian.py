"""Input Hessians (boa.core.hessian): the streamed accumulator against one-shot sums, and the inverse Cholesky factor
against its definition, damping only the matrix of a batch that fails."""
import torch

from boa.core.hessian import HessianAccumulator, inverse_cholesky_upper

from problems import spd


def test_accumulator_streams_uneven_batches_like_one_shot_sums():
    """Batches of 8 and 4 windows: H = 2E[xxᵀ] and D = 2E[(x_ref − x)xᵀ] weight every token equally."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, 6, generator=g, dtype=torch.float64)
    x_ref = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(6, torch.float64)
    for a, b in ((0, 8), (8, 12)):
        acc.add(x[a:b], x_ref[a:b])
    flat, flat_ref = x.reshape(-1, 6), x_ref.reshape(-1, 6)
    torch.testing.assert_close(acc.H, 2 * flat.T @ flat / 60)
    torch.testing.assert_close(acc.D, 2 * (flat_ref - flat).T @ flat / 60)
    assert acc.n == 60


def test_dx_term_is_the_mean_over_the_batches_that_came_with_a_reference():
    """A batch without x_ref (beyond dx_windows) joins H but not D: D = 2E[(x_ref − x)xᵀ] over the first batch's
    tokens alone, H over all of them."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, 6, generator=g, dtype=torch.float64)
    x_ref = x[:8] + 0.1 * torch.randn(8, 5, 6, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(6, torch.float64)
    acc.add(x[:8], x_ref)
    acc.add(x[8:])
    flat, first, first_ref = x.reshape(-1, 6), x[:8].reshape(-1, 6), x_ref.reshape(-1, 6)
    torch.testing.assert_close(acc.H, 2 * flat.T @ flat / 60)
    torch.testing.assert_close(acc.D, 2 * (first_ref - first).T @ first / 40)
    assert (acc.n, acc.n_dx) == (60, 40)


def test_inverse_cholesky_upper_is_the_factor_of_the_inverse():
    H = torch.stack([spd(n, n, torch.float64)[:64, :64] for n in (64, 70, 80)])
    U = inverse_cholesky_upper(H, percdamp=0.01)
    assert torch.equal(U, U.triu())
    damped = H + 0.01 * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(64)
    torch.testing.assert_close(U.transpose(-1, -2) @ U @ damped, torch.eye(64).expand(3, 64, 64).double(),
                               atol=1e-9, rtol=0)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    torch.testing.assert_close(U, expected, atol=1e-10, rtol=1e-8)


def test_inverse_cholesky_damps_only_the_matrix_that_fails():
    good = spd(16, 1, torch.float64)
    bad = torch.ones(16, 16, dtype=torch.float64)  # rank one: not positive definite without more damping
    bad[0, 0] = 1 + 1e-12
    U = inverse_cholesky_upper(torch.stack([good, bad]), percdamp=0)
    torch.testing.assert_close(U[0], inverse_cholesky_upper(good[None], percdamp=0)[0], atol=0, rtol=0)
    assert torch.isfinite(U[1]).all()
    assert not torch.allclose(U[1].T @ U[1] @ bad, torch.eye(16, dtype=torch.float64))  # it was damped



def test_the_dx_gap_can_be_measured_from_another_input():
    """D = 2/n Σ (x_ref − x_gap) xᵀ over every batch: the gap from x_gap (an input before its run-time rounding),
    the outer product with x (what the layer sees); without x_gap, from x itself."""
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 4, generator=gen, dtype=torch.float64),
                torch.randn(5, 4, generator=gen, dtype=torch.float64),
                torch.randn(5, 4, generator=gen, dtype=torch.float64)) for _ in range(3)]
    with_gap, plain = HessianAccumulator(4, torch.float64), HessianAccumulator(4, torch.float64)
    for x, x_ref, x_gap in batches:
        with_gap.add(x, x_ref, x_gap)
        plain.add(x, x_ref)
    x, x_ref, x_gap = (torch.cat(t) for t in zip(*batches))
    assert torch.allclose(with_gap.D, 2 * (x_ref - x_gap).T @ x / 15)
    assert torch.allclose(plain.D, 2 * (x_ref - x).T @ x / 15)
