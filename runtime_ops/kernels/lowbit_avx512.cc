// LowBitMatMul GEMM with AVX-512 VNNI (vpdpbusd).  Compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512vnni, called only after cpu_has_avx512vnni().  Layout and algebra:
// lowbit.h.  Register tile: MR rows x NV blocks of 16 outputs; per quad pair one 64-byte
// line per block unpacks into two u8 weight vectors (& 0x0f, >> 4 & 0x0f), each multiplied
// (vpdpbusd) with the row's s8 activation quad broadcast.  The int32 accumulator of a group
// starts at -z * gsum[r, group] (the zero-point correction, exact), and the group epilogue is
// acc = acc + float(isum) * s (mul then add: the reference's two roundings, no FMA).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "lowbit.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace bfc {
namespace lowbit {
namespace {

template <int MR, int NV>
void tile(const Plan& p, const Act& a, const float* bias, float* y, int64_t r, int64_t nb) {
  const uint8_t* w = p.wp();
  const __m512i m4 = _mm512_set1_epi8(15);
  const int64_t Kp = p.Kp, ng = p.ngroups, Np = p.Np, P = p.P;
  __m512 facc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) facc[i][v] = _mm512_setzero_ps();
  const int8_t* q0 = a.q + r * Kp;
  for (int64_t gi = 0; gi < ng; ++gi) {
    __m512i acc[MR][NV];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i c = _mm512_set1_epi32(-p.zero * a.gsum[(r + i) * ng + gi]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = c;
    }
    const int64_t pr0 = p.gstart[size_t(gi)] / 8, pr1 = p.gstart[size_t(gi + 1)] / 8;
    for (int64_t pr = pr0; pr < pr1; ++pr) {
      __m512i lo[NV], hi[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i raw = _mm512_load_si512(reinterpret_cast<const void*>(w + ((nb + v) * P + pr) * 64));
        lo[v] = _mm512_and_si512(raw, m4);
        hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
      }
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        int32_t qa, qb;
        std::memcpy(&qa, q0 + i * Kp + 8 * pr, 4);
        std::memcpy(&qb, q0 + i * Kp + 8 * pr + 4, 4);
        const __m512i ba = _mm512_set1_epi32(qa), bb = _mm512_set1_epi32(qb);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], lo[v], ba);
          acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], hi[v], bb);
        }
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_loadu_ps(p.sc.data() + gi * Np + (nb + v) * 16);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) facc[i][v] = _mm512_add_ps(facc[i][v], _mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][v]), s));
    }
  }
  const int64_t N = p.N;
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n0 = (nb + v) * 16;
    const __mmask16 mk = n0 + 16 <= N ? __mmask16(0xffff) : __mmask16((1u << (N - n0)) - 1);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m512 o = _mm512_mul_ps(facc[i][v], _mm512_set1_ps(a.cs[r + i]));
      if (bias != nullptr) o = _mm512_add_ps(o, bv);
      _mm512_mask_storeu_ps(y + (r + i) * N + n0, mk, o);
    }
  }
}

template <int NV>
void rows_tile(const Plan& p, const Act& a, const float* bias, float* y, int64_t r, int64_t nr, int64_t nb) {
  switch (nr) {
    case 1: tile<1, NV>(p, a, bias, y, r, nb); break;
    case 2: tile<2, NV>(p, a, bias, y, r, nb); break;
    case 3: tile<3, NV>(p, a, bias, y, r, nb); break;
    default: tile<4, NV>(p, a, bias, y, r, nb); break;
  }
}


// quantize_rows (lowbit.cc) with 16 lanes: the same float ops (mul, NaN -> 0, clamp, round half
// to even by vcvtps2dq under the default MXCSR), so the same int8 values and group sums.
void quantize_avx512_impl(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs) {
  const int64_t K = p.K;
  const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* h = xr + r * K;
    __m512 m0 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(h + k)));
    if (k < K) m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_maskz_loadu_ps(__mmask16((1u << (K - k)) - 1), h + k)));
    const float amax = _mm512_reduce_max_ps(m0);
    float inv;
    cs[r] = amax / 127.f;
    inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 iv = _mm512_set1_ps(inv);
    int8_t* qr = q + r * p.Kp;
    int32_t* gs = gsum + r * p.ngroups;
    for (int64_t gi = 0; gi < p.ngroups; ++gi) {
      const int64_t k0 = gi * p.group, len = std::min(p.group, K - k0);
      const int64_t padded = p.gstart[size_t(gi + 1)] - p.gstart[size_t(gi)];
      int8_t* dst = qr + p.gstart[size_t(gi)];
      __m512i sum = _mm512_setzero_si512();
      for (int64_t j = 0; j < padded; j += 16) {
        const int64_t n = std::min<int64_t>(16, len - j);
        const __mmask16 mk = n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
        __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, h + k0 + j), iv);
        t = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, t, _CMP_ORD_Q), t);
        t = _mm512_min_ps(hi, _mm512_max_ps(lo, t));
        const __m512i v = _mm512_cvtps_epi32(t);
        sum = _mm512_add_epi32(sum, v);
        const int64_t w = std::min<int64_t>(16, padded - j);
        _mm_mask_storeu_epi8(dst + j, __mmask16(w >= 16 ? 0xffff : (1u << w) - 1), _mm512_cvtepi32_epi8(v));
      }
      gs[gi] = _mm512_reduce_add_epi32(sum);
    }
  }
}

}  // namespace

void gemm_avx512(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t nb0,
                 int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; nb += 2) {
    const bool two = nb + 1 < nb1;
    for (int64_t r = r0; r < r1; r += 4) {
      const int64_t nr = std::min<int64_t>(4, r1 - r);
      if (two) rows_tile<2>(p, a, bias, y, r, nr, nb);
      else rows_tile<1>(p, a, bias, y, r, nr, nb);
    }
  }
}

void quantize_avx512(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs) {
  quantize_avx512_impl(p, xr, r0, r1, q, gsum, cs);
}

}  // namespace lowbit
}  // namespace bfc
