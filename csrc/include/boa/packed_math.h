// Per-element math of the packed low-bit matmul, shared by the C++ CPU kernel (its portable path) and the CUDA GEMV,
// so that the CPU build the tests run proves the unpacking and dequantizing the GPU does.
//
// Layout (boa/core/packed.py): a row is tiles of 64 codes, 8·bits bytes each, bit planes low bits first:
//   8-bit plane: byte i = c_i;  4-bit: byte i = c_i | c_{i+32} << 4;  2-bit: byte i = c_i | c_{i+16} << 2 | …;
//   1-bit: bit i of the little-endian 64-bit word = c_i.   3 bits = a 2-bit plane then a 1-bit plane.
// A grid per (row, group): w = scale · (code − zero), group of packed column j = min(j / group_size, G − 1).
#pragma once

#include <cstdint>
#include <cstring>

#include "boa/host_device.h"

namespace boa {

constexpr int kTile = 64;

BOA_HD int tile_bytes(int bits) { return 8 * bits; }

// Code i (0 ≤ i < 64) of a tile.
BOA_HD uint32_t unpack_code(const uint8_t* tile, int bits, int i) {
  switch (bits) {
    case 8:
      return tile[i];
    case 4:
      return (tile[i & 31] >> ((i >> 5) * 4)) & 15u;
    case 2:
      return (tile[i & 15] >> ((i >> 4) * 2)) & 3u;
    default: {  // 3: the 2-bit plane's low bits, the 1-bit plane's bit 2
      const uint32_t low = (tile[i & 15] >> ((i >> 4) * 2)) & 3u;
      const uint32_t high = (tile[16 + (i >> 3)] >> (i & 7)) & 1u;
      return low | (high << 2);
    }
  }
}

BOA_HD int64_t group_of_column(int64_t j, int64_t group_size, int64_t n_groups) {
  const int64_t g = j / group_size;
  return g < n_groups ? g : n_groups - 1;
}

BOA_HD float dequant_code(uint32_t code, float scale, float zero) {
  return scale * (static_cast<float>(code) - zero);
}

// Vectorised forms for the CUDA GEMV (csrc/cuda/packed_gemv.cu), which holds a tile in registers as its 2·bits
// little-endian 32-bit words (bytes 4k … 4k+3 in word k; for 3 bits words 0–3 are the 2-bit plane, 4–5 the 1-bit
// plane). With bits and q compile-time constants every shift and mask below folds to a constant.

// Codes of the tile's columns 4·q … 4·q+3 (0 ≤ q < 16): the same values as unpack_code(tile, bits, 4·q + j).
BOA_HD void unpack_quad(const uint32_t* words, int bits, int q, uint32_t* codes) {
  for (int j = 0; j < 4; ++j) {
    switch (bits) {
      case 8:  // byte 4q + j
        codes[j] = (words[q] >> (8 * j)) & 255u;
        break;
      case 4:  // byte (4q + j) mod 32, the high nibble for q ≥ 8
        codes[j] = (words[q & 7] >> (8 * j + 4 * (q >> 3))) & 15u;
        break;
      case 2:  // byte (4q + j) mod 16, bit pair q / 4
        codes[j] = (words[q & 3] >> (8 * j + 2 * (q >> 2))) & 3u;
        break;
      default: {  // 3: as 2 bits, plus bit 4q + j of the 64-bit 1-bit plane (words 4, 5) as bit 2
        const uint32_t low = (words[q & 3] >> (8 * j + 2 * (q >> 2))) & 3u;
        const uint32_t high = (words[4 + (q >> 3)] >> (4 * (q & 7) + j)) & 1u;
        codes[j] = low | (high << 2);
      }
    }
  }
}

// code − zero as one float add and no integer-to-float conversion: or-ing a code (< 2²³) into the mantissa of
// 2²³ gives 2²³ + code exactly, and 2²³ + zero (zero an integer < 2²³) is exact too, so their difference is exact.
BOA_HD float biased_zero(float zero) { return 8388608.f + zero; }

BOA_HD float centred_code(uint32_t code, float biased) {
  const uint32_t bits = 0x4B000000u | code;
#if defined(__CUDA_ARCH__)
  const float magic = __uint_as_float(bits);
#else
  float magic;
  std::memcpy(&magic, &bits, sizeof(magic));
#endif
  return magic - biased;
}

}  // namespace boa
