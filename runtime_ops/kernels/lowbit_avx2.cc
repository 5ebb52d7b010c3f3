// LowBitMatMul GEMM with AVX2 (compiled with -mavx2 -mfma, called after cpu_has_avx2()).
// Same layout and algebra as the AVX-512 kernel (lowbit.h), a simpler path: per panel and group,
// one block of 16 outputs (two ymm halves of 8) x 1 or 2 rows at a time; each vector is shifted
// down to the codes, u8 codes x s8 activation quads by vpmaddubsw, the chunk's
// vpmaddubsw results summed in int16 (at most 8 x 2 x 7 x 127, 4 x 2 x 3 x 127 or
// 2 x 2 x 15 x 127: no saturation) then vpmaddwd with ones (int32): the same exact int32
// group sums, the same float epilogue (mul then add) as the other paths.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "lowbit.h"

namespace bfc {
namespace lowbit {
namespace {

template <int BITS>
struct Fmt;
template <>
struct Fmt<4> {
  static constexpr int KS = 8, NVEC = 2;
};
template <>
struct Fmt<2> {
  static constexpr int KS = 16, NVEC = 4;
};
template <>
struct Fmt<3> {
  static constexpr int KS = 32, NVEC = 8;
};

inline __m256i ld(const uint8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i bm(int m) { return _mm256_set1_epi8(char(m)); }
inline __m256i sr(__m256i v, int s) { return _mm256_srli_epi16(v, s); }
inline __m256i andv(__m256i a, __m256i b) { return _mm256_and_si256(a, b); }

// code vector J (codes of inputs 4J .. 4J+3 of the chunk) of half c (outputs 8h .. 8h+7 of one
// block: c points at the half's first byte in the chunk's first line), lowbit.h layout
template <int BITS, int J>
inline __m256i extract(const uint8_t* c) {
  if constexpr (BITS == 4) {
    return J == 0 ? andv(ld(c), bm(15)) : andv(sr(ld(c), 4), bm(15));
  } else if constexpr (BITS == 2) {
    return J == 0 ? andv(ld(c), bm(3)) : andv(sr(ld(c), 2 * J), bm(3));
  } else if constexpr (J < 6) {
    const uint8_t* l = c + 64 * (J / 2);
    return J % 2 == 0 ? andv(ld(l), bm(7)) : andv(sr(ld(l), 3), bm(7));
  } else {
    return _mm256_or_si256(andv(sr(ld(c + 64 * (J - 6)), 6), bm(3)), andv(sr(ld(c + 128), J == 6 ? 4 : 5), bm(4)));
  }
}

inline __m256i bcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm256_set1_epi32(v);
}

template <int I, int N, class F>
inline void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for<I + 1, N>(f);
  }
}

// group gi of rows [r, r + MR) x block v of panel pn into facc (float, row stride 16 * kPanel)
template <int BITS, int MR>
inline void group_tile(const Plan& p, const Act& a, const uint8_t* gb, int nvp, int64_t nch, int64_t gi, int v,
                       int64_t r, float* facc) {
  using F = Fmt<BITS>;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t ng = p.ngroups, cb = p.cb;
  const int8_t* qg[MR];
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = acc[i][1] = _mm256_set1_epi32(-p.zero * a.gsum[(r + i) * ng + gi]);
    qg[i] = a.q + (r + i) * p.Kp + p.gstart[size_t(gi)];
  }
  const uint8_t* line = gb + v * cb;
  for (int64_t c = 0; c < nch; ++c, line += nvp * cb) {
    // int16 sums of the chunk's vpmaddubsw products (no saturation, see the top), then int32
    __m256i s16[MR][2];
    static_for<0, F::NVEC>([&](auto JJ) {
      constexpr int J = decltype(JJ)::value;
      const __m256i e0 = extract<BITS, J>(line), e1 = extract<BITS, J>(line + 32);
      for (int i = 0; i < MR; ++i) {
        const __m256i b = bcast4(qg[i] + c * F::KS + 4 * J);
        const __m256i m0 = _mm256_maddubs_epi16(e0, b), m1 = _mm256_maddubs_epi16(e1, b);
        if constexpr (J == 0) {
          s16[i][0] = m0, s16[i][1] = m1;
        } else {
          s16[i][0] = _mm256_add_epi16(s16[i][0], m0), s16[i][1] = _mm256_add_epi16(s16[i][1], m1);
        }
      }
    });
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h) acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(s16[i][h], ones));
  }
  const float* sc = reinterpret_cast<const float*>(gb + nvp * nch * cb) + 16 * v;  // float32 on this path
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_load_ps(sc + 8 * h);
    for (int i = 0; i < MR; ++i) {
      float* f = facc + i * 16 * kPanel + 16 * v + 8 * h;
      _mm256_store_ps(f, _mm256_add_ps(_mm256_load_ps(f), _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][h]), s)));
    }
  }
}

// group-outer like the AVX-512 kernel: per panel and chunk of up to 8 rows the stream is read in
// order, each group's lines (a few KB) reused from L1 by every row pair and block
template <int BITS>
void gemm_bits(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
               int64_t pn1) {
  constexpr int RC = 8;
  alignas(32) float facc[RC * 16 * kPanel];
  for (int64_t pn = pn0; pn < pn1; ++pn) {
    const int nvp = panel_blocks(p, pn);
    for (int64_t rc = r0; rc < r1; rc += RC) {
      const int64_t re = std::min<int64_t>(r1, rc + RC);
      std::memset(facc, 0, sizeof(facc));
      for (int64_t gi = 0; gi < p.ngroups; ++gi) {
        const uint8_t* gb = group_base(p, pn, nvp, gi);
        const int64_t nch = group_chunks(p, gi);
        for (int v = 0; v < nvp; ++v)
          for (int64_t r = rc; r < re; r += 2) {
            if (r + 1 < re) group_tile<BITS, 2>(p, a, gb, nvp, nch, gi, v, r, facc + (r - rc) * 16 * kPanel);
            else group_tile<BITS, 1>(p, a, gb, nvp, nch, gi, v, r, facc + (r - rc) * 16 * kPanel);
          }
      }
      const int64_t N = p.N, nb = pn * 16 * kPanel, ne = std::min(N, nb + 16 * kPanel);
      for (int64_t r = rc; r < re; ++r)
        for (int64_t n = nb; n < ne; ++n) {
          const float o = facc[(r - rc) * 16 * kPanel + n - nb] * a.cs[r];
          y[r * N + n] = bias != nullptr ? o + bias[n] : o;
        }
    }
  }
}

}  // namespace

void gemm_avx2(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
               int64_t pn1) {
  if (p.bits == 4) gemm_bits<4>(p, a, bias, y, r0, r1, pn0, pn1);
  else if (p.bits == 3) gemm_bits<3>(p, a, bias, y, r0, r1, pn0, pn1);
  else gemm_bits<2>(p, a, bias, y, r0, r1, pn0, pn1);
}

}  // namespace lowbit
}  // namespace bfc
