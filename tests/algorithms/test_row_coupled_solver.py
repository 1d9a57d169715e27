"""The OBS solver with rows coupled through the attention's row factors (BoA / TurboBoA) and its extensions, against
independent dense computations: the OBS solve on the full H_out ⊗ H_in, the closed form of the row update, the
exact minimiser of the dX objective, and brute-force scale refinement. GPTQ's column-only solve is in
test_column_solver.py."""
import pytest
import torch

from boa.algorithms import obs_solve
from boa.algorithms.solver import refine_scales, row_update
from boa.core.hessian import inverse_cholesky_upper
from boa.core.quantizer import QuantSpec, dequantize, find_grid, quantize

from problems import correlated_problem, spd


def damped(H, percdamp=0.01):
    return H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def dense_kron_obs(W, H_out, H_in, spec):
    """Optimal Brain Surgeon on vec(W) (row-major) with the full Kronecker Hessian H_out ⊗ H_in, one weight at a time,
    on the explicit inverse of the remaining block. Each row's per-channel grid is chosen when the row is reached,
    from its compensated weights."""
    d, cols = W.shape
    w = W.reshape(-1).clone()
    Hfull = torch.kron(damped(H_out), damped(H_in))
    codes = torch.zeros(d * cols, dtype=W.dtype)
    remaining = list(range(d * cols))
    for k in range(d * cols):
        if k % cols == 0:
            scale, zero, _ = find_grid(w[k : k + cols][None], spec)
        Hinv = torch.linalg.inv(Hfull[remaining][:, remaining])
        c = quantize(w[k], scale[0, 0], zero[0, 0], spec.maxq)
        codes[k] = c
        err = w[k] - dequantize(c, scale[0, 0], zero[0, 0])
        w[remaining] -= err * Hinv[0] / Hinv[0, 0]
        remaining.pop(0)
    return codes.reshape(d, cols)


@pytest.mark.parametrize("seed", [0, 1])
def test_boa_equals_dense_kronecker_obs(seed):
    heads, d, cols = 2, 3, 6
    W, H_in = correlated_problem(heads * d, cols, seed=seed)
    H_out = torch.stack([spd(d, seed + 10), spd(d, seed + 20)])
    spec = QuantSpec(bits=3)
    got = obs_solve(W, H_in, spec, H_out=H_out, rows_per_step=1, block_size=4)
    for h in range(heads):
        expected = dense_kron_obs(W[h * d : (h + 1) * d], H_out[h], H_in, spec)
        assert torch.equal(got.codes[h * d : (h + 1) * d].double(), expected)


def test_row_update_equals_closed_form_minimiser():
    d, cols, r1, r2 = 8, 5, 2, 5
    H_out = spd(d, 3)[None]
    U_out = inverse_cholesky_upper(H_out, percdamp=0)
    delta = torch.randn(1, r2 - r1, cols, dtype=torch.float64)  # Q_B − W_B
    expected = -torch.linalg.solve(H_out[0, r2:, r2:], H_out[0, r2:, r1:r2]) @ delta[0]
    torch.testing.assert_close(row_update(U_out, r1, r2, delta)[0], expected)


def dense_row_blocks(W, H_out, H_in, spec, n):
    """TurboBoA's N-row scheme written plainly: each row block runs GPTQ per row (no coupling inside the block),
    then the later rows move by the minimiser −H_NN⁻¹ H_NB ΔW_B of the row objective."""
    W = W.clone()
    H_o = damped(H_out)
    codes = torch.zeros_like(W)
    d = W.shape[0]
    for r1 in range(0, d, n):
        r2 = min(r1 + n, d)
        q = obs_solve(W[r1:r2], H_in, spec, block_size=1)
        codes[r1:r2] = q.codes.double()
        if r2 < d:
            W[r2:] -= torch.linalg.solve(H_o[r2:, r2:], H_o[r2:, r1:r2]) @ (q.dequantize() - W[r1:r2])
    return codes


@pytest.mark.parametrize("n", [2, 3, 8])
def test_turboboa_row_blocks_equal_plain_scheme(n):
    d, cols = 8, 10
    W, H_in = correlated_problem(d, cols, seed=5)
    H_out = spd(d, 6)
    got = obs_solve(W, H_in, QuantSpec(bits=2), H_out=H_out[None], rows_per_step=n)
    assert torch.equal(got.codes.double(), dense_row_blocks(W, H_out, H_in, QuantSpec(bits=2), n))


def test_n_rows_one_is_boa_and_n_rows_full_head_is_gptq():
    heads, d, cols = 3, 4, 16
    W, H_in = correlated_problem(heads * d, cols, seed=7)
    H_out = torch.stack([spd(d, s) for s in range(heads)])
    spec = QuantSpec(bits=3, group_size=8)
    one = obs_solve(W, H_in, spec, H_out=H_out, rows_per_step=1)
    boa_rows = [dense_row_blocks(W[h * d : (h + 1) * d], H_out[h], H_in, spec, 1) for h in range(heads)]
    assert torch.equal(one.codes.double(), torch.cat(boa_rows))
    # with every row in one block there is no row update left: the codes are GPTQ's
    full = obs_solve(W, H_in, spec, H_out=H_out, rows_per_step=d)
    assert torch.equal(full.codes, obs_solve(W, H_in, spec).codes)


def test_per_head_input_hessians_equal_separate_solves():
    heads, d, cols = 3, 4, 12
    W, _ = correlated_problem(heads * d, cols, seed=8)
    H = torch.stack([correlated_problem(1, cols, seed=20 + h)[1] for h in range(heads)])
    spec = QuantSpec(bits=3, group_size=4)
    got = obs_solve(W, H, spec, act_order=False)
    for h in range(heads):
        alone = obs_solve(W[h * d : (h + 1) * d], H[h], spec)
        assert torch.equal(got.codes[h * d : (h + 1) * d], alone.codes)
        torch.testing.assert_close(got.scale[h * d : (h + 1) * d], alone.scale)


def dx_problem(seed, rows=6, cols=10, n=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, n, generator=g, dtype=torch.float64) * (0.5 + torch.rand(cols, 1, generator=g,
                                                                                      dtype=torch.float64))
    X_fp = X + 0.3 * torch.randn(cols, n, generator=g, dtype=torch.float64)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W, 2 * X @ X.T / n, 0.25 * 2 * (X_fp - X) @ X.T / n


def dx_objective(Q, W, H, D):
    dW = Q - W
    return float(torch.trace(dW @ H @ dW.T) - 2 * torch.trace(W @ D @ dW.T))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dx_correction_is_the_exact_sequential_minimiser(seed):
    """Each column is rounded at the exact minimiser of tr(ΔW H ΔWᵀ) − 2tr(W D ΔWᵀ) over the columns not yet fixed."""
    W, H, D = dx_problem(seed)
    spec = QuantSpec(bits=3)
    got = obs_solve(W, H, spec, D=D, block_size=3)
    Hd = damped(H)
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    for c in range(cols):
        fixed, free = slice(0, c), slice(c, cols)
        rhs = (W @ D)[:, free] - (Q[:, fixed] - W[:, fixed]) @ Hd[fixed, free]
        optimum = W[:, free] + torch.linalg.solve(Hd[free, free], rhs.T).T
        if c == 0:
            scale, zero, _ = find_grid(optimum, spec)
        Q[:, c] = dequantize(quantize(optimum[:, 0], scale[:, 0], zero[:, 0], spec.maxq), scale[:, 0], zero[:, 0])
    torch.testing.assert_close(got.dequantize(), Q)


def test_dx_fold_beats_the_incremental_gptaq_term():
    """The public code's GPTAQ column term W[:, c:] −= e_c U[c, c:] − w_c P[c, c:], P = triu₁(D Uᵀ) U, on the same
    problems: the exact fold reaches a lower dX objective on average."""
    spec = QuantSpec(bits=3)
    fold, incremental = [], []
    for seed in range(6):
        W, H, D = dx_problem(seed, rows=16, cols=24)
        fold.append(dx_objective(obs_solve(W, H, spec, D=D).dequantize(), W, H, D))
        U = inverse_cholesky_upper(H, 0.01)
        P = torch.triu(D @ U.T, 1) @ U
        scale, zero, _ = find_grid(W, spec)
        Wc, Q = W.clone(), torch.zeros_like(W)
        for c in range(W.shape[1]):
            w = Wc[:, c].clone()
            Q[:, c] = dequantize(quantize(w, scale[:, 0], zero[:, 0], spec.maxq), scale[:, 0], zero[:, 0])
            Wc[:, c:] -= ((w - Q[:, c]) / U[c, c])[:, None] * U[c, c:] - w[:, None] * P[c, c:]
        incremental.append(dx_objective(Q, W, H, D))
    assert sum(fold) < sum(incremental)


def kron_objective(Q, T, H, H_out):
    dW = Q - T
    return float(torch.einsum("bij,bjc,bcd,bid->", H_out, dW, H, dW))


@pytest.mark.parametrize("group_size", [-1, 4, 5])
@pytest.mark.parametrize("with_h_out", [False, True])
def test_scale_refinement_never_increases_the_objective(group_size, with_h_out):
    heads, d, cols = 2, 6, 12
    W, H = correlated_problem(heads * d, cols, seed=9)
    H_out = torch.stack([spd(d, 30), spd(d, 31)]) if with_h_out else None
    spec = QuantSpec(bits=2, group_size=group_size)
    q = obs_solve(W, H, spec, H_out=H_out, heads=heads)
    W_int = (q.codes.double() - q.zero[:, q.g_idx.long()]).reshape(heads, d, cols)
    T = W.reshape(heads, d, cols)
    eye = torch.eye(d, dtype=W.dtype).expand(heads, d, d)
    H_o = eye if H_out is None else H_out
    scale = q.scale.reshape(heads, d, -1)
    g = q.g_idx.long()
    losses = [kron_objective(scale[..., g] * W_int, T, H[None], H_o)]
    for _ in range(3):
        scale = refine_scales(W_int, scale, g, T, H[None], H_out, iters=1)
        losses.append(kron_objective(scale[..., g] * W_int, T, H[None], H_o))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]
    if H_out is None:  # rows independent: one step reaches each row's least-squares optimum
        assert losses[2] == pytest.approx(losses[1], rel=1e-9)


def test_a_row_the_row_factor_ignores_keeps_its_scale_and_the_solve_stays_finite():
    """Gemma 3's q/k norms can zero an output dimension: H_out then has a zero row and column. TurboBoA's solve and
    scale refinement stay finite, that row keeps its scale, the others still improve."""
    heads, d, cols = 1, 6, 12
    W, H = correlated_problem(d, cols, seed=13)
    H_out = spd(d, 32)[None].clone()
    H_out[:, 2, :] = 0
    H_out[:, :, 2] = 0
    q = obs_solve(W, H, QuantSpec(bits=2, group_size=4), H_out=H_out, rows_per_step=3, refine_iters=1)
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.dequantize()).all()
    W_int = (q.codes.double() - q.zero[:, q.g_idx.long()]).reshape(heads, d, cols)
    scale = q.scale.reshape(heads, d, -1) * 1.5  # off the optimum
    refined = refine_scales(W_int, scale, q.g_idx.long(), W.reshape(heads, d, cols), H[None], H_out, iters=1)
    assert torch.equal(refined[:, 2], scale[:, 2]) and not torch.equal(refined[:, 0], scale[:, 0])


@pytest.mark.parametrize("h_out", [None, 2.5])
def test_scale_refinement_reaches_the_brute_force_optimum_for_one_row(h_out):
    cols = 10
    _, H = correlated_problem(1, cols, seed=11)
    g = torch.tensor([0] * 4 + [1] * 4 + [2] * 2)
    W_int = torch.randint(-3, 4, (1, 1, cols), generator=torch.Generator().manual_seed(0)).double()
    T = torch.randn(1, 1, cols, dtype=torch.float64)
    H_out = None if h_out is None else torch.full((1, 1, 1), h_out, dtype=torch.float64)
    scale = refine_scales(W_int, torch.ones(1, 1, 3, dtype=torch.float64), g, T, H[None], H_out, iters=1)
    # brute force: least squares in the 3 scales on the explicit quadratic form
    L = torch.linalg.cholesky(H)
    basis = torch.stack([(g == k).double() * W_int[0, 0] for k in range(3)])  # Q = Σ_k s_k basis_k
    expected = torch.linalg.lstsq((basis @ L).T, (T[0] @ L).T).solution.squeeze(-1)
    torch.testing.assert_close(scale[0, 0], expected)


def test_turboboa_beats_gptq_on_the_kronecker_objective():
    heads, d, cols = 4, 16, 64
    W, H = correlated_problem(heads * d, cols, seed=12)
    H_out = torch.stack([spd(d, 40 + h) for h in range(heads)])
    spec = QuantSpec(bits=2, group_size=16)
    T = W.reshape(heads, d, cols)

    def loss(q):
        return kron_objective(q.dequantize().reshape(heads, d, cols), T, H[None], H_out)

    gptq_loss = loss(obs_solve(W, H, spec))
    boa_loss = loss(obs_solve(W, H, spec, H_out=H_out, rows_per_step=1))
    turbo_loss = loss(obs_solve(W, H, spec, H_out=H_out, rows_per_step=4, refine_iters=1))
    assert boa_loss < gptq_loss and turbo_loss < gptq_loss


def test_row_order_equals_dense_obs_on_permuted_rows():
    """row_order: each head's rows by decreasing diag(H_out); the result equals the dense Kronecker OBS run on the
    rows in that order, returned in the original order."""
    d, cols = 4, 6
    W, H_in = correlated_problem(d, cols, seed=13)
    H_out = spd(d, 14)
    H_out = H_out * torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=H_out.dtype).sqrt().outer(
        torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=H_out.dtype).sqrt())
    spec = QuantSpec(bits=3)
    got = obs_solve(W, H_in, spec, H_out=H_out[None], row_order=True)
    order = torch.argsort(torch.diagonal(H_out), descending=True)
    expected = dense_kron_obs(W[order], H_out[order][:, order], H_in, spec)
    assert torch.equal(got.codes.double()[order], expected)
    assert not torch.equal(order, torch.arange(d))
