"""boa's packed layout (boa/core/packed.py): packing is exact, puts every bit where the layout says (and where the C++
kernels read it), and refuses what it cannot hold. The kernels on it: tests/kernels/test_packed_cpu_kernels.py."""
import pytest
import torch

from boa.core.errors import BoaError
from boa.core.packed import PLANES, PackedWeight, pack, pack_codes, unpack_codes
from boa.core.quantizer import QuantizedWeight
from boa_kernels.loader import load_cpu
from boa_kernels.packed_matmul import KERNEL_BITS

from problems import random_quantized

BITS = tuple(PLANES)


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
            elif bits == 3:  # 2-bit plane (16 bytes), then the 1-bit plane: bit i of the little-endian 64-bit word
                word = int.from_bytes(bytes(t[16:24]), "little")
                got = ((t[i % 16] >> (2 * (i // 16))) & 3) | (((word >> i) & 1) << 2)
            elif bits == 5:  # 4-bit plane (32 bytes), then the 1-bit plane
                word = int.from_bytes(bytes(t[32:40]), "little")
                got = ((t[i % 32] >> (4 * (i // 32))) & 15) | (((word >> i) & 1) << 4)
            else:  # 6: 4-bit plane, then a 2-bit plane (16 bytes)
                got = ((t[i % 32] >> (4 * (i // 32))) & 15) | (((t[32 + i % 16] >> (2 * (i // 16))) & 3) << 4)
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
    if bits in KERNEL_BITS:
        assert torch.equal(load_cpu().unpack_codes(packed.qweight, bits), packed.codes())  # boa/packed_math.h


def test_pack_without_act_order_keeps_column_order():
    packed = pack(random_quantized(8, 192, 4, 64))
    assert packed.perm is None and packed.group_size == 64 and packed.scales.shape == (8, 3)
    per_channel = pack(random_quantized(8, 100, 3, -1))
    assert per_channel.perm is None and per_channel.group_size == 100 and per_channel.scales.shape == (8, 1)


def test_pack_refuses_what_it_cannot_hold():
    seven_bit = random_quantized(4, 64, 4, 16)
    seven_bit.bits = 7
    with pytest.raises(BoaError, match="7-bit"):
        pack(seven_bit)
    uneven = torch.tensor([0] * 10 + [1] * 20 + [2] * 2, dtype=torch.int32)
    with pytest.raises(BoaError, match="groups of sizes"):
        pack(QuantizedWeight(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 3), torch.zeros(2, 3), uneven, 4))


def test_zero_points_off_the_code_range_are_refused():
    """A zero point of maxq + 1 (which the clip search once produced for all-negative rows) made the C++ GEMV
    compute wrong outputs; pack refuses it rather than store it."""
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    q = QuantizedWeight(codes, torch.ones(4, 1), torch.full((4, 1), 16.0), torch.zeros(64, dtype=torch.int32), 4)
    with pytest.raises(BoaError, match=r"zero points span \[16.0, 16.0\], outside the 4-bit codes \[0, 15\]"):
        pack(q)


def test_block_minimums_pack_as_float_offsets_and_run_dequantized():
    """GGUF's Q4_K grids (w = s·c − o): the offsets are packed beside the grids, come back exactly, are checked on
    load, and such a layer runs on torch's dequantize-then-matmul (the kernels read integer zero points only)."""
    from boa.algorithms.rtn import rtn
    from boa.core.quantizer import QuantSpec
    from boa_kernels.packed_matmul import kernel_ready, packed_matmul

    W = torch.randn(24, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    q = rtn(W, QuantSpec(bits=4, group_size=32, gguf="Q4_K"))
    packed = pack(q)
    assert packed.offsets.dtype == torch.float32 and "offsets" in packed.tensors()
    back = packed.to_quantized()
    assert torch.equal(back.offset, q.offset) and torch.equal(back.dequantize(), q.dequantize())
    packed.check("layer", 24, 512)
    assert not kernel_ready(packed)
    x = torch.randn(3, 512)
    assert torch.equal(packed_matmul(x, packed), x @ q.dequantize().T)
    packed.offsets = packed.offsets[:, :-1]
    with pytest.raises(BoaError, match="offsets is \\(24, 15\\)"):
        packed.check("layer", 24, 512)
    packed.offsets = torch.full((24, 16), float("nan"))
    with pytest.raises(BoaError, match="offsets hold NaN"):
        packed.check("layer", 24, 512)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [-1, 32])
def test_stored_form_is_exact_and_as_small_as_its_values_allow(bits, group):
    """On disk the grids take 16 bits where that is exact and the zero points b bits: the layer comes back bit for
    bit, and its bytes are codes + 2 bytes a scale + b bits a zero point (padded to a tile of 64) — counted here from
    the shapes, not from the code under test."""
    q = random_quantized(37, 300, bits, group, act_order=group != -1)
    q.scale = q.scale.to(torch.bfloat16).float()  # a bfloat16 model's grids (the pipeline casts them so)
    packed = pack(q)
    stored = packed.stored()
    assert stored["scales"].dtype == torch.float16 and stored["zeros"].dim() == 1  # (bfloat16 values of these
    # magnitudes are float16 values too)
    groups = packed.scales.shape[1]
    expected = 37 * 320 * bits // 8 + 37 * groups * 2 + -(-37 * groups // 64) * 64 * bits // 8 + 4 * 300 * (
        packed.perm is not None)
    assert packed.stored_nbytes() == expected == sum(t.numel() * t.element_size() for t in stored.values())
    back = PackedWeight.from_stored(stored, bits, 300, packed.group_size)
    back.check("layer", 37, 300)
    for key, tensor in packed.tensors().items():
        assert torch.equal(getattr(back, key), tensor), key
    assert torch.equal(back.dequantize(), q.dequantize())


def test_stored_grids_keep_float32_where_16_bits_would_round():
    """float32 grids (a float32 model's) stay float32; float16-exact ones (GGUF's) take float16, even beside a
    bfloat16 model; the float32 value 1 + 2⁻¹⁵ is neither."""
    q = random_quantized(8, 128, 4, 64)
    q.scale[0, 0] = 1 + 2**-15
    assert pack(q).stored()["scales"].dtype == torch.float32
    q.scale = q.scale.half().float()
    assert pack(q).stored()["scales"].dtype == torch.float16


def test_version_2_layers_still_load():
    """A layer saved as format version 2 wrote (float32 scales, a byte a zero point) reads back unchanged."""
    packed = pack(random_quantized(16, 200, 3, 64))
    back = PackedWeight.from_stored(packed.tensors(), 3, 200, 64)
    back.check("layer", 16, 200)
    for key, tensor in packed.tensors().items():
        assert torch.equal(getattr(back, key), tensor), key


def test_damaged_stored_zeros_are_refused_on_load():
    packed = pack(random_quantized(16, 200, 3, 64))
    stored = packed.stored()
    stored["zeros"] = stored["zeros"][:-24]  # one tile of packed zero points short
    with pytest.raises(BoaError, match="zeros is"):
        PackedWeight.from_stored(stored, 3, 200, 64).check("layer", 16, 200)
