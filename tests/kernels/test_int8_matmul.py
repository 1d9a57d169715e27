"""The int8 matmul (packed low-bit weights × activations quantized per token, boa_kernels/int8_matmul.py): the
reference's activation codes are boa.transforms.quantize_per_token's bit for bit, its integer sums those of a loop
over input columns of the unpacked weight, and its output the fake-quantized layer's; the C++ kernel (this CPU's
instruction set, and compiled for AVX-VNNI, AVX2 and portable C++) and the Triton kernel (interpreted here) give
the reference's per-group integers exactly and its float output to 1e-5, over weight and activation bits, groups,
act-order, bias, ragged widths and batches; dispatch and argument checks."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from boa.core.packed import pack
from boa_kernels.packed_matmul import KERNEL_BITS
from boa.core.quantizer import QuantizedWeight
from boa.transforms import quantize_per_token
from boa_kernels.int8_matmul import group_sums_torch, int8_matmul, int8_matmul_torch, per_token_codes
from boa_kernels.loader import load_cpu, load_cpu_for

from problems import random_quantized

needs_cpp = pytest.mark.skipif(load_cpu() is None, reason="the C++ extension did not build on this machine")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU)",
)

CLIP = 0.9
CASES = [  # (out, in, group_size, act_order): no width a multiple of a panel (16 rows) or a tile (64 columns)
    (37, 200, 40, False),     # groups of 40: a group ends inside a 64-column register
    (37, 200, 40, True),      # act-order: groups scattered, perm set
    (37, 200, -1, False),     # per-channel
    (21, 100, 32, True),
    (37, 4096, 128, False),   # Llama-3-8B's width and group
    (33, 576, 128, True),     # SmolLM2's width: a partial last group
]
BATCHES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 70)  # every register tile size, several tiles, a prefill


def tokens(batch, cols, seed, dtype=torch.float32):
    """Rows of different magnitudes (so each token has its own scale), with a few outlier columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cols, generator=g) * (0.1 + 10 * torch.rand(batch, 1, generator=g))
    x[:, torch.randint(0, cols, (3,), generator=g)] *= 20
    return x.to(dtype)


def weight(case, bits, seed=0):
    out, cols, group_size, act_order = case
    return pack(random_quantized(out, cols, bits, group_size, act_order, seed=seed))


def call(op, x, w, bias, a_bits, clip=CLIP):
    return op(x, w.qweight, w.scales, w.zeros, w.perm, bias, w.bits, w.group_size, a_bits, clip)


def assert_close(y, ref):
    """Each group's integer sum is exact in both; the float sum over groups rounds in another order (the kernel
    multiplies each group's scale in with a fused multiply-add)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def unit_scale_weight(case, bits, seed=0):
    """A packed weight whose scales are all 1: y / s_a is then the sum over groups of the exact integers."""
    out, cols, group_size, act_order = case
    q = random_quantized(out, cols, bits, group_size, act_order, seed=seed)
    return pack(QuantizedWeight(q.codes, torch.ones_like(q.scale), q.zero, q.g_idx, bits))


def assert_integer_sums_exact(op, case, bits, a_bits, batch):
    """With unit weight scales every partial sum is an integer below 2²⁴, exact in float32 too, so y must be
    s_a · float(Σ_g Σ_{c∈g} (q − z)·a) bit for bit: an integer sum off by one would move y by s_a."""
    w = unit_scale_weight(case, bits, seed=bits)
    x = tokens(batch, case[1], seed=a_bits)
    sums, scale = group_sums_torch(x, w, a_bits, CLIP)
    assert sums.abs().sum(-1).max() < 2**24
    y = call(op, x, w, None, a_bits)
    assert torch.equal(y, sums.sum(-1).float() * scale), (case, bits, a_bits, batch)


# --- the reference ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_codes_are_per_token_round_to_nearest(a_bits, clip, dtype):
    """Against one row at a time in float64 (the fake-quantized activations boa.transforms computes are these codes
    times these scales: quantize_per_token is built on per_token_codes)."""
    x = tokens(64, 300, seed=a_bits).to(dtype)
    x[3] = 0  # an all-zero token: the scale's floor
    codes, scale = per_token_codes(x, a_bits, clip)
    maxq = 2 ** (a_bits - 1) - 1
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    for row, got_codes, got_scale in zip(x.double(), codes, scale):
        step = max(float(torch.tensor(clip * row.abs().max().item() / maxq, dtype=torch.float32)),
                   torch.finfo(torch.float32).tiny)
        assert got_scale.item() == pytest.approx(step, rel=1e-6)
        want = torch.clamp(torch.round(row / got_scale.double()), -maxq - 1, maxq)
        # ties may round either way between the float32 division and the float64 one
        assert (got_codes.double() - want).abs().max() <= 1 and (got_codes.double() == want).float().mean() > 0.99
    assert torch.equal((codes.float() * scale).to(dtype), quantize_per_token(x, a_bits, clip))


@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reference_sums_are_a_loop_over_input_columns(case, bits):
    """Independent of the packing: the QuantizedWeight's codes in input column order, its g_idx, and the codes of
    quantize_per_token, summed column by column."""
    out, cols, group_size, act_order = case
    q = random_quantized(out, cols, bits, group_size, act_order, seed=1)
    x = tokens(5, cols, seed=2)
    sums, scale = group_sums_torch(x, pack(q), 8, CLIP)
    a = torch.round(quantize_per_token(x, 8, CLIP) / scale).long()
    expected = torch.zeros_like(sums)
    for c in range(cols):
        g = int(q.g_idx[c])
        expected[:, :, g] += a[:, c, None] * (q.codes[:, c].long() - q.zero[:, g].long())
    assert torch.equal(sums, expected)


@pytest.mark.parametrize("a_bits", [4, 8])
def test_reference_is_the_fake_quantized_layer(a_bits):
    """y = quantize_per_token(x) · Wᵀ + bias with W dequantized, up to float32 rounding."""
    w = weight(CASES[1], 4)
    x = tokens(9, 200, seed=0)
    bias = torch.randn(37)
    expected = F.linear(quantize_per_token(x, a_bits, CLIP), w.dequantize(torch.float32), bias)
    assert_close(int8_matmul_torch(x, w, bias, a_bits=a_bits, clip_ratio=CLIP), expected)


# --- the C++ kernel ---------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("bits", KERNEL_BITS)
@pytest.mark.parametrize("a_bits", [4, 8])
def test_cpp_kernel_matches_reference(bits, a_bits):
    op = load_cpu().int8_matmul
    for case in CASES:
        w = weight(case, bits, seed=bits)
        bias = torch.randn(case[0])
        for batch in BATCHES:
            x = tokens(batch, case[1], seed=batch)
            with_bias = bias if batch % 2 else None
            assert_close(call(op, x, w, with_bias, a_bits),
                         int8_matmul_torch(x, w, with_bias, a_bits=a_bits, clip_ratio=CLIP))


@needs_cpp
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=["groups-40", "per-channel", "groups-128"])
@pytest.mark.parametrize("bits, a_bits", [(8, 8), (4, 8), (4, 4), (3, 8)])
def test_cpp_integer_sums_are_exact(case, bits, a_bits):
    for batch in (1, 8, 16, 70):
        assert_integer_sums_exact(load_cpu().int8_matmul, case, bits, a_bits, batch)


AMX_CASES = [  # prefill shapes around the AMX tiles (32 tokens × 2 panels of 16 rows, steps of 64 or 32 columns)
    (50, 256, 64, False),     # 3 panels and a partial one: a task ending in a single panel
    (37, 200, 32, True),      # steps of 32 columns, act-order, a partial last group
    (33, 576, 128, False),    # a partial last group and padding columns
    (20, 300, -1, False),     # per-channel: one group of in_pad columns
]


@needs_cpp
@pytest.mark.parametrize("bits", KERNEL_BITS)
@pytest.mark.parametrize("a_bits", [4, 8])
def test_cpp_prefill_shapes(bits, a_bits):
    """Batches around the token blocks (16, 17, 31, 32, 33) and a whole prefill (512): on a CPU with AMX these take
    the tiles (signed q − z codes below 8 bits, the zero term in the epilogue at 8), elsewhere vpdpbusd."""
    op = load_cpu().int8_matmul
    for case in AMX_CASES:
        w = weight(case, bits, seed=bits)
        bias = torch.randn(case[0])
        for batch in (16, 17, 31, 32, 33, 512):
            x = tokens(batch, case[1], seed=batch)
            with_bias = bias if batch % 2 else None
            assert_close(call(op, x, w, with_bias, a_bits),
                         int8_matmul_torch(x, w, with_bias, a_bits=a_bits, clip_ratio=CLIP))
    assert_integer_sums_exact(op, AMX_CASES[0], bits, a_bits, 48)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpp_kernel_keeps_x_dtype(dtype):
    """The same codes from 16-bit x; y differs from the reference by its own dtype's rounding at most."""
    w = weight(CASES[1], 4)
    x, bias = tokens(5, 200, seed=0, dtype=dtype), torch.randn(37).to(dtype)
    y = call(load_cpu().int8_matmul, x, w, bias, 8)
    ref = int8_matmul_torch(x, w, bias, a_bits=8, clip_ratio=CLIP)
    assert y.dtype == dtype
    eps = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=eps * ref.float().abs().max().item())


def has_cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@needs_cpp
@pytest.mark.parametrize("march, isa", [("x86-64-v3", "avx2"), ("x86-64", "portable"), ("alderlake", "avx-vnni"),
                                        ("icelake-server", "avx512-vnni")],
                         ids=["avx2", "portable", "avx-vnni", "avx512-vnni"])
def test_kernel_paths_for_other_instruction_sets(march, isa):
    """The same source compiled for AVX2 (16-bit multiplies), plain x86-64 (portable C++), AVX-VNNI and AVX-512 VNNI
    without AMX (where this CPU has AMX, the native build runs prefills on it: this keeps vpdpbusd's prefill tested)."""
    if isa == "avx-vnni" and not has_cpu_flag("avx_vnni"):
        pytest.skip("this CPU has no AVX-VNNI")
    if isa == "avx512-vnni" and not has_cpu_flag("avx512_vnni"):
        pytest.skip("this CPU has no AVX-512 VNNI")
    module = load_cpu_for(march)
    if module is None:
        pytest.skip(f"cannot build for -march={march} here")
    assert module.int8_isa() == isa
    for bits in KERNEL_BITS:
        for a_bits in (4, 8):
            for case in (CASES[1], CASES[2], CASES[5]):
                w = weight(case, bits, seed=bits)
                for batch in (1, 5, 70):
                    x = tokens(batch, case[1], seed=batch)
                    assert_close(call(module.int8_matmul, x, w, None, a_bits),
                                 int8_matmul_torch(x, w, a_bits=a_bits, clip_ratio=CLIP))
    for bits, a_bits in ((8, 8), (4, 4)):
        assert_integer_sums_exact(module.int8_matmul, CASES[0], bits, a_bits, 9)
        assert_integer_sums_exact(module.int8_matmul, AMX_CASES[0], bits, a_bits, 40)


@needs_cpp
def test_cpp_kernel_rejects_bad_arguments():
    w = weight(CASES[0], 4)
    op = load_cpu().int8_matmul
    x = torch.randn(2, 200)
    with pytest.raises(RuntimeError, match="4 or 8 bits"):
        call(op, x, w, None, 6)
    with pytest.raises(RuntimeError, match="clip_ratio"):
        call(op, x, w, None, 8, clip=0.0)
    with pytest.raises(RuntimeError, match="packed columns"):
        call(op, x[:, :64], w, None, 8)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        op(x, w.qweight, w.scales, w.zeros, None, None, 4, 42, 8, CLIP)
    wide = pack(random_quantized(1, 65600, 8, -1))
    with pytest.raises(RuntimeError, match="overflow"):
        call(op, torch.randn(1, 65600), wide, None, 8)


# --- the Triton kernel, interpreted -----------------------------------------------------------------------------

TRITON_CASES = [(20, 100, 32, True), (20, 100, -1, False)]  # groups must be a multiple of 32 there


@needs_triton
@pytest.mark.parametrize("bits, a_bits", [(8, 8), (4, 8), (4, 4), (2, 8), (3, 4)])
def test_triton_matches_reference(bits, a_bits):
    from boa_kernels.triton_int8_gemm import int8_gemm_triton

    for case in TRITON_CASES:
        w = weight(case, bits, seed=bits)
        bias = torch.randn(case[0])
        for batch in (1, 17):
            x = tokens(batch, case[1], seed=batch)
            assert_close(call(int8_gemm_triton, x, w, bias, a_bits),
                         int8_matmul_torch(x, w, bias, a_bits=a_bits, clip_ratio=CLIP))


@needs_triton
@pytest.mark.parametrize("bits, a_bits", [(8, 8), (4, 4)])
def test_triton_integer_sums_are_exact(bits, a_bits):
    from boa_kernels.triton_int8_gemm import int8_gemm_triton

    for case in TRITON_CASES:
        assert_integer_sums_exact(int8_gemm_triton, case, bits, a_bits, 3)


@needs_triton
def test_triton_rejects_groups_it_cannot_take():
    from boa_kernels.triton_int8_gemm import int8_gemm_triton

    w = weight((20, 100, 16, False), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        call(int8_gemm_triton, torch.randn(1, 100), w, None, 8)


# --- dispatch ---------------------------------------------------------------------------------------------------

@needs_cpp
def test_dispatch_keeps_leading_axes_and_falls_back_to_torch(monkeypatch):
    w = weight(CASES[1], 4)
    x = tokens(6, 200, seed=0).reshape(2, 3, 200)
    y = int8_matmul(x, w, a_bits=8, clip_ratio=CLIP)
    assert y.shape == (2, 3, 37)
    assert torch.equal(y.reshape(6, 37), call(load_cpu().int8_matmul, x.reshape(6, 200), w, None, 8))
    # groups of 50 columns (not a multiple of 4), and one of 65600 (int32 sums could overflow): the reference runs
    for w2 in (pack(random_quantized(8, 100, 4, 50)), pack(random_quantized(1, 65600, 8, -1))):
        x2 = tokens(3, w2.in_features, seed=1)
        assert torch.equal(int8_matmul(x2, w2, a_bits=4, clip_ratio=CLIP),
                           int8_matmul_torch(x2, w2, a_bits=4, clip_ratio=CLIP))
    monkeypatch.setenv("BOA_KERNELS", "torch")
    assert torch.equal(int8_matmul(x, w, a_bits=8, clip_ratio=CLIP),
                       int8_matmul_torch(x, w, a_bits=8, clip_ratio=CLIP))
    with pytest.raises(ValueError, match="bits"):
        int8_matmul(x, w, a_bits=2, clip_ratio=CLIP)
