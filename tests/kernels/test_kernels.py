"""boa_kernels against their torch references: the fused column compensation (C++ here, Triton under
TRITON_INTERPRET=1), the whole solver's codes with each backend, and the backend dispatch."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from boa_kernels import compensate_block_torch
from boa_kernels.dispatch import backend_for
from boa_kernels.loader import load_cpu
from boa.algorithms import obs_solve
from boa.core.quantizer import QuantSpec

from problems import correlated_problem, spd

needs_cpp = pytest.mark.skipif(load_cpu() is None, reason="the C++ extension did not build on this machine")


def block_problem(b, R, B, G, shared, dtype, seed=0):
    """A block of weights, a valid U1 (upper Cholesky factor of an SPD inverse) and grids that clip some weights."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(b, R, B, generator=g, dtype=dtype)
    U1 = torch.stack([torch.linalg.cholesky(torch.linalg.inv(spd(B, seed + i, dtype)), upper=True)
                      for i in range(1 if shared else b)])
    scale = 0.2 + torch.rand(b, R, G, generator=g, dtype=dtype) * 0.3
    zero = torch.randint(0, 8, (b, R, G), generator=g).to(dtype)
    group_of = torch.randint(0, G, (B,), generator=g)  # arbitrary, as under act-order with static groups
    return W1, U1, scale, zero, group_of


def run(fn, W1, U1, scale, zero, group_of, start, stop, maxq=7.0):
    W1 = W1.clone()
    E1 = torch.zeros_like(W1)
    codes = torch.full_like(W1, -1.0)
    fn(W1, E1, codes, U1, scale, zero, group_of, maxq, start, stop)
    return W1, E1, codes


def assert_bit_identical_to_torch(kernel, shape):
    """The kernel leaves W1, E1 and the codes exactly as the torch reference does, in fp64."""
    b, R, B, G, shared, start, stop = shape
    problem = block_problem(b, R, B, G, shared, torch.float64)
    expected = run(compensate_block_torch, *problem, start, stop)
    got = run(kernel, *problem, start, stop)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert (got[2][..., start:stop] >= 0).all()  # every code in the run was written


SHAPES = [  # (b, R, B, G, shared U, start, stop): heads × rows, odd widths, partial runs
    (1, 9, 128, 1, True, 0, 128),
    (9, 16, 64, 2, True, 0, 64),
    (3, 1, 80, 3, False, 0, 80),
    (4, 7, 37, 5, False, 5, 29),
    (2, 5, 128, 2, False, 64, 128),
]


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_compensation_bit_identical_in_fp64(shape):
    assert_bit_identical_to_torch(load_cpu().compensate_block_, shape)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_compensation_close_in_fp32(shape):
    b, R, B, G, shared, start, stop = shape
    problem = block_problem(b, R, B, G, shared, torch.float32)
    Wt, Et, Ct = run(compensate_block_torch, *problem, start, stop)
    Wc, Ec, Cc = run(load_cpu().compensate_block_, *problem, start, stop)
    assert (Ct != Cc).float().mean() < 1e-3  # a rounding tie may flip in another summation order
    torch.testing.assert_close(Wc, Wt, rtol=1e-4, atol=1e-4)


@needs_cpp
def test_cpp_rejects_bad_layouts():
    W1, U1, scale, zero, group_of = block_problem(2, 3, 8, 1, True, torch.float32)
    E1, codes = torch.zeros_like(W1), torch.zeros_like(W1)
    with pytest.raises(RuntimeError, match="group_of"):
        load_cpu().compensate_block_(W1, E1, codes, U1, scale, zero, group_of.int(), 7.0, 0, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        load_cpu().compensate_block_(W1, E1, codes, U1.double(), scale, zero, group_of, 7.0, 0, 8)
    with pytest.raises(RuntimeError, match="stop"):
        load_cpu().compensate_block_(W1, E1, codes, U1, scale, zero, group_of, 7.0, 0, 9)


SOLVES = {  # name: (rows, cols, heads, spec, solver options) — GPTQ, BoA, TurboBoA; groups, act-order, odd sizes
    "gptq-actorder-g16": (12, 40, 1, QuantSpec(3, group_size=16), dict(act_order=True, block_size=32)),
    "gptq-static-g8": (6, 30, 1, QuantSpec(4, group_size=8), dict(act_order=True, static_groups=True, block_size=16)),
    "boa-hd64-g8": (128, 20, 2, QuantSpec(3, group_size=8), dict(rows_per_step=1, block_size=16)),
    "boa-hd80": (160, 24, 2, QuantSpec(3), dict(rows_per_step=1, block_size=16)),
    "turboboa-hd128-actorder": (256, 36, 2, QuantSpec(3, grid="hessian"),
                                dict(rows_per_step=16, block_size=16, act_order=True, refine_iters=1)),
    "turboboa-g8-hessian": (48, 36, 3, QuantSpec(2, group_size=8, grid="hessian"),
                            dict(rows_per_step=4, block_size=16, row_order=True, refine_iters=1)),
}


def solve(name, dtype, per_head_H=False):
    rows, cols, heads, spec, options = SOLVES[name]
    W, H = correlated_problem(rows, cols, seed=3)
    W, H = W.to(dtype), H.to(dtype)
    if per_head_H:
        H = torch.stack([H + 0.1 * i * torch.eye(cols, dtype=dtype) for i in range(heads)])
    H_out = torch.stack([spd(rows // heads, 5 + h, dtype) for h in range(heads)]) if heads > 1 else None
    return W, H, spec, dict(options, H_out=H_out, heads=heads)


@needs_cpp
@pytest.mark.parametrize("name", SOLVES)
def test_solver_codes_identical_with_cpp_kernels(name, monkeypatch):
    W, H, spec, options = solve(name, torch.float64, per_head_H=name.startswith("turbo"))
    monkeypatch.setenv("BOA_KERNELS", "torch")
    expected = obs_solve(W, H, spec, **options)
    monkeypatch.setenv("BOA_KERNELS", "cpp")
    got = obs_solve(W, H, spec, **options)
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(got.scale, expected.scale) and torch.equal(got.zero, expected.zero)


@needs_cpp
@pytest.mark.parametrize("name", SOLVES)
def test_solver_loss_matches_in_fp32(name, monkeypatch):
    W, H, spec, options = solve(name, torch.float32)

    def loss(q):
        dW = (q.dequantize() - W).reshape(options["heads"], -1, W.shape[1])
        H_out = options["H_out"] if options["H_out"] is not None else torch.eye(dW.shape[1])[None]
        return float(torch.einsum("bij,bjk,bik->", dW, H, H_out @ dW) if H.dim() == 3 else
                     torch.einsum("bij,jk,blk,bil->", dW, H, dW, H_out))

    monkeypatch.setenv("BOA_KERNELS", "torch")
    expected = loss(obs_solve(W, H, spec, **options))
    monkeypatch.setenv("BOA_KERNELS", "cpp")
    got = loss(obs_solve(W, H, spec, **options))
    assert abs(got - expected) <= 1e-5 * abs(expected)


def test_dispatch_rejects_unknown_backend(monkeypatch):
    monkeypatch.setenv("BOA_KERNELS", "fortran")
    with pytest.raises(ValueError, match="BOA_KERNELS='fortran'.*torch"):
        backend_for("cpu")


def test_dispatch_falls_back_with_a_notice(monkeypatch, capsys):
    monkeypatch.setenv("BOA_KERNELS", "cuda")
    expected = "cpp" if load_cpu() is not None else "torch"
    assert backend_for("cpu") == expected
    assert "BOA_KERNELS=cuda cannot run here" in capsys.readouterr().err
    monkeypatch.setenv("BOA_KERNELS", "torch")
    assert backend_for("cpu") == "torch"
    monkeypatch.delenv("BOA_KERNELS")
    assert backend_for("cpu", implemented=()) == "torch"


def test_no_compiler_means_torch_with_a_notice(tmp_path):
    """A machine without a working C++ toolchain still quantizes: the build fails with a one-line notice."""
    code = (
        "import os, torch; from boa_kernels.dispatch import backend_for; print(backend_for('cpu'))"
    )
    env = dict(os.environ, CXX="/nonexistent/c++", BOA_CACHE=str(tmp_path), BOA_KERNELS="cpp", PATH="/usr/bin:/bin")
    env.pop("MAX_JOBS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    assert "could not build the C++ CPU kernels" in out.stderr


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU)",
)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_compensation_bit_identical_in_fp64_interpreted(shape):
    from boa_kernels.triton_compensate import compensate_block_triton

    assert_bit_identical_to_torch(compensate_block_triton, shape)


@needs_triton
def test_solver_codes_identical_with_triton_kernel(monkeypatch):
    W, H, spec, options = solve("turboboa-g8-hessian", torch.float64, per_head_H=True)
    monkeypatch.setenv("BOA_KERNELS", "torch")
    expected = obs_solve(W, H, spec, **options)
    monkeypatch.setenv("BOA_KERNELS", "triton")
    got = obs_solve(W, H, spec, **options)
    assert torch.equal(got.codes, expected.codes)
