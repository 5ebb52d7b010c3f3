// fp8 factors through AVX512_BF16 dot products (vdpbf16ps).  Compiled with -mavx512f
// -mavx512bw -mavx512vl -mavx512bf16; used only when Plan::isa == 3 (cpu_has_avx512bf16()).
//
// Every e4m3fn / e5m2 value is exactly a bfloat16 (3 or 2 mantissa bits, exponents inside
// bf16's range, subnormals included), so the weights are decoded once at kernel creation:
//   Factor::wb[((tile*bp + jp)*mrv + r)] = bf16(V[i,l,2jp,k]) | bf16(V[i,l,2jp+1,k]) << 16,
//   tile = (i*d + l)*nktv + kt, k = kt*mrv + r (0 past b or c), scale in Factor::scv.
// The activations of each block are rounded to bf16 (round to nearest even, vcvtneps2bf16)
// and interleaved in pairs per batch column (one 32-bit lane = inputs 2jp, 2jp+1 of one
// column); vdpbf16ps multiplies them exactly and accumulates in float32.  Output =
// acc * scale (the fp32-decode path's epilogue).  Numerics: bf16 activations, float32
// accumulation (bfc/ops.py emulates the bf16 rounding, not the summation order).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ks_chain.h"
#include "ks_tile.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace bfc {
namespace ks {
namespace {

template <class F>
inline void with_mrv(int mrv, F&& f) {
  switch (mrv) {
    case 4: f(Int<4>{}); break;
    case 8: f(Int<8>{}); break;
    case 12: f(Int<12>{}); break;
    default: f(Int<16>{}); break;
  }
}

// block inputs (b rows of 16 floats) -> bp rows of 16 bf16 pairs
inline void pairs16(const float* x, int64_t b, uint32_t* out) {
  for (int64_t jp = 0; 2 * jp < b; ++jp) {
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(x + 2 * jp * 16)));
    const __m512 x1 = 2 * jp + 1 < b ? _mm512_load_ps(x + (2 * jp + 1) * 16) : _mm512_setzero_ps();
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x1));
    _mm512_store_si512(reinterpret_cast<void*>(out + jp * 16), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

inline void pairs8(const float* x, int64_t b, uint32_t* out) {
  for (int64_t jp = 0; 2 * jp < b; ++jp) {
    const __m256i lo = _mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh(_mm256_load_ps(x + 2 * jp * 8)));
    const __m256 x1 = 2 * jp + 1 < b ? _mm256_load_ps(x + (2 * jp + 1) * 8) : _mm256_setzero_ps();
    const __m256i hi = _mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh(x1));
    _mm256_store_si256(reinterpret_cast<__m256i*>(out + jp * 8), _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16)));
  }
}

uint32_t* pair_buffer(size_t n) {
  thread_local std::vector<uint32_t> buf;
  if (buf.size() < n + 16) buf.resize(n + 16);
  return reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

template <int MRV>
void fp8_16(const Factor& f, const float* in, float* out, int64_t blk0, int64_t blk1) {
  constexpr int NB = 16;
  const int64_t b = f.b, bp = f.bp, c = f.c, d = f.d, nkt = f.nktv;
  uint32_t* xp = pair_buffer(size_t(bp * NB));
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
    const int64_t i = blk_il / d, l = blk_il % d;
    pairs16(in + blk_il * b * NB, b, xp);
    const int32_t* orow = f.out_row.data() + i * c * d + l;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const int64_t tile = blk_il * nkt + kt;
      __m512 acc[MRV];
#pragma GCC unroll 16
      for (int r = 0; r < MRV; ++r) acc[r] = _mm512_setzero_ps();
      const uint32_t* w = f.wb.data() + tile * bp * MRV;
      for (int64_t jp = 0; jp < bp; ++jp, w += MRV) {
        const __m512bh xv = (__m512bh)_mm512_load_si512(reinterpret_cast<const void*>(xp + jp * NB));
#pragma GCC unroll 16
        for (int r = 0; r < MRV; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_set1_epi32(int32_t(w[r])));
      }
      const int valid = int(std::min<int64_t>(MRV, c - kt * MRV));
      const float* sc = f.scv.data() + tile * MRV;
#pragma GCC unroll 16
      for (int r = 0; r < MRV; ++r)
        if (r < valid)
          _mm512_store_ps(out + int64_t(orow[(kt * MRV + r) * d]) * NB, _mm512_mul_ps(acc[r], _mm512_set1_ps(sc[r])));
    }
  }
}

template <int MRV>
void fp8_8(const Factor& f, const float* in, float* out, int64_t blk0, int64_t blk1) {
  constexpr int NB = 8;
  const int64_t b = f.b, bp = f.bp, c = f.c, d = f.d, nkt = f.nktv;
  uint32_t* xp = pair_buffer(size_t(bp * NB));
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
    const int64_t i = blk_il / d, l = blk_il % d;
    pairs8(in + blk_il * b * NB, b, xp);
    const int32_t* orow = f.out_row.data() + i * c * d + l;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const int64_t tile = blk_il * nkt + kt;
      __m256 acc[MRV];
#pragma GCC unroll 16
      for (int r = 0; r < MRV; ++r) acc[r] = _mm256_setzero_ps();
      const uint32_t* w = f.wb.data() + tile * bp * MRV;
      for (int64_t jp = 0; jp < bp; ++jp, w += MRV) {
        const __m256bh xv = (__m256bh)_mm256_load_si256(reinterpret_cast<const __m256i*>(xp + jp * NB));
#pragma GCC unroll 16
        for (int r = 0; r < MRV; ++r)
          acc[r] = _mm256_dpbf16_ps(acc[r], xv, (__m256bh)_mm256_set1_epi32(int32_t(w[r])));
      }
      const int valid = int(std::min<int64_t>(MRV, c - kt * MRV));
      const float* sc = f.scv.data() + tile * MRV;
#pragma GCC unroll 16
      for (int r = 0; r < MRV; ++r)
        if (r < valid)
          _mm256_store_ps(out + int64_t(orow[(kt * MRV + r) * d]) * NB, _mm256_mul_ps(acc[r], _mm256_set1_ps(sc[r])));
    }
  }
}

void fp8_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  if (f.wb.empty()) return avx512_table().fp8(f, in, out, nb, blk0, blk1);  // small factors: fp32 decode
  with_mrv(f.mrv, [&](auto MRV) {
    constexpr int R = decltype(MRV)::value;
    if (nb == 8) fp8_8<R>(f, in, out, blk0, blk1);
    else fp8_16<R>(f, in, out, blk0, blk1);
  });
}

}  // namespace

const LayerTable& avx512bf16_table() {
  static const LayerTable t = [] {
    LayerTable r = avx512_table();
    r.fp8 = fp8_layer;
    return r;
  }();
  return t;
}

}  // namespace ks
}  // namespace bfc
