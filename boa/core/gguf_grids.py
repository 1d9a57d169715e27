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
    Q2_K    2    16   (d · k) · c − dmin · m, d and dmin fp16 per     zero 0, scale d·k, offset dmin·m
                      256 weights, k, m ∈ [0, 15] per 16 (4 bits)
    Q4_K    4    32   likewise, k, m ∈ [0, 63] per 32 (6 bits)        likewise
    Q5_K    5    32   likewise, k, m ∈ [0, 63] per 32 (6 bits)        likewise

Q4_1's m = −z·d must itself be a float16 for d·c + m to equal d·(c − z) (both are then exact in float32): d keeps as
many significant bits as that allows (z ≤ 15 needs at most 4, so d keeps at least 7; Q5_1 at least 6). The K types'
16 block scales of a 256-weight super-block share d, the `unit`: it is fixed from the weights before the solve (the
largest block scale over k_max) and each block's scale is then a multiple k·d, 1 ≤ k ≤ k_max; every product here is
exact in float32, so boa's dequantized weights and GGUF's are the same floats.

Q2_K/Q4_K/Q5_K's block minimums dmin · m are no integer zero point of the block scale: boa holds them as an `offset`
o, w = s · c − o (boa.core.quantizer), with both units, d and dmin, fixed per super-block before the solve like the
other K types' d. s · c and o are then exact in float32 and their difference rounds once, as GGUF's does.
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
    minimums: bool = False    # K types with block minimums dmin·m, 0 ≤ m ≤ k_max (an offset; the zero point is 0)

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
    GGUFType("Q2_K", 2, 16, asymmetric=True, k_max=15, minimums=True),
    GGUFType("Q4_K", 4, 32, asymmetric=True, k_max=63, minimums=True),
    GGUFType("Q5_K", 5, 32, asymmetric=True, k_max=63, minimums=True),
)}


def gguf_type(name: str) -> GGUFType:
    key = name.upper()
    if key in GGUF_TYPES:
        return GGUF_TYPES[key]
    raise BoaError(f"GGUF type {name!r} is not one boa quantizes to; choose one of {', '.join(GGUF_TYPES)}")


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
    symmetric types), the scale snapped. K types: `unit` (…, rows, 2) holds the super-block's d (and dmin)."""
    if kind.super_blocks:  # k ≠ 0 (a zero scale loses the block); refined scales may be negative: k ≥ −k_max − 1
        d = unit[..., :1]
        k = torch.round(scale / d)
        low = 1 if kind.minimums else -kind.k_max - 1
        k = torch.where(k == 0, torch.where(scale < 0, -1.0, 1.0).to(k.dtype), k).clamp(low, kind.k_max)
        return d * k, zero
    if kind.asymmetric:
        return _asymmetric_scale(scale, zero), zero
    return _float16(scale), zero


def offset_candidates(kind: GGUFType, offset: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Types with block minimums: the representable offsets dmin·m next below and above each of `offset` (…, rows, 1),
    stacked (2, …, rows, 1); 0 ≤ m ≤ k_max, dmin = unit[..., 1:] (0 where it is 0)."""
    dmin = unit[..., 1:]
    ratio = torch.where(dmin > 0, offset / dmin.where(dmin > 0, 1), 0)
    return dmin * torch.stack([ratio.floor(), ratio.ceil()]).clamp(0, kind.k_max)


def super_units(w: torch.Tensor, kind: GGUFType) -> torch.Tensor:
    """K types: each row's (d, dmin) per SUPER_BLOCK columns of w (…, rows, cols), (…, rows, cols // SUPER_BLOCK, 2):
    the largest min-max block scale magnitude of the super-block over k_max, as a float16; dmin (types with block
    minimums; else 0) likewise from the blocks' offsets −min(0, block minimum)."""
    blocks = w.unflatten(-1, (-1, kind.block))
    per_super = (-1, SUPER_BLOCK // kind.block)
    if kind.minimums:  # boa's asymmetric min-max grid (boa.core.quantizer): its range always holds 0
        low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
        scale = torch.where(high > low, (high - low) / (2**kind.bits - 1), torch.ones_like(low))
        # rounded up, so that k_max units still reach the largest (in float16's subnormal range a unit may round
        # to half of what it should be)
        d, dmin = (_float16_at_least(x.unflatten(-1, per_super).amax(-1) / kind.k_max) for x in (scale, -low))
        return torch.stack([d, dmin], -1)
    amax = blocks.abs().amax(-1)  # the symmetric GGUF min-max grid: |scale| amax / 2^(b−1) (all-zero block: any)
    scale = torch.where(amax > 0, amax / 2 ** (kind.bits - 1), torch.ones_like(amax))
    d = _float16(scale.unflatten(-1, per_super).amax(-1) / kind.k_max)
    return torch.stack([d, torch.zeros_like(d)], -1)


def _float16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 ≥ x ≥ 0 (at least the smallest positive one), held as x's dtype."""
    h = _float16(x)
    up = torch.nextafter(h.half(), torch.full_like(h, float("inf")).half()).to(x.dtype)
    return torch.where(h < x, up, h)


def _common_unit(values: torch.Tensor, low: int, high: int, what: str, kind: GGUFType) -> torch.Tensor:
    """The largest float16 u per super-block of values (…, rows, blocks) with every value k·u, low ≤ k ≤ high (the
    largest value over k = 1, 2, …); 0 where every value is 0 (offsets only: low = 0)."""
    blocks = values.unflatten(-1, (-1, SUPER_BLOCK // kind.block))
    top = blocks.abs().amax(-1, keepdim=True)
    found = torch.zeros_like(top)
    for k in range(1, max(high, -low) + 1):  # the smallest k first: the largest u
        u = top / k
        ratio = blocks / u
        fits = ((u.half().to(u.dtype) == u) & (ratio == ratio.round()).all(-1, keepdim=True)
                & ((ratio >= low) & (ratio <= high)).all(-1, keepdim=True) & (found == 0) & (u > 0))
        found = torch.where(fits, u, found)
    if bool(((found == 0) & ((top > 0) | (low > 0))).any()):
        raise BoaError(f"these block {what} are not multiples of one float16 per super-block, as {kind.name} needs; "
                       f"quantize with --grid gguf:{kind.name}")
    return found.squeeze(-1)


def units_of(kind: GGUFType, scale: torch.Tensor) -> torch.Tensor:
    """K types: a d per super-block (…, rows, groups / 16) of which every block scale (…, rows, groups) of it is a
    multiple k·d (1 ≤ k ≤ k_max with block minimums, else −k_max − 1 ≤ k ≤ k_max, k ≠ 0), d a float16."""
    return _common_unit(scale, 1 if kind.minimums else -kind.k_max - 1, kind.k_max, "scales", kind)


def minimum_units_of(kind: GGUFType, offset: torch.Tensor) -> torch.Tensor:
    """Types with block minimums: a dmin per super-block of which every block offset is a multiple m·dmin,
    0 ≤ m ≤ k_max, dmin a float16 (0 where every offset is)."""
    return _common_unit(offset, 0, kind.k_max, "minimums", kind)


def representable_scales(kind: GGUFType, scale: torch.Tensor, zero: torch.Tensor,
                         before: torch.Tensor) -> torch.Tensor:
    """Scales (…, rows, groups) that moved after the codes were chosen (boa's scale refinement), put back on
    representable grids; `before` are the representable scales they started from (K types keep their d)."""
    if not kind.super_blocks:
        return snap_grid(kind, scale, zero)[0]
    d = units_of(kind, before).repeat_interleave(SUPER_BLOCK // kind.block, dim=-1)
    unit = torch.stack([d, torch.zeros_like(d)], -1)  # (…, rows, groups, 2): one grid per (row, group)
    return snap_grid(kind, scale.unsqueeze(-1), zero.unsqueeze(-1), unit)[0].squeeze(-1)


# GGUF blocks --------------------------------------------------------------------------------------------------------


def encode_rows(kind: GGUFType, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                offset: torch.Tensor | None = None) -> np.ndarray:
    """The GGUF bytes (rows, blocks of the type in a row × its block's bytes) uint8 of a weight whose codes (rows,
    cols) sit on representable grids: scale, zero, offset (rows, cols / block) per block, in column order (offsets:
    the types with block minimums). Raises if a grid is not representable (boa's solver never makes one)."""
    rows, cols = codes.shape
    if cols % kind.row_multiple:
        raise BoaError(f"rows of {cols} weights do not split into {kind.name}'s blocks of {kind.row_multiple}")
    if (offset is not None) != kind.minimums:
        raise BoaError(f"{kind.name} grids {'need' if kind.minimums else 'have no'} block minimums (offsets); "
                       f"quantize with --grid gguf:{kind.name}")
    c = codes.to(torch.int64).numpy().astype(np.uint8)
    if kind.minimums:
        if bool((zero != 0).any()):
            raise BoaError(f"{kind.name} grids have zero points 0 (their minimums are offsets)")
        blocks = _encode_with_minimums(kind, c.reshape(rows, -1, SUPER_BLOCK), scale.double(), offset.double())
        return np.ascontiguousarray(blocks.reshape(rows, -1))
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


def _block_multiples(kind: GGUFType, s: np.ndarray, unit: np.ndarray, rows: int, low: int | None = None,
                     what: str = "scale") -> np.ndarray:
    """Each block's k (rows, super-blocks, blocks per super-block) with s = k·unit, checked to be an integer in
    [low, k_max] (low: −k_max − 1 unless given)."""
    low = -kind.k_max - 1 if low is None else low
    unit = unit[..., None]
    k = s.reshape(rows, unit.shape[1], SUPER_BLOCK // kind.block) / np.where(unit > 0, unit, 1)
    if not np.array_equal(k, np.round(k)) or (k < low).any() or (k > kind.k_max).any():
        raise BoaError(f"a {kind.name} block {what} is not a multiple k·d ({low} ≤ k ≤ {kind.k_max}) of its "
                       f"super-block's unit; quantize with --grid gguf:{kind.name}")
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


def _k_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of 8 six-bit block scales sc and minimums m (…, 8): bytes 0–3 sc[0:4] and 4–7 m[0:4] in
    their low 6 bits with the top 2 bits of sc[4:8] (resp. m[4:8]) above; bytes 8–11 the low nibbles of sc[4:8] and,
    above them, of m[4:8]."""
    low, high = slice(0, 4), slice(4, 8)
    return np.concatenate([sc[..., low] | ((sc[..., high] >> 4) << 6), m[..., low] | ((m[..., high] >> 4) << 6),
                           (sc[..., high] & 0xF) | ((m[..., high] & 0xF) << 4)], axis=-1).astype(np.uint8)


def _encode_with_minimums(kind: GGUFType, c: np.ndarray, scale: torch.Tensor, offset: torch.Tensor) -> np.ndarray:
    """Q2_K / Q4_K / Q5_K super-blocks of the codes c (rows, super-blocks, 256), w = (d·k)·c − dmin·m per block:
        Q2_K (84 bytes):  scales (16: k | m << 4) | qs (64) | d | dmin; weight v (h = v // 128, r = v % 128) in qs
                          byte 32·h + r % 32 at bits 2·(r // 32)
        Q4_K (144 bytes): d | dmin | scales (12, _k_scale_bytes) | qs (128): weight v in byte 32·(v // 64) + v % 32,
                          low nibble for v % 64 < 32, high above
        Q5_K (176 bytes): d | dmin | scales (12) | qh (32) | qs (128, Q4_K's, of the low 4 bits): bit 4 of weight v
                          in qh byte v % 32 at bit v // 32"""
    rows, n_super = c.shape[:2]
    d, dmin = units_of(kind, scale).numpy(), minimum_units_of(kind, offset).numpy()
    k = _block_multiples(kind, scale.numpy(), d, rows, low=1).astype(np.uint8)
    m = _block_multiples(kind, offset.numpy(), dmin, rows, low=0, what="minimum").astype(np.uint8)
    halves = [_exact_half(x, kind, "super-block unit").reshape(rows, n_super, 1).view(np.uint8) for x in (d, dmin)]
    v = np.arange(SUPER_BLOCK)
    if kind.name == "Q2_K":
        qs = np.zeros((rows, n_super, 64), dtype=np.uint8)
        h, r = v // 128, v % 128
        for shift in range(4):
            sel = r // 32 == shift
            qs[..., 32 * h[sel] + r[sel] % 32] |= c[..., sel] << (2 * shift)
        scales = (k | (m << 4)).astype(np.uint8)
        return np.concatenate([scales, qs, *halves], axis=-1)
    qs = np.zeros((rows, n_super, 128), dtype=np.uint8)
    for nibble in range(2):
        sel = (v % 64) // 32 == nibble
        qs[..., 32 * (v[sel] // 64) + v[sel] % 32] |= (c[..., sel] & 0xF) << (4 * nibble)
    fields = [*halves, _k_scale_bytes(k, m)]
    if kind.name == "Q5_K":
        qh = np.zeros((rows, n_super, 32), dtype=np.uint8)
        for bit in range(8):
            sel = v // 32 == bit
            qh[..., v[sel] % 32] |= (c[..., sel] >> 4) << bit
        fields.append(qh)
    return np.concatenate([*fields, qs], axis=-1)
