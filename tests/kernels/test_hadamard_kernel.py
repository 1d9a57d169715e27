"""The online Hadamard rotation (boa_kernels/hadamard.py): the torch reference is boa.transforms.hadamard's
Rotation.apply to fp32 rounding (its transform is products with Sylvester factors, the reference's butterflies);
the C++ kernel and the Triton kernel (interpreted here) give the reference's butterflies bit for bit (y itself where
the core is 1 × 1) and y to fp32 rounding, for the orders of real models — 64, 576 = 36·16, 1536 = 12·128 with
Paley cores, 688 = 43·16 with a random orthogonal core — with and without random signs, in float32, bfloat16 and
float16."""
import importlib.util
import os

import pytest
import torch

from boa.transforms.hadamard import Rotation
from boa_kernels.hadamard import hadamard_transform, hadamard_transform_torch, walsh_hadamard_torch
from boa_kernels.loader import load_cpu

needs_cpp = pytest.mark.skipif(load_cpu() is None, reason="the C++ extension did not build on this machine")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU)",
)

ORDERS = (64, 576, 1536, 688)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rows(count, n, seed=0):
    return torch.randn(count, n, generator=torch.Generator().manual_seed(seed))


def cpp(x, rotation):
    signs = None if rotation.signs is None else rotation.signs.float()
    return load_cpu().hadamard_transform(x, signs, rotation.core.float(), 1 / rotation.n**0.5)


def triton(x, rotation):
    from boa_kernels.triton_hadamard import hadamard_triton

    signs = None if rotation.signs is None else rotation.signs.float()
    return hadamard_triton(x, signs, rotation.core.float(), 1 / rotation.n**0.5)


def assert_close_to_reference(y, ref, x, m: int) -> bool:
    """y to the reference: to one rounding of x's dtype for 16-bit x, bit for bit for a 1 × 1 core, else to fp32
    rounding. True where the butterflies are left to check bit for bit with K = I (float32, m > 1)."""
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.dtype != torch.float32:
        eps = 2**-7 if x.dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=eps * ref.float().abs().max().item())
        return False
    if m == 1:
        assert torch.equal(y, ref)
        return False
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    return True


def assert_matches_reference(kernel, n, seed, dtype):
    """float32: the m blocks' butterflies bit for bit (checked with K = I, where y is z · scale), y to fp32
    rounding (the core's sum runs in another order than the reference's einsum; exact for a 1 × 1 core); 16-bit x:
    y within one rounding of its dtype of the reference's."""
    rotation = Rotation.build(n, seed)
    x = rows(5, n, seed=n).to(dtype)
    m = rotation.core.shape[0]
    y, ref = kernel(x, rotation), hadamard_transform_torch(x, rotation.core, rotation.signs)
    if assert_close_to_reference(y, ref, x, m):
        plain = Rotation(n, torch.eye(m, dtype=torch.float64), rotation.power, rotation.signs, False)
        assert torch.equal(kernel(x, plain), hadamard_transform_torch(x, plain.core, plain.signs))


@pytest.mark.parametrize("n", ORDERS)
@pytest.mark.parametrize("seed", [None, 7], ids=["plain", "signs"])
def test_reference_is_rotation_apply(n, seed):
    rotation = Rotation.build(n, seed)
    assert rotation.exact_hadamard == (n != 688)
    x = rows(6, n)
    ref = rotation.apply(x)
    torch.testing.assert_close(hadamard_transform_torch(x, rotation.core, rotation.signs), ref, rtol=1e-5,
                               atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(hadamard_transform_torch(x, rotation.core, rotation.signs).double(),
                               x.double() @ rotation.matrix(), rtol=1e-5, atol=1e-5)


def test_reference_butterflies_are_sylvester():
    from boa.transforms.hadamard import sylvester

    x = rows(3, 256).double()
    assert torch.equal(walsh_hadamard_torch(x), x @ sylvester(256))


@needs_cpp
@pytest.mark.parametrize("n", ORDERS)
@pytest.mark.parametrize("seed", [None, 7], ids=["plain", "signs"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpp_matches_reference(n, seed, dtype):
    assert_matches_reference(cpp, n, seed, dtype)


@needs_cpp
def test_dispatch_keeps_shape_and_checks_orders():
    rotation = Rotation.build(576, seed=1)
    x = rows(6, 576).reshape(2, 3, 576)
    y = hadamard_transform(x, rotation.core, rotation.signs)
    assert y.shape == x.shape
    assert torch.equal(y.reshape(6, 576), cpp(x.reshape(6, 576), rotation))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(rows(2, 60), rotation.core)
    with pytest.raises(RuntimeError, match="power of two"):
        load_cpu().hadamard_transform(rows(2, 60), None, torch.eye(5), 1.0)


@needs_triton
@pytest.mark.parametrize("n", [64, 576, 688])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(n, dtype):
    assert_matches_reference(triton, n, 3, dtype)


def orthogonal_core(m, seed):
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * m**0.5).float()


@needs_cpp
@pytest.mark.parametrize("m, p", [(3, 8), (5, 32), (28, 512), (7, 16), (1, 1024)],
                         ids=["p8", "p32", "28x512", "p16", "m1"])
@pytest.mark.parametrize("batch", [1, 9, 33])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpp_blocks_and_batches(m, p, batch, dtype):
    """Block lengths below, at and above a register of 16 floats (in-register passes, whole-register passes, the
    portable loops for p < 16), cores of every size modulo the 8 outputs mixed at a time, any row count: the
    butterflies bit for bit (K = I), y to fp32 rounding in float32 and to one rounding of x's dtype otherwise."""
    n = m * p
    core = orthogonal_core(m, seed=m) if m > 1 else torch.ones(1, 1)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    x = rows(batch, n, seed=batch).to(dtype)
    y = load_cpu().hadamard_transform(x, signs, core, 1 / n**0.5)
    if not assert_close_to_reference(y, hadamard_transform_torch(x, core, signs), x, m):
        return
    eye = torch.eye(m)
    assert torch.equal(load_cpu().hadamard_transform(x, signs, eye, 1 / n**0.5),
                       hadamard_transform_torch(x, eye, signs))
