"""The solver's working memory: bounded by a small multiple of the layer's own weights and Hessian, whatever the
number of groups (issue 19: the scale refinement once took rows × cols × groups floats and was OOM-killed), and
holding few Hessian-sized matrices at once when the columns are many (a down_proj's 14336² Hessian is 0.8 GB)."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from boa.algorithms.solver import _gram_by_group, obs_solve
from boa.core.quantizer import QuantSpec


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage any op returns: every allocation of a CPU solve is some op's output."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


class LiveMemory(TorchDispatchMode):
    """The most bytes of storage made inside the mode alive at once: each op's new storages are counted until the
    last tensor on them dies (views and in-place results on storages from outside, like the caller's H, are not)."""

    def __init__(self):
        super().__init__()
        self.tensors: dict[int, list[int]] = {}  # storage address -> [tensors alive on it, bytes]
        self.live = self.peak = 0

    def _drop(self, ptr: int) -> None:
        entry = self.tensors[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.tensors[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outside = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.tensors:
                self.tensors[ptr][0] += 1
            elif ptr in outside:
                continue
            else:
                self.tensors[ptr] = [1, t.untyped_storage().nbytes()]
                self.live += self.tensors[ptr][1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._drop, ptr)
        return out


@pytest.mark.parametrize("act_order", [False, True])
def test_a_wide_solve_holds_at_most_two_hessians_of_its_own(act_order):
    """GPTQ with the dX term on a layer with 8× more columns than rows (a down_proj): beside the caller's H and D,
    the solve's own live memory stays under 2 Hessians (the damped copy and its factor) plus a few weights — and
    one more Hessian (H in processing order) under act-order. It once held a reordered H and D even without
    act-order, an identity matrix for the damping, and α·D."""
    rows, cols = 64, 512
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(2 * cols, cols, generator=gen)
    H = X.T @ X / X.shape[0]
    D = 0.1 * (torch.randn(2 * cols, cols, generator=gen).T @ X) / X.shape[0]
    with LiveMemory() as probe:
        obs_solve(W, H, QuantSpec(bits=4, group_size=128), D=D, dx_alpha=0.25, act_order=act_order)
    hessian, weights = H.numel() * 4, W.numel() * 4
    assert probe.peak <= (2 + act_order) * hessian + 6 * weights, (probe.peak / hessian, weights / hessian)


def test_gram_by_group_matches_the_explicit_sums():
    b, rows, cols = 2, 3, 10
    gen = torch.Generator().manual_seed(0)
    W_int = torch.randint(-4, 5, (b, rows, cols), generator=gen).double()
    A = torch.randn(b, cols, cols, generator=gen, dtype=torch.float64)
    H = A @ A.transpose(-1, -2)
    group_of = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0])  # scattered groups, as under act-order
    member = torch.nn.functional.one_hot(group_of, 3).double()
    G = _gram_by_group(W_int, H, member)
    for i in range(b):
        for j in range(rows):
            for g in range(3):
                for h in range(3):
                    expected = sum(W_int[i, j, c] * H[i, c, e] * W_int[i, j, e]
                                   for c in range(cols) for e in range(cols) if group_of[c] == g and group_of[e] == h)
                    # (the diagonal carries the solver's 1e-12 relative ridge)
                    assert float(G[i, j, g, h]) == pytest.approx(float(expected), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("with_h_out", [False, True])
def test_a_refined_solve_allocates_no_more_than_a_few_weights(with_h_out):
    heads, d, cols = 2, 32, 128
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(heads * d, cols, generator=gen)
    X = torch.randn(4 * cols, cols, generator=gen)
    H = X.T @ X / X.shape[0]
    H_out = None
    if with_h_out:
        B = torch.randn(heads, d, 2 * d, generator=gen)
        H_out = B @ B.transpose(-1, -2) / (2 * d)
    spec = QuantSpec(bits=3, group_size=4, grid="hessian")  # 32 groups: rows × cols × groups would be 32 weights
    with LargestAllocation() as probe:
        obs_solve(W, H, spec, H_out=H_out, heads=heads, rows_per_step=16, refine_iters=1)
    layer_bytes = (W.numel() + H.numel()) * 4
    assert probe.largest <= 2 * layer_bytes, (probe.largest, layer_bytes)
