// LowBitMatMul GEMM with AVX2 (compiled with -mavx2 -mfma, called after cpu_has_avx2()).
// Same layout and algebra as the AVX-512 kernel (lowbit.h), a simpler path: one block of 16
// outputs at a time as two ymm halves of 8, 1 or 2 rows per pass; each chunk's vectors are
// shifted down to the codes, u8 codes x s8 activation quads by vpmaddubsw, the chunk's
// vpmaddubsw results summed in int16 (at most 8 x 2 x 7 x 127, 4 x 2 x 3 x 127 or
// 2 x 2 x 15 x 127: no saturation) then vpmaddwd with ones (int32): the same exact int32
// group sums, the same float epilogue (mul then add) as the other paths.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

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

// codes of half h (outputs 8h .. 8h+7) of one chunk of one block (lowbit.h layout)
template <int BITS>
inline void unpack(const uint8_t* c, __m256i* e) {
  if constexpr (BITS == 4) {
    const __m256i raw = ld(c);
    e[0] = andv(raw, bm(15));
    e[1] = andv(sr(raw, 4), bm(15));
  } else if constexpr (BITS == 2) {
    const __m256i raw = ld(c);
    e[0] = andv(raw, bm(3));
    e[1] = andv(sr(raw, 2), bm(3));
    e[2] = andv(sr(raw, 4), bm(3));
    e[3] = andv(sr(raw, 6), bm(3));
  } else {
    const __m256i l0 = ld(c), l1 = ld(c + 64), l2 = ld(c + 128);
    e[0] = andv(l0, bm(7));
    e[1] = andv(sr(l0, 3), bm(7));
    e[2] = andv(l1, bm(7));
    e[3] = andv(sr(l1, 3), bm(7));
    e[4] = andv(l2, bm(7));
    e[5] = andv(sr(l2, 3), bm(7));
    e[6] = _mm256_or_si256(andv(sr(l0, 6), bm(3)), andv(sr(l2, 4), bm(4)));
    e[7] = _mm256_or_si256(andv(sr(l1, 6), bm(3)), andv(sr(l2, 5), bm(4)));
  }
}

inline __m256i bcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm256_set1_epi32(v);
}

template <int BITS, int MR>
void tile(const Plan& p, const Act& a, const float* bias, float* y, int64_t r, int64_t pn, int v) {
  using F = Fmt<BITS>;
  const __m256i ones = _mm256_set1_epi16(1);
  const int nvp = panel_blocks(p, pn);
  const int64_t ng = p.ngroups, cb = p.cb;
  __m256 facc[MR][2];
  for (int i = 0; i < MR; ++i) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < ng; ++gi) {
    const uint8_t* gb = group_base(p, pn, nvp, gi);
    const int64_t nch = group_chunks(p, gi);
    __m256i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_set1_epi32(-p.zero * a.gsum[(r + i) * ng + gi]);
    for (int64_t c = 0; c < nch; ++c) {
      const uint8_t* line = gb + (c * nvp + v) * cb;
      for (int h = 0; h < 2; ++h) {
        __m256i e[F::NVEC];
        unpack<BITS>(line + 32 * h, e);
        for (int i = 0; i < MR; ++i) {
          const int8_t* qc = a.q + (r + i) * p.Kp + p.gstart[size_t(gi)] + c * F::KS;
          __m256i s = _mm256_maddubs_epi16(e[0], bcast4(qc));
          for (int j = 1; j < F::NVEC; ++j) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(e[j], bcast4(qc + 4 * j)));
          acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(s, ones));
        }
      }
    }
    alignas(32) float sc[16];
    const uint8_t* sb = gb + nvp * nch * cb;
    if (p.sc16) {
      for (int n = 0; n < 16; ++n) {
        uint16_t hv;
        std::memcpy(&hv, sb + 32 * v + 2 * n, 2);
        sc[n] = ks::half_to_float(hv);
      }
    } else {
      std::memcpy(sc, sb + 64 * v, 64);
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_load_ps(sc + 8 * h);
      for (int i = 0; i < MR; ++i)
        facc[i][h] = _mm256_add_ps(facc[i][h], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][h]), s));
    }
  }
  const int64_t N = p.N;
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = (pn * kPanel + v) * 16 + 8 * h;
    if (n0 >= N) break;
    const int valid = int(std::min<int64_t>(8, N - n0));
    for (int i = 0; i < MR; ++i) {
      alignas(32) float o[8];
      _mm256_store_ps(o, _mm256_mul_ps(facc[i][h], _mm256_set1_ps(a.cs[r + i])));
      float* yr = y + (r + i) * N + n0;
      for (int k = 0; k < valid; ++k) yr[k] = bias != nullptr ? o[k] + bias[n0 + k] : o[k];
    }
  }
}

template <int BITS>
void gemm_bits(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
               int64_t pn1) {
  for (int64_t pn = pn0; pn < pn1; ++pn)
    for (int v = 0; v < panel_blocks(p, pn); ++v)
      for (int64_t r = r0; r < r1; r += 2) {
        if (r + 1 < r1) tile<BITS, 2>(p, a, bias, y, r, pn, v);
        else tile<BITS, 1>(p, a, bias, y, r, pn, v);
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
