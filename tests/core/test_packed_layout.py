"""boa's packed layout (boa/core/packed.py) and the C++ packed matmul (csrc/cpu/packed_matmul.cpp): packing is
exact and puts every bit where the layout says; the kernel — on this CPU's instruction set and compiled for AVX2
and for portable C++ — equals the torch reference (dequantize, then matmul) over bits, group sizes, act-order,
ragged widths, batch sizes, bias and x dtypes; QuantLinear stays packed."""
import pytest
import torch

from boa.core.errors import BoaError
from boa.core.packed import PLANES, pack, pack_codes, unpack_codes
from boa.nn import QuantLinear, pack_model
from boa.core.quantizer import QuantizedWeight
from boa_kernels.loader import load_cpu, load_cpu_for
from boa_kernels.packed_matmul import packed_matmul, packed_matmul_torch

BITS = tuple(PLANES)


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


def test_layout_puts_each_code_where_the_docstring_says():
    """One tile per width, read back by the layout's own words (independently of unpack_codes)."""
    codes = torch.randint(0, 256, (1, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for bits in BITS:
        c = (codes & (2**bits - 1))[0].tolist()
        t = pack_codes(codes & (2**bits - 1), bits)[0].tolist()
        assert len(t) == 8 * bits
        for i in range(64):
            if bits == 8:
                got = t[i]
            elif bits == 4:
                got = (t[i % 32] >> (4 * (i // 32))) & 15
            elif bits == 2:
                got = (t[i % 16] >> (2 * (i // 16))) & 3
            else:  # 2-bit plane (16 bytes), then the 1-bit plane: bit i of the little-endian 64-bit word
                word = int.from_bytes(bytes(t[16:24]), "little")
                got = ((t[i % 16] >> (2 * (i // 16))) & 3) | (((word >> i) & 1) << 2)
            assert got == c[i], (bits, i)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_is_exact(bits):
    q = random_quantized(37, 300, bits, 32, act_order=True)
    packed = pack(q)
    assert packed.qweight.dtype == torch.uint8 and packed.qweight.shape == (37, 320 * bits // 8)
    assert packed.perm is not None and packed.perm.dtype == torch.int32
    back = packed.to_quantized()
    for field in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(q, field)), field
    assert torch.equal(packed.dequantize(), q.dequantize())
    assert torch.equal(unpack_codes(packed.qweight, bits), packed.codes())
    assert torch.equal(load_cpu().unpack_codes(packed.qweight, bits), packed.codes())  # boa/packed_math.h


def test_pack_without_act_order_keeps_column_order():
    packed = pack(random_quantized(8, 192, 4, 64))
    assert packed.perm is None and packed.group_size == 64 and packed.scales.shape == (8, 3)
    per_channel = pack(random_quantized(8, 100, 3, -1))
    assert per_channel.perm is None and per_channel.group_size == 100 and per_channel.scales.shape == (8, 1)


def test_pack_refuses_what_it_cannot_hold():
    five_bit = random_quantized(4, 64, 4, 16)
    five_bit.bits = 5
    with pytest.raises(BoaError, match="5-bit"):
        pack(five_bit)
    uneven = torch.tensor([0] * 10 + [1] * 20 + [2] * 2, dtype=torch.int32)
    with pytest.raises(BoaError, match="groups of sizes"):
        pack(QuantizedWeight(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 3), torch.zeros(2, 3), uneven, 4))


CASES = [  # (out, in, group_size, act_order)
    (40, 256, 128, False),
    (33, 576, 128, False),    # SmolLM2's width: a partial last group
    (24, 100, 32, True),      # ragged width, act-order permutation
    (17, 64, -1, False),      # per-channel
    (16, 200, -1, True),      # per-channel, ragged, act-order (a single group: no permutation needed)
    (9, 48, 16, False),       # groups of 16: the float-lane path everywhere
]


def check_against_reference(kernel, bits, case, batch, dtype):
    out, cols, group_size, act_order = case
    packed = pack(random_quantized(out, cols, bits, group_size, act_order, seed=bits + batch))
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, cols, generator=g).to(dtype)
    bias = torch.randn(out, generator=g).to(dtype)
    y = kernel(x, packed.qweight, packed.scales, packed.zeros, packed.perm, bias, bits, packed.group_size)
    ref = packed_matmul_torch(x, packed, bias)
    assert y.dtype == dtype and y.shape == (batch, out)
    # float32 x: the products keep ~16 bits of x (two bf16 parts) or all of it (float lanes), summed in float32 in
    # another order than BLAS; bfloat16 x: the same products, then one rounding of y to bfloat16.
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    scale = ref.float().abs().max()
    assert (y.float() - ref.float()).abs().max() <= tol * scale, (bits, case, batch, dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_kernel_matches_reference(bits, dtype):
    """GEMV (batch 1–8, every batch size has its own instantiation) and the BLAS path (batch > 8)."""
    for case in CASES:
        for batch in (1, 2, 3, 4, 5, 6, 7, 8, 9, 33):
            check_against_reference(load_cpu().packed_matmul, bits, case, batch, dtype)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "portable"])
def test_kernel_paths_for_other_instruction_sets(march):
    """The same source compiled for AVX2 and for plain x86-64 (the portable C++ of boa/packed_math.h)."""
    module = load_cpu_for(march)
    if module is None:
        pytest.skip(f"cannot build for -march={march} here")
    assert module.packed_isa() == {"x86-64-v3": "avx2", "x86-64": "portable"}[march]
    for bits in BITS:
        for case in CASES:
            for batch in (1, 3, 9):
                check_against_reference(module.packed_matmul, bits, case, batch, torch.float32)


def test_cpp_kernel_rejects_bad_arguments():
    packed = pack(random_quantized(8, 128, 4, 32))
    op = load_cpu().packed_matmul
    with pytest.raises(RuntimeError, match="packed columns"):
        op(torch.randn(1, 64), packed.qweight, packed.scales, packed.zeros, None, None, 4, 32)
    with pytest.raises(RuntimeError, match="scales"):
        op(torch.randn(1, 128), packed.qweight, packed.scales.double(), packed.zeros, None, None, 4, 32)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(torch.randn(1, 128), packed.qweight, packed.scales, packed.zeros, None, None, 4, 24)


def test_quant_linear_stays_packed_and_matches_the_fake_quantized_linear(tiny_llama, calib, heldout):
    """pack_model swaps nn.Linear for QuantLinear: its buffers are the packed bytes (bits/8 bytes a weight plus the
    grids), nothing unpacked appears after forwards or a cast to bfloat16, and logits match the fake-quant model."""
    import boa

    result = boa.quantize(tiny_llama, boa.QuantConfig(method="rtn", bits=4, group_size=32), None, progress=False)
    with torch.no_grad():
        expected = result.model(heldout).logits
    layers = dict(result.layers)
    model = pack_model(result.model, layers)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(modules) == set(layers)
    with torch.no_grad():
        torch.testing.assert_close(model(heldout).logits, expected, rtol=1e-4, atol=1e-4)
        model.to(torch.bfloat16)(heldout)
    for name, m in modules.items():
        q = layers[name]
        state = {k: v for k, v in m.state_dict().items() if k != "bias"}
        assert set(state) == {"qweight", "scales", "zeros"}
        assert m.qweight.numel() == q.codes.shape[0] * (-(-q.codes.shape[1] // 64) * 64) // 2
        assert m.scales.dtype == torch.float32  # survived .to(bfloat16)
        assert not hasattr(m, "weight")


def test_groups_the_kernels_cannot_take_run_on_torch():
    packed = pack(random_quantized(8, 96, 4, 24))
    x = torch.randn(2, 96)
    assert torch.equal(packed_matmul(x, packed), packed_matmul_torch(x, packed))
