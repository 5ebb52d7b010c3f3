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

// The kernel at two widths: Zmm (NB = 16 batch columns) and Ymm (NB = 8, AVX512VL).
struct Zmm {
  static constexpr int NB = 16;
  using F = __m512;
  using I = __m512i;
  using BH = __m512bh;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  // bf16 of 16 floats, zero-extended into the low half of 16 int32 lanes
  static I bf16_lanes(F v) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)); }
  static I pair(I lo, I hi) { return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)); }
  static void store_i(uint32_t* p, I v) { _mm512_store_si512(reinterpret_cast<void*>(p), v); }
  static BH load_bh(const uint32_t* p) { return (BH)_mm512_load_si512(reinterpret_cast<const void*>(p)); }
  static F dot(F acc, BH x, uint32_t w) { return _mm512_dpbf16_ps(acc, x, (BH)_mm512_set1_epi32(int32_t(w))); }
  static void store_scaled(float* p, F v, float s) { _mm512_store_ps(p, _mm512_mul_ps(v, _mm512_set1_ps(s))); }
};
struct Ymm {
  static constexpr int NB = 8;
  using F = __m256;
  using I = __m256i;
  using BH = __m256bh;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static I bf16_lanes(F v) { return _mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh(v)); }
  static I pair(I lo, I hi) { return _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16)); }
  static void store_i(uint32_t* p, I v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
  static BH load_bh(const uint32_t* p) { return (BH)_mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static F dot(F acc, BH x, uint32_t w) { return _mm256_dpbf16_ps(acc, x, (BH)_mm256_set1_epi32(int32_t(w))); }
  static void store_scaled(float* p, F v, float s) { _mm256_store_ps(p, _mm256_mul_ps(v, _mm256_set1_ps(s))); }
};

uint32_t* pair_buffer(size_t n) {
  thread_local std::vector<uint32_t> buf;
  if (buf.size() < n + 16) buf.resize(n + 16);
  return reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

template <class V, int MRV>
void fp8_t(const Factor& f, const float* in, float* out, int64_t blk0, int64_t blk1) {
  constexpr int NB = V::NB;
  const int64_t b = f.b, bp = f.bp, c = f.c, d = f.d, nkt = f.nktv;
  uint32_t* xp = pair_buffer(size_t(bp * NB));
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
    const int64_t i = blk_il / d, l = blk_il % d;
    // the block's b input rows -> bp rows of bf16 pairs (inputs 2jp, 2jp+1 of one column per lane)
    const float* x = in + blk_il * b * NB;
    for (int64_t jp = 0; 2 * jp < b; ++jp) {
      const typename V::F x1 = 2 * jp + 1 < b ? V::load(x + (2 * jp + 1) * NB) : V::zero();
      V::store_i(xp + jp * NB, V::pair(V::bf16_lanes(V::load(x + 2 * jp * NB)), V::bf16_lanes(x1)));
    }
    const int32_t* orow = f.out_row.data() + i * c * d + l;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const int64_t tile = blk_il * nkt + kt;
      typename V::F acc[MRV];
#pragma GCC unroll 16
      for (int r = 0; r < MRV; ++r) acc[r] = V::zero();
      const uint32_t* w = f.wb.data() + tile * bp * MRV;
      for (int64_t jp = 0; jp < bp; ++jp, w += MRV) {
        const typename V::BH xv = V::load_bh(xp + jp * NB);
#pragma GCC unroll 16
        for (int r = 0; r < MRV; ++r) acc[r] = V::dot(acc[r], xv, w[r]);
      }
      const int valid = int(std::min<int64_t>(MRV, c - kt * MRV));
      const float* sc = f.scv.data() + tile * MRV;
#pragma GCC unroll 16
      for (int r = 0; r < MRV; ++r)
        if (r < valid) V::store_scaled(out + int64_t(orow[(kt * MRV + r) * d]) * NB, acc[r], sc[r]);
    }
  }
}

void fp8_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  if (f.wb.empty()) return avx512_table().fp8(f, in, out, nb, blk0, blk1);  // small factors: fp32 decode
  with_mrv(f.mrv, [&](auto MRV) {
    constexpr int R = decltype(MRV)::value;
    if (nb == 8) fp8_t<Ymm, R>(f, in, out, blk0, blk1);
    else fp8_t<Zmm, R>(f, in, out, blk0, blk1);
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
