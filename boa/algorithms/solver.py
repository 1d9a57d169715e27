"""One OBS-family solver for GPTQ, BoA and TurboBoA (ALGORITHMS.md §2, §4-5).

A layer's weight W (rows, cols) is split into `heads` blocks W_h (d, cols) that are solved independently and in
parallel (a batch dimension). Each minimises

    tr(H_out ΔW H_in ΔWᵀ) − 2 tr(H_out W D ΔWᵀ),   ΔW = Q − W,

with H_in = 2E[XXᵀ] (cols × cols, shared or per head), H_out the head's row factor (d × d; identity for GPTQ) and D
the earlier layers' error term α·2E[(X_fp − X_q) X_qᵀ] (zero unless TurboBoA's dX correction is on).

Since the objective is tr(H_out (Q − T) H_in (Q − T)ᵀ) + const with target T = W + W D H_in⁻¹, the dX term is
handled exactly by solving for T. (The public code instead adds GPTAQ's incremental column term P = triu₁(D Uᵀ) U;
on random problems folding the target gives a lower objective, and it equals the exact sequential minimiser — see
tests/algorithms/test_row_coupled_solver.py.)

The Kronecker factorisation (H_out ⊗ H_in)⁻¹ = H_out⁻¹ ⊗ H_in⁻¹ makes the OBS solve two nested passes:
- rows, N at a time: the N rows of a row block run GPTQ across their columns with U_in = chol(H_in⁻¹) (no coupling
  inside the block), then the later rows take the closed-form update
      W[r2:] −= P2 (W_B − Q_B),   P2 = U_outᵀ[r2:, B] U_out[B, B]⁻ᵀ   (= −H_out,NN⁻¹ H_out,NB ΔW_B).
  N = 1 is BoA (exactly the dense OBS solve on H_out ⊗ H_in); N > 1 is TurboBoA; H_out = I is GPTQ (one block).
- columns, with lazy batch updates: q_j = Q(w_j), e_j = (w_j − q_j)/U_jj, W[:, j+1:blk_end] −= e_j U_j,j+1:blk_end
  inside a block of B columns, then one GEMM W[:, blk_end:] −= E U[blk, blk_end:].

Grids: per-channel grids are chosen from each row block's weights when it starts (adaptive: already compensated
for the rows before it), group grids when the column pass reaches the group; `static_groups` fixes all of them from
the target before any update. After rounding, `refine_iters` sweeps of exact coordinate descent on the scales
(zero points and integers fixed) lower the same objective further, per channel or per group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from boa_kernels import compensate_block_
from boa.core.errors import BoaError
from boa.core.gguf_grids import SUPER_BLOCK, representable_scales, super_units
from boa.core.hessian import inverse_cholesky_upper, remove_dead_inputs
from boa.core.quantizer import QuantizedWeight, QuantSpec, find_grid, grids_by_group


@dataclass
class SolveState:
    """What a solve leaves for a learned rounding to start from, in W's row and column order, split by head:
    compensated (heads, d, cols) the weights each code was rounded from; target (heads, d, cols) T = W + W D H⁻¹
    (W itself without the dX term); H (1 or heads, cols, cols) the input Hessian with dead inputs fixed, undamped."""

    compensated: torch.Tensor
    target: torch.Tensor
    H: torch.Tensor
    heads: int


@dataclass
class _ColumnPass:
    """Quantizes the columns of W (batch, rows, cols) in processing order with lazy-batch error compensation.

    U (1 or batch, cols, cols) is chol(H_in⁻¹), H (same shape) serves the Hessian-weighted grid search, both in
    processing order. scale/zero (batch, rows, n_groups) are read (static grids) or written when the pass reaches a
    group's first column (dynamic); group_of[j] names the group of the column processed j-th. Inside a block the
    columns run through the fused kernel `boa_kernels.compensate_block_`, one call per run of columns that share
    their grids' state (the whole block, or up to the next dynamic group's start).
    """

    spec: QuantSpec
    H: torch.Tensor
    U: torch.Tensor
    group_of: torch.Tensor
    static: bool
    block_size: int

    def _block_width(self, cols: int) -> int:
        """A multiple of the group width (or the group width itself), so no group straddles two blocks and each
        dynamic grid is found on fully compensated columns."""
        if self.spec.group_size == -1:
            return self.block_size
        g = self.spec.group_size
        return g * max(1, self.block_size // g) if g <= cols else cols

    def __post_init__(self):
        cols = self.U.shape[-1]
        step = self._block_width(cols)
        self._blocks = [(i1, min(i1 + step, cols)) for i1 in range(0, cols, step)]
        # The kernel's contiguous diagonal blocks of U, made once for every row block that runs this pass.
        self._U_blocks = [self.U[:, i1:i2, i1:i2].contiguous() for i1, i2 in self._blocks]

    def run(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
            compensated: torch.Tensor | None = None, units: torch.Tensor | None = None,
            offset: torch.Tensor | None = None) -> torch.Tensor:
        """Quantizes W in place (left holding the quantized values); returns the codes. `compensated`, if given,
        receives each column as it was just before rounding (all earlier errors compensated): q_j + e_j U_jj.
        `units` (batch, rows, cols / 256, 2): GGUF K types' super-block (d, dmin), which dynamic grids are multiples
        of. `offset` (like scale): GGUF's block minimums, w = s·c − o; the kernel rounds w + o on s·c (zero 0), the
        errors it spreads are the same."""
        width = self.spec.group_width(W.shape[-1])
        codes = torch.empty_like(W)
        for (i1, i2), U1 in zip(self._blocks, self._U_blocks):
            W1 = W[..., i1:i2].clone(memory_format=torch.contiguous_format)
            E1 = torch.zeros_like(W1)
            C1 = torch.empty_like(W1)
            groups = self.group_of[i1:i2]
            starts = [i1] if self.static else list(range(i1, i2, width))
            for a, b in zip(starts, starts[1:] + [i2]):
                if not self.static:  # the group's grid, from its columns as compensated so far
                    g = a // width
                    H_g = self.H[:, a : a + width, a : a + width]
                    unit = None if units is None else units[..., a // SUPER_BLOCK, :]
                    grid = find_grid(W1[..., a - i1 : a - i1 + width], self.spec, H_g, unit)
                    scale[..., g : g + 1], zero[..., g : g + 1] = grid.scale, grid.zero
                    if offset is not None:
                        offset[..., g : g + 1] = grid.offset
                shift = None if offset is None else offset[..., groups[a - i1 : b - i1]]
                if shift is not None:
                    W1[..., a - i1 : b - i1] += shift
                compensate_block_(W1, E1, C1, U1, scale, zero, groups, self.spec.maxq, a - i1, b - i1)
                if shift is not None:
                    W1[..., a - i1 : b - i1] -= shift
            if compensated is not None:
                compensated[..., i1:i2] = W1 + E1 * torch.diagonal(U1, dim1=-2, dim2=-1).unsqueeze(-2)
            W[..., i1:i2] = W1
            codes[..., i1:i2] = C1
            W[..., i2:] -= E1 @ self.U[:, i1:i2, i2:]
        return codes


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i], :] for every head b: each head's rows in its own order."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def row_update(U_out: torch.Tensor, r1: int, r2: int, delta: torch.Tensor) -> torch.Tensor:
    """The change of rows r2: once rows B = r1:r2 moved by delta = Q_B − W_B (batch, N, cols): −P2 · (W_B − Q_B)
    with P2 = U_outᵀ[r2:, B] U_out[B, B]⁻ᵀ, i.e. the minimiser −H_out[r2:, r2:]⁻¹ H_out[r2:, B] · ΔW_B."""
    X = torch.linalg.solve_triangular(U_out[:, r1:r2, r1:r2], U_out[:, r1:r2, r2:], upper=True)
    return X.transpose(-1, -2) @ delta


def _gram_by_group(W_int: torch.Tensor, H: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """G[b, j, g, g'] = Σ_{c∈g, c'∈g'} W_int[b,j,c] H[b,c,c'] W_int[b,j,c']: the curvature of the objective in row
    j's group scales. member (cols, groups) is the one-hot group membership.

    One group g' at a time: Y = W_int[:, g'] H[g', :] (rows × cols), then G[..., g'] = (W_int ⊙ Y) · member. The
    working memory is two weight-sized temporaries and the work one W_int·H product, whatever the number of groups
    (building W_int ⊙ member at once would take rows × cols × groups floats: 7.5 GB for a 14336 × 4096 layer at
    g128)."""
    b, rows, cols = W_int.shape
    groups = member.shape[1]
    G = torch.empty(b, rows, groups, groups, dtype=W_int.dtype, device=W_int.device)
    for g in range(groups):
        columns = member[:, g].nonzero().squeeze(1)
        Y = W_int[..., columns] @ H[:, columns, :]              # (b, rows, cols)
        G[..., g] = (W_int * Y) @ member
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    ridge = 1e-12 * diag.mean(-1, keepdim=True) + (diag == 0)  # an all-zero group (codes == zero) keeps its scale
    return G + torch.diag_embed(ridge.to(G.dtype))


def refine_scales(
    W_int: torch.Tensor,
    scale: torch.Tensor,
    group_of: torch.Tensor,
    T: torch.Tensor,
    H: torch.Tensor,
    H_out: torch.Tensor | None,
    iters: int,
) -> torch.Tensor:
    """Exact coordinate descent on the scales of Q = scale[group_of] ⊙ W_int for tr(H_out (Q−T) H (Q−T)ᵀ).

    W_int, T (batch, rows, cols); scale (batch, rows, groups); H (1 or batch, cols, cols); H_out (batch, rows, rows)
    or None (identity). Each step minimises over one row's group scales jointly (a groups × groups solve); rows are
    swept one at a time within a head (Gauss–Seidel: each step sees the rows already refined), all heads in parallel;
    without H_out the rows are independent and take one simultaneous step. Never increases the objective.
    """
    scale = scale.clone()
    b, rows, cols = W_int.shape
    groups = scale.shape[-1]
    member = torch.nn.functional.one_hot(group_of, groups).to(W_int.dtype)
    # The Gram matrices of `chunk` rows at a time: rows × groups² floats at once could exceed the weights (g32).
    chunk = max(1, rows * cols // groups**2)
    for _ in range(iters):
        R = ((scale @ member.T) * W_int - T) @ H                               # (Q − T) H
        if H_out is None:
            for r0 in range(0, rows, chunk):
                G = _gram_by_group(W_int[:, r0 : r0 + chunk], H, member)
                r = (W_int[:, r0 : r0 + chunk] * R[:, r0 : r0 + chunk]) @ member
                scale[:, r0 : r0 + chunk] -= torch.linalg.solve(G, r.unsqueeze(-1)).squeeze(-1)
            continue
        V = H_out @ R                                                          # H_out (Q − T) H
        for j in range(rows):
            if j % chunk == 0:
                G = _gram_by_group(W_int[:, j : j + chunk], H, member)
            r = (W_int[:, j] * V[:, j]) @ member                                # (batch, groups)
            # a row with H_out[j, j] = 0 (an output dimension a q/k norm zeroes: Gemma 3) does not reach the
            # objective: any scale is optimal, so it keeps its own
            weight = H_out[:, j, j, None]
            step = -torch.linalg.solve(G[:, j % chunk], r.unsqueeze(-1)).squeeze(-1) / weight.where(weight > 0, 1)
            step = step.where(weight > 0, 0)
            scale[:, j] += step
            dQH = (((step @ member.T) * W_int[:, j]).unsqueeze(1) @ H).squeeze(1)  # (batch, cols)
            V += H_out[:, :, j, None] * dQH[:, None, :]
    return scale


@dataclass
class _Order:
    """The order a solve processes W in, and the way back: columns by `columns` (act-order: decreasing diag(H_in),
    averaged over heads, so every head shares one column order), each head's rows by `rows` (row_order: decreasing
    diag(H_out); None without a row factor)."""

    columns: torch.Tensor
    rows: torch.Tensor | None

    @classmethod
    def choose(cls, H, H_out, act_order: bool, row_order: bool) -> "_Order":
        cols = H.shape[-1]
        if act_order:
            columns = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1).mean(0), descending=True, stable=True)
        else:
            columns = torch.arange(cols, device=H.device)
        rows = None
        if H_out is not None:
            heads, d = H_out.shape[:2]
            rows = (torch.argsort(torch.diagonal(H_out, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
                    if row_order else torch.arange(d, device=H.device).expand(heads, d))
        return cls(columns, rows)

    def square(self, M: torch.Tensor) -> torch.Tensor:
        """A (batch, cols, cols) matrix over the columns, in processing order (M itself when that is W's own order:
        at MLP width each copy is a Hessian's 0.8 GB)."""
        if self.columns_kept:
            return M
        return M[:, self.columns[:, None], self.columns]  # one gather: no Hessian-sized intermediate

    @property
    def columns_kept(self) -> bool:
        return bool((self.columns == torch.arange(len(self.columns), device=self.columns.device)).all())

    def square_rows(self, M: torch.Tensor) -> torch.Tensor:
        """A symmetric (heads, d, d) matrix over each head's rows, in processing order."""
        return _take_rows(_take_rows(M, self.rows).transpose(1, 2), self.rows)

    def weights(self, W: torch.Tensor) -> torch.Tensor:
        """W (heads, d, cols): columns in processing order (rows follow once the row factor is ordered)."""
        return W[..., self.columns]

    def original(self, x: torch.Tensor, columns: bool = True) -> torch.Tensor:
        """x (heads, d, cols or groups) back to W's row (and column) order."""
        if self.rows is not None:
            x = _take_rows(x, torch.argsort(self.rows, dim=-1))
        return x[..., torch.argsort(self.columns)] if columns else x


def _solve_rows(W, scale, zero, column_pass: _ColumnPass, step: int, H, U_out, per_channel_adaptive: bool,
                keep_state: bool, units: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row pass, in processing order: `step` rows of every head at a time run the column pass (W left holding
    their quantized values), then the later rows take the closed-form row update (U_out; None without a row
    factor, when step covers every row). Returns the codes and, with keep_state, each weight as it was rounded."""
    heads, d, cols = W.shape
    spec = column_pass.spec
    codes = torch.empty_like(W)
    compensated = torch.empty_like(W) if keep_state else None
    shared = H.shape[0] == 1
    for r1 in range(0, d, step):
        r2 = min(r1 + step, d)
        W_B = W[:, r1:r2]
        s_B, z_B = scale[:, r1:r2].contiguous(), zero[:, r1:r2].contiguous()
        u_B = None if units is None else units[:, r1:r2].contiguous()
        o_B = None if offset is None else offset[:, r1:r2].contiguous()
        if per_channel_adaptive:
            s_B, z_B, _ = find_grid(W_B, spec, H)
        Q_B = W_B.clone()
        if shared:  # one U for every head: run all heads' rows as one matrix
            flat = (1, heads * (r2 - r1))
            C_B = None if compensated is None else torch.empty_like(Q_B).reshape(*flat, cols)
            c = column_pass.run(Q_B.reshape(*flat, cols), s_B.reshape(*flat, -1), z_B.reshape(*flat, -1), C_B,
                                None if u_B is None else u_B.reshape(*flat, *u_B.shape[-2:]),
                                None if o_B is None else o_B.view(*flat, -1))
            codes[:, r1:r2] = c.reshape(heads, r2 - r1, cols)
            if compensated is not None:
                compensated[:, r1:r2] = C_B.reshape(heads, r2 - r1, cols)
        else:
            C_B = None if compensated is None else compensated[:, r1:r2]
            codes[:, r1:r2] = column_pass.run(Q_B, s_B, z_B, C_B, u_B, o_B)
        scale[:, r1:r2], zero[:, r1:r2] = s_B, z_B
        if offset is not None:
            offset[:, r1:r2] = o_B
        if r2 < d:
            W[:, r2:] += row_update(U_out, r1, r2, Q_B - W_B)
    return codes, compensated


def obs_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    H_out: torch.Tensor | None = None,
    heads: int = 1,
    D: torch.Tensor | None = None,
    dx_alpha: float = 1.0,
    rows_per_step: int = 1,
    block_size: int = 128,
    act_order: bool = False,
    row_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    damp_reference: str = "mean",
    refine_iters: int = 0,
    keep_state: bool = False,
) -> QuantizedWeight | tuple[QuantizedWeight, SolveState]:
    """Quantizes W (rows, cols) = `heads` stacked blocks of rows // heads rows. Returns codes and grids in W's order
    (and, with keep_state, the SolveState a learned rounding starts from).

    H: (cols, cols) shared input Hessian, or (heads, cols, cols) one per head. H_out: (heads, d, d) row factors, or
    None for none (GPTQ). D: the dX term 2E[(X_fp − X_q) X_qᵀ], shaped like H, weighted by dx_alpha. rows_per_step:
    N rows of a head quantized jointly. percdamp, damp_reference: H and H_out get percdamp times the mean (or median)
    of their diagonal added (boa.core.hessian.damp). act_order: columns by decreasing diag(H_in) (averaged over heads
    for per-head H_in, so that every head shares one column order). row_order: each head's rows by decreasing
    diag(H_out).
    """
    rows, cols = W.shape
    if H.dim() == 3:
        heads = H.shape[0]
    if H_out is not None:
        heads = H_out.shape[0]
    d = rows // heads
    W = W.detach().to(H.dtype).clone().reshape(heads, d, cols)
    H_original = H = remove_dead_inputs(H.reshape(-1, cols, cols), W)
    order = _Order.choose(H, H_out, act_order, row_order)

    H = order.square(H)
    U = inverse_cholesky_upper(H, percdamp, damp_reference)
    W = order.weights(W)
    if D is not None and dx_alpha > 0:  # the target T = W + α W D H⁻¹, H⁻¹ = Uᵀ U of the damped H
        WD = W @ order.square(D.reshape(-1, cols, cols).to(H.dtype))  # α on W D (weight-sized), not on a copy of D
        W = W + ((WD * dx_alpha) @ U.transpose(-1, -2)) @ U
        del WD
    if H_out is not None:
        H_out = order.square_rows(H_out).to(H.dtype)
        W = _take_rows(W, order.rows)
        U_out = inverse_cholesky_upper(H_out, percdamp, damp_reference)
        step = rows_per_step
    else:
        U_out, step = None, d  # no row coupling: all rows in one pass
    T = W.clone()

    width = spec.group_width(cols)
    n_groups = spec.n_groups(cols)
    kind = spec.gguf_type
    if kind is not None and act_order and not static_groups:
        raise BoaError(f"GGUF's {kind.name} blocks are runs of consecutive columns, which act-order's groups are "
                       "not; add --static-groups or drop --act-order")
    # group of the column processed j-th: fixed by its original index for static grids, by processing order else.
    group_of = (order.columns if static_groups else torch.arange(cols, device=W.device)) // width
    inverse = torch.argsort(order.columns)
    # GGUF K types: the super-blocks' d, from the target (original column order) before any update
    units = super_units(W[..., inverse], kind) if kind is not None and kind.super_blocks else None
    if static_groups:  # from the target in original column order
        scale, zero, offset = grids_by_group(W[..., inverse], spec, H[:, inverse][:, :, inverse], units)
    else:
        scale = torch.empty(heads, d, n_groups, dtype=W.dtype, device=W.device)
        zero = torch.empty_like(scale)
        offset = torch.zeros_like(scale) if kind is not None and kind.minimums else None
    per_channel_adaptive = not static_groups and spec.group_size == -1
    column_pass = _ColumnPass(spec, H, U, group_of, static_groups or per_channel_adaptive, block_size)

    codes, compensated = _solve_rows(W, scale, zero, column_pass, step, H, U_out, per_channel_adaptive, keep_state,
                                     units, offset)

    if refine_iters:  # Q = s·W_int − o: the offsets stay, so the scales fit T + o
        W_int = codes - zero[..., group_of]
        target = T if offset is None else T + offset[..., group_of]
        refined = refine_scales(W_int, scale, group_of, target, H, H_out, refine_iters)
        scale = refined if kind is None else representable_scales(kind, refined, zero, scale)

    g_idx = torch.empty_like(group_of)
    g_idx[order.columns] = group_of
    q = QuantizedWeight(
        order.original(codes).reshape(rows, cols).to(torch.uint8),
        order.original(scale, columns=False).reshape(rows, n_groups),
        order.original(zero, columns=False).reshape(rows, n_groups),
        g_idx.to(torch.int32),
        spec.bits,
        None if offset is None else order.original(offset, columns=False).reshape(rows, n_groups),
    )
    if not keep_state:
        return q
    return q, SolveState(order.original(compensated), order.original(T), H_original, heads)
