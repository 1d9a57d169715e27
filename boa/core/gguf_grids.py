"""GGUF's quantization types as boa grids: codes chosen on exactly the grids a GGUF file can hold, and the bytes of
its blocks (llama.cpp's ggml-quants layouts; the `gguf` package's dequantizers are the reference the tests use).

Each type holds a row in blocks of `block` weights with a grid of its own, w = s · (c − z), c a `bits`-bit code:

    type  bits block  grid                                            boa grid it equals
    Q4_0    4    32   d · (c − 8),  d fp16                            sym, scale d
    Q5_0    5    32   d · (c − 16), d fp16                            sym, scale d
    Q8_0    8    32   d · (c − 128), d fp16 (stored int8 c − 128)    sym, scale d
    Q4_1    4    32   d · c + m,  d and m fp16                        asym, scale d, zero −m/d an integer z
    Q5_1    5    32   d · c + m,  d and m fp16                        asym, likewise
    Q3_K    3    16   (d · k) · (c − 4), d fp16 per 256 weights,      sym, scale d·k
                      k ∈ [−32, 31] per 16 (6 bits)
    Q6_K    6    16   (d · k) · (c − 32), d fp16 per 256 weights,     sym, scale d·k
                      k ∈ [−128, 127] per 16 (int8)

Q4_1's m = −z·d must itself be a float16 for d·c + m to equal d·(c − z) (both are then exact in float32): d keeps as
many significant bits as that allows (z ≤ 15 needs at most 4, so d keeps at least 7; Q5_1 at least 6). The K types'
16 block scales of a 256-weight super-block share d, the `unit`: it is fixed from the weights before the solve (the
largest block scale over k_max) and each block's scale is then a multiple k·d, 1 ≤ k ≤ k_max; every product here is
exact in float32, so boa's dequantized weights and GGUF's are the same floats.

Not here yet: Q2_K/Q4_K/Q5_K, whose block minimums (d_min · m) are not integer zero points of the block scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from boa.core.errors import BoaError

SUPER_BLOCK = 256
FP16_TINY = 2.0**-24  # the smallest positive float16
FP16_MAX = 65504.0


@dataclass(frozen=True)
class GGUFType:
    name: str
    bits: int
    block: int                # weights per grid, along a row
    asymmetric: bool = False  # a zero point per block (else the fixed middle one, 2^(bits−1))
    k_max: int = 0            # K types: a block's scale is k·d, 1 ≤ k ≤ k_max, d one fp16 per SUPER_BLOCK weights

    @property
    def super_blocks(self) -> bool:
        return self.k_max > 0

    @property
    def row_multiple(self) -> int:
        """A row's length must be a multiple of this."""
        return SUPER_BLOCK if self.super_blocks else self.block


GGUF_TYPES = {t.name: t for t in (
    GGUFType("Q4_0", 4, 32),
    GGUFType("Q4_1", 4, 32, asymmetric=True),
    GGUFType("Q5_0", 5, 32),
    GGUFType("Q5_1", 5, 32, asymmetric=True),
    GGUFType("Q8_0", 8, 32),
    GGUFType("Q3_K", 3, 16, k_max=31),
    GGUFType("Q6_K", 6, 16, k_max=127),
)}
PLANNED = ("Q2_K", "Q4_K", "Q5_K")


def gguf_type(name: str) -> GGUFType:
    key = name.upper()
    if key in GGUF_TYPES:
        return GGUF_TYPES[key]
    later = f" ({key} is not supported yet)" if key in PLANNED else ""
    raise BoaError(f"GGUF type {name!r} is not one boa quantizes to{later}; choose one of {', '.join(GGUF_TYPES)}")


def _float16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 (held as x's dtype), at least the smallest float16 in magnitude (a scale never becomes 0);
    too large is an error."""
    if bool((x.abs() > FP16_MAX).any()):
        raise BoaError(f"a grid scale of {x.abs().max().item():.3g} lies beyond float16's range, which GGUF stores "
                       "scales in; this layer's weights are too large for GGUF")
    sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    return (sign * x.abs().clamp(min=FP16_TINY)).half().to(x.dtype)


_AS_INT = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52)}  # the integer view, mantissa bits


def _round_significant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x (normal floats) rounded to `bits` significant bits, to nearest, ties to even: on the bits of x (a carry out
    of the mantissa moves the exponent up, as it should), several times faster than frexp/ldexp."""
    if x.dtype not in _AS_INT:
        return _round_significant(x.float(), bits).to(x.dtype)
    int_dtype, mantissa_bits = _AS_INT[x.dtype]
    drop = mantissa_bits + 1 - bits  # the low bits that go
    raw = x.view(int_dtype)
    odd = (raw >> drop) & 1 if bits > 1 else 1  # the lowest kept bit (with 1 bit, the implicit leading 1): ties
                                                # round to make it 0
    return ((raw + ((1 << (drop - 1)) - 1) + odd) >> drop << drop).view(x.dtype)


def _asymmetric_scale(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float16 d nearest `scale` for which z·d is a float16 too: the most significant bits it can keep (11 for
    z = 0, fewer as z's odd part grows), checked, falling back bit by bit (only float16's subnormal range needs it)."""
    best = torch.zeros_like(scale)
    for bits in range(11, 0, -1):
        d = _float16(scale if bits == 11 else _round_significant(scale, bits))
        product = zero * d
        fits = (product.half().to(scale.dtype) == product) & (best == 0)
        best = torch.where(fits, d, best)
        if bits <= 7 and bool((best != 0).all()):  # usual by 11 − bitlen(odd part of z) bits; subnormal d go on
            break
    return best


def snap_grid(kind: GGUFType, scale: torch.Tensor, zero: torch.Tensor,
              unit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable grid nearest (scale, zero) (…, rows, 1): the zero point is kept (an integer; fixed for the
    symmetric types), the scale snapped. K types: `unit` (…, rows, 1) is the super-block's d."""
    if kind.super_blocks:  # k ≠ 0 (a zero scale loses the block); refined scales may be negative: k ≥ −k_max − 1
        k = torch.round(scale / unit)
        k = torch.where(k == 0, torch.where(scale < 0, -1.0, 1.0).to(k.dtype), k).clamp(-kind.k_max - 1, kind.k_max)
        return unit * k, zero
    if kind.asymmetric:
        return _asymmetric_scale(scale, zero), zero
    return _float16(scale), zero


def super_units(w: torch.Tensor, kind: GGUFType) -> torch.Tensor:
    """K types: each row's d per SUPER_BLOCK columns of w (…, rows, cols), (…, rows, cols // SUPER_BLOCK): the
    largest min-max block scale magnitude of the super-block over k_max, as a float16."""
    blocks = w.unflatten(-1, (-1, kind.block))
    amax = blocks.abs().amax(-1)
    # the symmetric GGUF min-max grid (boa.core.quantizer): |scale| amax / 2^(b−1) (an all-zero block: any scale)
    scale = torch.where(amax > 0, amax / 2 ** (kind.bits - 1), torch.ones_like(amax))
    per_super = scale.unflatten(-1, (-1, SUPER_BLOCK // kind.block)).amax(-1)
    return _float16(per_super / kind.k_max)


def units_of(kind: GGUFType, scale: torch.Tensor) -> torch.Tensor:
    """K types: a d per super-block (…, rows, groups / 16) of which every block scale (…, rows, groups) of it is a
    multiple k·d, −k_max − 1 ≤ k ≤ k_max, d a float16: the largest such d (the largest scale over k = 1, 2, …)."""
    blocks = scale.unflatten(-1, (-1, SUPER_BLOCK // kind.block))
    top = blocks.abs().amax(-1, keepdim=True)
    found = torch.zeros_like(top)
    for k in range(1, kind.k_max + 2):  # the smallest k first: the largest d
        d = top / k
        ratio = blocks / d
        fits = ((d.half().to(d.dtype) == d) & (ratio == ratio.round()).all(-1, keepdim=True)
                & ((ratio >= -kind.k_max - 1) & (ratio <= kind.k_max)).all(-1, keepdim=True) & (found == 0) & (d > 0))
        found = torch.where(fits, d, found)
    if bool((found == 0).any()):
        raise BoaError(f"these block scales are not multiples of one float16 per super-block, as {kind.name} needs; "
                       f"quantize with --grid gguf:{kind.name}")
    return found.squeeze(-1)


def representable_scales(kind: GGUFType, scale: torch.Tensor, zero: torch.Tensor,
                         before: torch.Tensor) -> torch.Tensor:
    """Scales (…, rows, groups) that moved after the codes were chosen (boa's scale refinement), put back on
    representable grids; `before` are the representable scales they started from (K types keep their d)."""
    unit = None
    if kind.super_blocks:
        unit = units_of(kind, before).repeat_interleave(SUPER_BLOCK // kind.block, dim=-1)
    return snap_grid(kind, scale, zero, unit)[0]


# GGUF blocks --------------------------------------------------------------------------------------------------------


def encode_rows(kind: GGUFType, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """The GGUF bytes (rows, blocks of the type in a row × its block's bytes) uint8 of a weight whose codes (rows,
    cols) sit on representable grids: scale, zero (rows, cols / block) per block, in column order. Raises if a grid
    is not representable (boa's solver never makes one)."""
    rows, cols = codes.shape
    if cols % kind.row_multiple:
        raise BoaError(f"rows of {cols} weights do not split into {kind.name}'s blocks of {kind.row_multiple}")
    c = codes.to(torch.int64).numpy().astype(np.uint8)
    s = scale.double().numpy()
    z = zero.double().numpy()
    if not np.array_equal(z, np.round(z)):
        raise BoaError(f"{kind.name} needs integer zero points")
    mid = 2 ** (kind.bits - 1)
    if not kind.asymmetric and not (z == mid).all():
        raise BoaError(f"{kind.name} holds symmetric grids (zero point {mid}) only")
    blocks = c.reshape(rows, -1, kind.block)
    if kind.super_blocks:
        encode = _encode_q3_k if kind.name == "Q3_K" else _encode_q6_k
        return np.ascontiguousarray(encode(blocks, s, units_of(kind, scale.double()).numpy(), rows).reshape(rows, -1))
    half = lambda x: x.reshape(rows, -1, 1).view(np.uint8).reshape(rows, -1, 2)  # noqa: E731 (float16 bytes)
    fields = [half(_exact_half(s, kind))]
    if kind.asymmetric:
        fields.append(half(_exact_half(-z * s, kind, "minimum")))
    if kind.bits == 8:
        fields.append((blocks.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if kind.bits == 5:  # the 32 high bits (bit 4 of each code) as one little-endian uint32
            fields.append(np.packbits(blocks >> 4, axis=-1, bitorder="little"))
        low = blocks & 0xF
        fields.append(low[..., :16] | (low[..., 16:] << 4))
    return np.ascontiguousarray(np.concatenate(fields, axis=-1).reshape(rows, -1))


def _exact_half(values: np.ndarray, kind: GGUFType, what: str = "scale") -> np.ndarray:
    half = values.astype(np.float16)
    if not np.array_equal(half.astype(np.float64), values):
        raise BoaError(f"a {kind.name} {what} is not a float16; quantize with --grid gguf:{kind.name} so that the "
                       "solver chooses representable grids")
    return half


def _block_multiples(kind: GGUFType, s: np.ndarray, unit: np.ndarray, rows: int) -> np.ndarray:
    """Each block's k (rows, super-blocks, 16) with scale = k·d, checked to be an integer in the type's range."""
    k = s.reshape(rows, unit.shape[1], 16) / unit[..., None]
    if not np.array_equal(k, np.round(k)) or (k < -kind.k_max - 1).any() or (k > kind.k_max).any():
        raise BoaError(f"a {kind.name} block scale is not a multiple k·d (−{kind.k_max + 1} ≤ k ≤ {kind.k_max}) of its "
                       f"super-block's d; quantize with --grid gguf:{kind.name}")
    return k.astype(np.int16)


def _encode_q6_k(blocks: np.ndarray, s: np.ndarray, unit: np.ndarray, rows: int) -> np.ndarray:
    """Q6_K super-blocks (210 bytes): ql (128) | qh (64) | scales (16, int8 k) | d (2). Weight v (h = v // 128,
    r = v % 128) has code c: its low 4 bits in ql byte 64·h + r % 64 at bits 4·(r // 64), its high 2 in qh byte
    32·h + r % 32 at bits 2·(r // 32)."""
    kind = GGUF_TYPES["Q6_K"]
    k = _block_multiples(kind, s, unit, rows)
    d = _exact_half(unit, kind, "super-block scale")
    n_super = unit.shape[1]
    c = blocks.reshape(rows, n_super, SUPER_BLOCK)
    v = np.arange(SUPER_BLOCK)
    h, r = v // 128, v % 128
    ql = np.zeros((rows, n_super, 128), dtype=np.uint8)
    qh = np.zeros((rows, n_super, 64), dtype=np.uint8)
    for shift in range(2):
        sel = r // 64 == shift
        ql[..., 64 * h[sel] + r[sel] % 64] |= (c[..., sel] & 0xF) << (4 * shift)
    for shift in range(4):
        sel = r // 32 == shift
        qh[..., 32 * h[sel] + r[sel] % 32] |= (c[..., sel] >> 4) << (2 * shift)
    scales = k.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, d.reshape(rows, n_super, 1).view(np.uint8)], axis=-1)


def _encode_q3_k(blocks: np.ndarray, s: np.ndarray, unit: np.ndarray, rows: int) -> np.ndarray:
    """Q3_K super-blocks (110 bytes): hmask (32) | qs (64) | scales (12) | d (2). Weight v of a super-block (block
    v // 16) has code c = ql + 4·h: ql = c & 3 in qs byte 32·(v // 128) + v % 32 at bits 2·((v // 32) % 4); h = c >> 2
    in hmask byte v % 32 at bit v // 32. Block j's scale index u = k + 32 (6 bits): its low 4 bits in byte j % 8 of
    the first 8 (high nibble for j ≥ 8), its high 2 bits in byte 8 + j % 4 at bits 2·(j // 4)."""
    kind = GGUF_TYPES["Q3_K"]
    n_super = unit.shape[1]
    k = _block_multiples(kind, s, unit, rows)
    d = _exact_half(unit, kind, "super-block scale")
    u = (k + 32).astype(np.uint8)                                                # (rows, n_super, 16)
    c = blocks.reshape(rows, n_super, SUPER_BLOCK)
    v = np.arange(SUPER_BLOCK)
    ql, h = c & 3, c >> 2
    qs = np.zeros((rows, n_super, 64), dtype=np.uint8)
    hmask = np.zeros((rows, n_super, 32), dtype=np.uint8)
    for shift in range(4):  # one bit field at a time: each (byte, bit) is written by exactly one weight
        sel = (v // 32) % 4 == shift
        qs[..., 32 * (v[sel] // 128) + v[sel] % 32] |= ql[..., sel] << (2 * shift)
    for bit in range(8):
        sel = v // 32 == bit
        hmask[..., v[sel] % 32] |= h[..., sel] << bit
    scales = np.zeros((rows, n_super, 12), dtype=np.uint8)
    j = np.arange(16)
    scales[..., :8] = (u[..., :8] & 0xF) | ((u[..., 8:] & 0xF) << 4)
    for shift in range(4):
        sel = j // 4 == shift
        scales[..., 8 + j[sel] % 4] |= (u[..., sel] >> 4) << (2 * shift)
    return np.concatenate([hmask, qs, scales, d.reshape(rows, n_super, 1).view(np.uint8)], axis=-1)
