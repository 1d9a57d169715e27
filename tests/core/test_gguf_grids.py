"""GGUF grids (boa.core.gguf_grids): codes chosen on grids the GGUF types hold, written as their blocks, read back by
the `gguf` package's own dequantizers as exactly boa's dequantized weights; the solvers never leave them."""
import numpy as np
import pytest
import torch

import boa
from boa.algorithms.rtn import rtn
from boa.core.gguf_grids import (
    GGUF_TYPES, _round_significant, encode_rows, gguf_type, minimum_units_of, snap_grid, units_of,
)
from boa.core.quantizer import QuantSpec

gguf = pytest.importorskip("gguf")

TYPES = list(GGUF_TYPES)


def weights(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Rows of every kind a model has: ordinary, outlier-heavy, tiny (float16-subnormal scales), all-zero,
    one-signed."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[1] *= 1e-4
    W[2] = 0
    W[3] = W[3].abs()
    W[4] = -W[4].abs()
    W[5, ::37] *= 40
    W[6] *= 3e-7
    return W


def gguf_dequantized(kind, q: boa.core.quantizer.QuantizedWeight) -> torch.Tensor:
    data = encode_rows(kind, q.codes, q.scale, q.zero, q.offset)
    qtype = gguf.GGMLQuantizationType[kind.name]
    assert data.shape[1] == q.codes.shape[1] // kind.row_multiple * gguf.GGML_QUANT_SIZES[qtype][1]
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_rtn_on_a_gguf_grid_is_read_back_by_gguf_exactly(name, search):
    kind = gguf_type(name)
    spec = QuantSpec(bits=kind.bits, sym=not kind.asymmetric, group_size=kind.block, grid=search, gguf=name)
    W = weights()
    q = rtn(W, spec)
    assert torch.equal(gguf_dequantized(kind, q), q.dequantize())
    assert (q.dequantize() - W).abs().max() <= 0.6 * q.scale.abs().max()  # a real grid, not a degenerate one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounding_to_significant_bits_matches_frexp(dtype):
    """The bit-level rounding equals round(mantissa · 2^bits) / 2^bits on frexp's mantissa, exact ties included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50000, generator=g, dtype=dtype) * torch.exp(5 * torch.randn(50000, generator=g, dtype=dtype))
    for bits in range(1, 12):
        k = torch.randint(0, max(1, 2 ** (bits - 1)), (500,), generator=g).to(dtype)
        ties = (1 + (2 * k + 1) / 2**bits) * 2.0 ** torch.randint(-20, 20, (500,), generator=g).to(dtype)
        for values in (x, ties):
            mantissa, exponent = torch.frexp(values)
            expected = torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)
            assert torch.equal(_round_significant(values, bits), expected)


def test_q4_0_min_max_grid_is_llama_cpps():
    """boa's min-max Q4_0 grid is llama.cpp's reference one (the `gguf` package's quantizer): d = the block's
    largest-magnitude weight / −8, as a float16. Codes agree except where llama.cpp rounds against d before it is
    made a float16; there boa's code is the nearer one on the grid the file holds."""
    kind = gguf_type("Q4_0")
    W = weights(seed=3)
    q = rtn(W, QuantSpec(bits=4, sym=True, group_size=32, gguf="Q4_0"))
    theirs = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(W.shape[0], -1, 18)
    ours = encode_rows(kind, q.codes, q.scale, q.zero).reshape(W.shape[0], -1, 18)
    real = W.abs().amax(-1) > 1e-3  # rows whose d is a normal float16 (llama.cpp's 1/d of a subnormal overflows)
    assert np.array_equal(ours[real, :, :2], theirs[real, :, :2])  # the same float16 d in every block
    their_codes = torch.from_numpy(np.concatenate([theirs[..., 2:] & 15, theirs[..., 2:] >> 4], -1)
                                   .reshape(W.shape).astype(np.float32))
    differ = (their_codes != q.codes.float()) & real[:, None]
    assert differ.float().mean() < 1e-3 and (their_codes - q.codes.float())[differ].abs().max() <= 1
    scale = q.scale.repeat_interleave(32, dim=-1)
    ours_err, their_err = (scale * (q.codes.float() - 8) - W).abs(), (scale * (their_codes - 8) - W).abs()
    assert (ours_err[differ] <= their_err[differ]).all()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", [
    boa.GPTQ(), boa.GPTQ(act_order=True, static_groups=True), boa.TurboBoA(rows_per_step=4),
], ids=["gptq", "gptq-act-order-static", "turboboa-refined"])
def test_the_solver_never_leaves_the_gguf_grid(name, method):
    """Random layers through the OBS solver (dynamic and static grids, H-weighted search, scale refinement after
    rounding): every grid is representable and GGUF reads back boa's weights exactly."""
    kind = gguf_type(name)
    method = type(method)(**{**{k: v for k, v in method.to_dict().items() if k != "method"}, "gguf": name})
    W = weights(rows=16, seed=1)
    X = torch.randn(2048, W.shape[1], generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, W.shape[1])
    stats = boa.stats.LayerStats(2 * X.T @ X / X.shape[0])
    q = method.solve(W, stats)
    assert torch.equal(gguf_dequantized(kind, q), q.dequantize())


def test_act_order_without_static_groups_is_refused_for_gguf():
    W = weights(rows=8)
    stats = boa.stats.LayerStats(torch.eye(W.shape[1]))
    with pytest.raises(boa.BoaError, match="--static-groups"):
        boa.GPTQ(gguf="Q4_0", act_order=True).solve(W, stats)


def test_a_gguf_type_sets_bits_block_and_symmetry():
    assert boa.GPTQ(gguf="q4_1").spec == QuantSpec(bits=4, sym=False, group_size=32, gguf="Q4_1")
    assert boa.TurboBoA(gguf="Q3_K", bits=2).spec.bits == 3
    assert boa.GPTQ(gguf="Q4_K").spec == QuantSpec(bits=4, sym=False, group_size=32, gguf="Q4_K")
    assert boa.RTN(gguf="q2_k").spec == QuantSpec(bits=2, sym=False, group_size=16, gguf="Q2_K")
    with pytest.raises(boa.BoaError, match="choose one of Q4_0"):
        boa.GPTQ(gguf="Q9")


def test_q4_1_minimum_is_a_float16_of_the_integer_zero_point():
    """d·c + m (GGUF) equals d·(c − z) (boa) only if m = −z·d is a float16: the snapped d keeps as many bits as that
    allows, and no more rounding than needed (11 bits where z = 0)."""
    kind = gguf_type("Q4_1")
    g = torch.Generator().manual_seed(0)
    # scales down into float16's subnormal range (below 2^-14), where it holds only multiples of 2^-24
    scale = torch.exp(torch.empty(8192, 1, dtype=torch.float64).uniform_(-16, -2, generator=g))
    zero = torch.randint(0, 16, (8192, 1), generator=g).double()
    d, z = snap_grid(kind, scale, zero)
    assert torch.equal(z, zero)
    assert torch.equal((z * d).half().double(), z * d) and torch.equal(d.half().double(), d)
    normal = scale >= 2.0**-14
    assert ((d - scale).abs() / scale)[normal].max() <= 2.0**-7  # at most 4 of float16's 11 bits given up
    flat = zero == 0
    assert torch.equal(d[flat], scale[flat].half().double())


def test_q3_k_block_scales_share_one_float16_per_super_block():
    kind = gguf_type("Q3_K")
    q = rtn(weights(), QuantSpec(bits=3, sym=True, group_size=16, gguf="Q3_K"))
    d = units_of(kind, q.scale.double())
    k = q.scale.double().unflatten(-1, (-1, 16)) / d[..., None]
    assert torch.equal(k, k.round()) and k.abs().min() >= 1 and k.min() >= -32 and k.max() <= 31
    assert torch.equal(d.half().double(), d)


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_block_minimums_are_multiples_of_one_float16_per_super_block(name):
    """w = (d·k)·c − dmin·m: k in [1, k_max], m in [0, k_max], d and dmin float16 per 256 weights, zero points 0; the
    min-max offsets are the representable ones nearest the blocks' minimums."""
    kind = gguf_type(name)
    W = weights()
    q = rtn(W, QuantSpec(bits=kind.bits, sym=False, group_size=kind.block, gguf=name))
    assert bool((q.zero == 0).all())
    for values, unit, low in ((q.scale.double(), units_of(kind, q.scale.double()), 1),
                              (q.offset.double(), minimum_units_of(kind, q.offset.double()), 0)):
        assert torch.equal(unit.half().double(), unit)
        k = values.unflatten(-1, (-1, 256 // kind.block)) / unit.where(unit > 0, 1)[..., None]
        assert torch.equal(k, k.round()) and k.min() >= low and k.max() <= kind.k_max
    block_min = W.unflatten(-1, (-1, kind.block)).amin(-1).clamp(max=0)
    dmin = minimum_units_of(kind, q.offset.double()).repeat_interleave(256 // kind.block, -1).float()
    assert ((q.offset + block_min).abs() <= 0.51 * dmin.clamp(min=2.0**-24)).all()  # float16 holds no finer step


def test_encoding_needs_offsets_exactly_for_the_types_with_block_minimums():
    W = weights(rows=8)
    q4k = rtn(W, QuantSpec(bits=4, sym=False, group_size=32, gguf="Q4_K"))
    q41 = rtn(W, QuantSpec(bits=4, sym=False, group_size=32, gguf="Q4_1"))
    with pytest.raises(boa.BoaError, match="Q4_K grids need block minimums"):
        encode_rows(gguf_type("Q4_K"), q41.codes, q41.scale, q41.zero)
    with pytest.raises(boa.BoaError, match="Q4_1 grids have no block minimums"):
        encode_rows(gguf_type("Q4_1"), q4k.codes, q4k.scale, q4k.zero, q4k.offset)
    with pytest.raises(boa.BoaError, match="block minimums are not multiples of one float16"):
        encode_rows(gguf_type("Q4_K"), q4k.codes, q4k.scale, q4k.zero, q4k.offset * 1.001)


def test_aespa_refuses_block_minimums():
    with pytest.raises(boa.BoaError, match="aespa does not learn rounding on Q4_K"):
        boa.Aespa(init=boa.TurboBoA(gguf="Q4_K"))


def test_rows_that_do_not_split_into_blocks_are_refused():
    q = rtn(torch.randn(2, 96), QuantSpec(bits=4, sym=True, group_size=32, gguf="Q4_0"))
    encode_rows(gguf_type("Q4_0"), q.codes, q.scale, q.zero)  # 96 = 3 blocks of 32
    with pytest.raises(boa.BoaError, match="blocks of 256"):
        encode_rows(gguf_type("Q3_K"), q.codes, q.scale, q.zero)
