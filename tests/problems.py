"""Random problems shared by tests in several folders (tests/ is on sys.path through conftest.py): correlated
least-squares problems and SPD matrices for the solvers and kernels, and random codes and grids for the packed
layout and its kernels."""
import torch

from boa.core.quantizer import QuantizedWeight


def correlated_problem(rows, cols, n=4096, seed=0, dtype=torch.float64):
    """A weight W (rows, cols) and the input Hessian H = 2XᵀX/n of correlated inputs X (n, cols)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) / cols**0.5 + torch.eye(cols, dtype=dtype)
    X = torch.randn(n, cols, generator=g, dtype=dtype) @ mix
    H = 2 * X.T @ X / n
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    return W, H


def spd(n, seed, dtype=torch.float64):
    """A random symmetric positive definite n × n matrix."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 2 * n, generator=g, dtype=dtype)
    return A @ A.T / n + 0.1 * torch.eye(n, dtype=dtype)


def random_quantized(out: int, cols: int, bits: int, group_size: int, act_order: bool = False, seed: int = 0):
    """Codes and grids as boa's quantizers make them: groups of group_size columns (the last may be partial),
    under act-order scattered over the columns."""
    g = torch.Generator().manual_seed(seed)
    width = cols if group_size == -1 else group_size
    groups = -(-cols // width)
    g_idx = (torch.arange(cols) // width).int()
    if act_order:
        g_idx = g_idx[torch.randperm(cols, generator=g)]
    codes = torch.randint(0, 2**bits, (out, cols), dtype=torch.uint8, generator=g)
    scale = torch.rand(out, groups, generator=g) * 0.1 + 0.01
    zero = torch.randint(0, 2**bits, (out, groups), generator=g).float()
    return QuantizedWeight(codes, scale, zero, g_idx, bits)
