// LowBitMatMul GEMM with AVX2 (compiled with -mavx2 -mfma, called after cpu_has_avx2()).
// Same layout and algebra as the AVX-512 kernel (lowbit.h): one 16-output block is two ymm
// halves of 8 outputs; u8 weights x s8 activation quads by vpmaddubsw (|u q + u' q'| <=
// 2 * 15 * 127: no int16 saturation) then vpmaddwd with ones (int32 sums of 4): the same
// exact int32 group sums, the same float epilogue (mul then add) as the other paths.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "lowbit.h"

namespace bfc {
namespace lowbit {
namespace {

template <int MR>
void tile(const Plan& p, const Act& a, const float* bias, float* y, int64_t r, int64_t nb) {
  const uint8_t* w = p.wp();
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t Kp = p.Kp, ng = p.ngroups, Np = p.Np, P = p.P;
  __m256 facc[MR][2];
  for (int i = 0; i < MR; ++i) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
  const int8_t* q0 = a.q + r * Kp;
  for (int64_t gi = 0; gi < ng; ++gi) {
    __m256i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_set1_epi32(-p.zero * a.gsum[(r + i) * ng + gi]);
    const int64_t pr0 = p.gstart[size_t(gi)] / 8, pr1 = p.gstart[size_t(gi + 1)] / 8;
    for (int64_t pr = pr0; pr < pr1; ++pr) {
      const uint8_t* line = w + (nb * P + pr) * 64;
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(line + 32 * h));
        lo[h] = _mm256_and_si256(raw, m4);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
      }
      for (int i = 0; i < MR; ++i) {
        int32_t qa, qb;
        std::memcpy(&qa, q0 + i * Kp + 8 * pr, 4);
        std::memcpy(&qb, q0 + i * Kp + 8 * pr + 4, 4);
        const __m256i ba = _mm256_set1_epi32(qa), bb = _mm256_set1_epi32(qb);
        for (int h = 0; h < 2; ++h) {
          const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], ba), _mm256_maddubs_epi16(hi[h], bb));
          acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(s, ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(p.sc.data() + gi * Np + nb * 16 + 8 * h);
      for (int i = 0; i < MR; ++i)
        facc[i][h] = _mm256_add_ps(facc[i][h], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][h]), s));
    }
  }
  const int64_t N = p.N;
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = nb * 16 + 8 * h;
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

}  // namespace

void gemm_avx2(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t nb0,
               int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb)
    for (int64_t r = r0; r < r1; r += 2) {
      if (r + 1 < r1) tile<2>(p, a, bias, y, r, nb);
      else tile<1>(p, a, bias, y, r, nb);
    }
}

}  // namespace lowbit
}  // namespace bfc
