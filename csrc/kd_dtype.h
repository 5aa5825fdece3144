// Host-side storage types for float16 and bfloat16 and their conversions to and from float,
// written out in integer arithmetic so the CPU kernel needs no compiler extension.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kd_row_math.h"

namespace kd {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

inline float to_float(BFloat16 v) { return bit_cast<float>(static_cast<uint32_t>(v.bits) << 16); }

inline float to_float(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
}

// Conversion of an accumulator value to a storage type (round to nearest even).
template <typename T>
T from_acc(float v);

template <>
inline float from_acc<float>(float v) {
  return v;
}

template <>
inline BFloat16 from_acc<BFloat16>(float v) {
  uint32_t u = bit_cast<uint32_t>(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

template <>
inline Half from_acc<Half>(float v) {
  uint32_t u = bit_cast<uint32_t>(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) {  // >= 65536, inf or NaN: inf, or a quiet NaN
    return {static_cast<uint16_t>(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  }
  if (u < 0x38800000u) {  // below 2^-14: subnormal or zero. Adding 0.5 lets the FPU round.
    const float shifted = bit_cast<float>(u) + 0.5f;
    return {static_cast<uint16_t>(sign | (bit_cast<uint32_t>(shifted) - 0x3f000000u))};
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even;
  // a carry out of the mantissa correctly bumps the exponent (up to inf).
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // (15 - 127) << 23 plus the rounding bias, modulo 2^32
  return {static_cast<uint16_t>(sign | (u >> 13))};
}

template <typename T>
inline T from_acc(double v) {
  static_assert(std::is_same_v<T, double>, "float64 accumulation only stores float64");
  return v;
}

}  // namespace kd
