"""boa's packed low-bit layout: how a QuantLinear holds its weight in memory and on disk, and what every packed
kernel reads (csrc/cpu/packed_matmul.cpp, csrc/cuda/packed_gemv.cu, boa_kernels/triton_packed_gemm.py).

A layer W (out × in) quantized at b ∈ {2, 3, 4, 5, 6, 8} bits, with grids for groups of g input columns:

    qweight  uint8   (out, in_pad·b/8)  each row's codes in tiles of 64 packed columns; in_pad = in rounded up to
                                        a multiple of 64, the padding codes are 0
    scales   float32 (out, G)           group k's grid covers packed columns [k·g, (k+1)·g); the last group may be
    zeros    uint8   (out, G)           partial and also owns the padding; per-channel grids: G = 1, g = in
    perm     int32   (in,) or None      packed column j holds input column perm[j]. None when every group is already a
                                        run of consecutive columns; set under act-order, whose groups are scattered
    offsets  float32 (out, G) or None   GGUF's block minimums (Q2_K, Q4_K, Q5_K; zeros are then 0), subtracted:

    W[o, perm[j]] = scales[o, j // g] · (code[o, j] − zeros[o, j // g]) − offsets[o, j // g]

The packed kernels do not read offsets: a layer that has them runs dequantized (torch), at its export's grids.

A tile of 64 codes c_0 … c_63 takes 8·b bytes: bit planes, low bits first (b = 3: a 2-bit plane, then a 1-bit plane
holding each code's bit 2):

    8-bit plane (64 bytes)  byte i: c_i
    4-bit plane (32 bytes)  byte i: c_i in bits 0–3, c_{i+32} in bits 4–7
    2-bit plane (16 bytes)  byte i: c_i, c_{i+16}, c_{i+32}, c_{i+48} in bits 0–1, 2–3, 4–5, 6–7
    1-bit plane ( 8 bytes)  bit i of the little-endian 64-bit word (byte i // 8, bit i % 8): c_i
    (b = 5: a 4-bit plane, then a 1-bit plane; b = 6: a 4-bit, then a 2-bit plane)

Why this shape: 16 consecutive bytes widen to 16 int32 lanes in one instruction (vpmovzxbd); a shift and a mask of
those lanes then give 16 *consecutive* codes (one AVX-512 register, two AVX2 registers, a warp's half-row), so a
register never straddles two groups when g is a multiple of 16, and a 16-bit slice of the 1-bit plane is an AVX-512
lane mask as it stands. Scales are float32 so that every model dtype's grid is held exactly; zeros are integers in
[0, 2^b − 1], so a byte.

On disk (`stored` / `from_stored`, boa's format version 3) the grids take what they hold, not what the kernels read:
scales and offsets in float16 or bfloat16 when every value is one exactly (a 16-bit model's grids always are; GGUF's
are float16), else float32; zeros b bits each, the (out, G) matrix flattened row by row and packed as one row of
codes (padded to a tile). W3 g128 then stores 3 + (16 + 3)/128 ≈ 3.15 bits a weight, as GPTQ's format does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from boa.core.errors import BoaError
from boa.core.quantizer import QuantizedWeight

TILE = 64
# Each width's bit planes, low bits first.
PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
PACKED_BITS = tuple(PLANES)  # 5 and 6 (GGUF's Q5/Q6 types) are stored; the kernels read the others (KERNEL_BITS)


@dataclass
class PackedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    in_features: int
    group_size: int
    offsets: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def codes(self) -> torch.Tensor:
        """Codes (out, in_pad) uint8, in packed column order."""
        return unpack_codes(self.qweight, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (out, in) in input column order, computed in float32."""
        return self.to_quantized(torch.float32).dequantize().to(dtype)

    def group_index(self) -> torch.Tensor:
        """Each packed column's group (in,)."""
        j = torch.arange(self.in_features, device=self.qweight.device)
        return torch.clamp(j // self.group_size, max=self.scales.shape[1] - 1)

    def to_quantized(self, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
        """The QuantizedWeight this was packed from (codes, grids and g_idx in input column order)."""
        codes = self.codes()[:, : self.in_features]
        g_idx = self.group_index().to(torch.int32)
        if self.perm is not None:
            perm = self.perm.long()
            codes = torch.empty_like(codes).index_copy_(1, perm, codes)
            g_idx = torch.empty_like(g_idx).index_copy_(0, perm, g_idx)
        return QuantizedWeight(codes, self.scales.to(dtype), self.zeros.to(dtype), g_idx, self.bits,
                               None if self.offsets is None else self.offsets.to(dtype))

    def check(self, name: str, out_features: int, in_features: int) -> None:
        """That this is a consistent packed weight for a layer (out_features × in_features): widths, shapes and
        dtypes as the layout above says, finite scales, zero points on the grid, perm a permutation.
        Otherwise a BoaError naming the layer and what differs."""

        def fail(what: str):
            raise BoaError(f"layer {name}: {what}; the saved model was edited or damaged — quantize it again (or "
                           "restore the folder as boa wrote it)")

        if self.bits not in PACKED_BITS:
            fail(f"bits={self.bits!r} is not a packed width ({', '.join(map(str, PACKED_BITS))})")
        if self.in_features != in_features:
            fail(f"in_features={self.in_features!r} but the layer takes {in_features} inputs")
        if not isinstance(self.group_size, int) or not 0 < self.group_size <= in_features:
            fail(f"group_size={self.group_size!r} does not fit {in_features} inputs")
        groups = -(-in_features // self.group_size)
        expected = {"qweight": ((out_features, _padded(in_features) * self.bits // 8), torch.uint8),
                    "scales": ((out_features, groups), torch.float32),
                    "zeros": ((out_features, groups), torch.uint8)}
        if self.perm is not None:
            expected["perm"] = ((in_features,), torch.int32)
        if self.offsets is not None:
            expected["offsets"] = ((out_features, groups), torch.float32)
        for key, (shape, dtype) in expected.items():
            tensor = getattr(self, key)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                fail(f"{key} is {tuple(tensor.shape)} {tensor.dtype}, but {self.bits}-bit codes of {in_features} "
                     f"inputs in groups of {self.group_size} take {shape} {dtype}")
        if not torch.isfinite(self.scales).all():
            fail("its scales hold NaN or Inf")
        if self.offsets is not None and not torch.isfinite(self.offsets).all():
            fail("its offsets hold NaN or Inf")
        if int(self.zeros.max()) > 2**self.bits - 1:
            fail(f"a zero point exceeds {2**self.bits - 1}, the largest {self.bits}-bit code")
        if self.perm is not None and not torch.equal(torch.sort(self.perm.long()).values,
                                                     torch.arange(in_features)):
            fail("perm is not a permutation of its inputs")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        optional = {"perm": self.perm, "offsets": self.offsets}
        return {**out, **{k: v for k, v in optional.items() if v is not None}}

    def nbytes(self) -> int:
        """Bytes in memory (the layout the kernels read)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors as saved: grids in the narrowest exact float dtype, zeros packed at b bits (module docstring)."""
        flat = self.zeros.reshape(1, -1)
        padded = torch.zeros(1, _padded(flat.shape[1]), dtype=torch.uint8, device=flat.device)
        padded[:, : flat.shape[1]] = flat
        grids = {"scales": _narrowest(self.scales), "zeros": pack_codes(padded, self.bits).reshape(-1)}
        if self.offsets is not None:
            grids["offsets"] = _narrowest(self.offsets)
        return {**self.tensors(), **grids}

    def stored_nbytes(self) -> int:
        """Bytes on disk (what boa.save writes for this layer)."""
        return sum(t.numel() * t.element_size() for t in self.stored().values())

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], bits: int, in_features: int, group_size: int,
                    ) -> PackedWeight:
        """The PackedWeight whose `stored()` these are (missing keys: KeyError naming them). Zeros saved unpacked
        (out, G) — format version 2 — are taken as they are; a packed row that does not hold out × G codes is left
        as it is, for `check` to refuse."""
        qweight, zeros = tensors["qweight"], tensors["zeros"]
        if zeros.dim() == 1 and zeros.dtype == torch.uint8 and bits in PLANES and zeros.numel() % (8 * bits) == 0:
            groups = -(-in_features // group_size) if isinstance(group_size, int) and group_size > 0 else 0
            count = qweight.shape[0] * groups
            codes = unpack_codes(zeros.reshape(1, -1), bits).reshape(-1)
            if groups and codes.numel() >= count and codes.numel() - count < TILE:
                zeros = codes[:count].reshape(qweight.shape[0], groups)
        return cls(qweight=qweight, scales=_widened(tensors["scales"]), zeros=zeros, perm=tensors.get("perm"),
                   bits=bits, in_features=in_features, group_size=group_size,
                   offsets=_widened(tensors.get("offsets")))


def _widened(values: torch.Tensor | None) -> torch.Tensor | None:
    """Stored 16-bit grids as the float32 the kernels read (another dtype is left for `check` to refuse)."""
    return values.float() if values is not None and values.dtype in (torch.float16, torch.bfloat16) else values


def _narrowest(values: torch.Tensor) -> torch.Tensor:
    """values (float32) in float16 or bfloat16 where that dtype holds every one exactly, else as they are."""
    for dtype in (torch.float16, torch.bfloat16):
        narrow = values.to(dtype)
        if torch.equal(narrow.float(), values):
            return narrow
    return values


def _padded(n: int) -> int:
    return -(-n // TILE) * TILE


def pack(q: QuantizedWeight) -> PackedWeight:
    """Packs a QuantizedWeight; its groups, after sorting columns by g_idx, must be runs of one width (the last may be
    narrower), which every boa quantizer produces."""
    if q.bits not in PLANES:
        raise BoaError(f"{q.bits}-bit weights cannot be packed; boa packs {PACKED_BITS} bits")
    out, n = q.codes.shape
    g_idx = q.g_idx.long()
    n_groups = q.scale.shape[1]
    sizes = torch.bincount(g_idx, minlength=n_groups).tolist()
    width = sizes[0]
    if any(s != width for s in sizes[:-1]) or not 0 < sizes[-1] <= width:
        raise BoaError(f"groups of sizes {sorted(set(sizes))} cannot be packed; boa packs groups of one width "
                       "(the last may be narrower), as `boa quantize` makes them")
    if float(q.zero.min()) < 0 or float(q.zero.max()) > 2**q.bits - 1:
        raise BoaError(f"zero points span [{float(q.zero.min())}, {float(q.zero.max())}], outside the {q.bits}-bit "
                       f"codes [0, {2**q.bits - 1}] the packed kernels read; grids must keep them on the code range")
    sorted_order = bool((g_idx[1:] >= g_idx[:-1]).all())
    perm = None if sorted_order else torch.sort(g_idx, stable=True).indices
    codes = q.codes if perm is None else q.codes[:, perm]
    padded = torch.zeros(out, _padded(n), dtype=torch.uint8, device=codes.device)
    padded[:, :n] = codes
    return PackedWeight(
        qweight=pack_codes(padded, q.bits), scales=q.scale.float().contiguous(),
        zeros=q.zero.round().to(torch.uint8).contiguous(),
        perm=None if perm is None else perm.to(torch.int32), bits=q.bits, in_features=n,
        group_size=n if n_groups == 1 else width, offsets=None if q.offset is None else q.offset.float().contiguous(),
    )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (out, in_pad) uint8 → qweight (out, in_pad·bits/8) uint8, tile by tile, plane by plane."""
    out, n = codes.shape
    tiles = codes.view(out, n // TILE, TILE).to(torch.int32)
    planes, shift = [], 0
    for width in PLANES[bits]:
        values = (tiles >> shift) & ((1 << width) - 1)
        if width == 1:  # bit i of the plane's 64-bit word: byte i // 8, bit i % 8
            parts = values.view(out, -1, 8, 8)
            planes.append(sum(parts[..., k] << k for k in range(8)))
        else:  # byte i holds c_{i + m·8w} at bits m·w
            parts = values.view(out, -1, 8 // width, 8 * width)
            planes.append(sum(parts[:, :, m] << (m * width) for m in range(8 // width)))
        shift += width
    return torch.cat(planes, dim=-1).to(torch.uint8).reshape(out, -1)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight (out, in_pad·bits/8) → codes (out, in_pad) uint8; the inverse of pack_codes."""
    out = qweight.shape[0]
    tiles = qweight.view(out, -1, 8 * bits).to(torch.int32)
    codes, offset, shift = 0, 0, 0
    for width in PLANES[bits]:
        plane = tiles[..., offset : offset + 8 * width]
        if width == 1:
            values = torch.stack([(plane >> k) & 1 for k in range(8)], dim=-1)
        else:
            values = torch.stack([(plane >> (m * width)) & ((1 << width) - 1) for m in range(8 // width)], dim=-2)
        codes = codes + (values.reshape(out, -1, TILE) << shift)
        offset += 8 * width
        shift += width
    return codes.reshape(out, -1).to(torch.uint8)
