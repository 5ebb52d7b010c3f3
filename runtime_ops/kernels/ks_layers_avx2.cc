// AVX2/FMA layer kernels.  This translation unit alone is compiled with -mavx2 -mfma;
// it is only called after a run-time CPU check (cpu_has_avx2()).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ks_chain.h"

namespace bfc {
namespace ks {
namespace {

template <int MR, int NV, bool FP8>
void f32_t(const Factor& f, const float* in, float* out, int64_t blk0, int64_t blk1) {
  constexpr int NB = 8 * NV;
  const int64_t a = f.a, b = f.b, c = f.c, d = f.d, nkt = f.nkt;
  const int64_t xs = NB;
  const float* lut = f.lut;
  (void)a;
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
      const int64_t i = blk_il / d, l = blk_il % d;
      const float* xb = in + (i * d + l) * b * NB;
      const int32_t* orow = f.out_row.data() + i * c * d + l;
      const int64_t blk = (i * d + l) * nkt;
      for (int64_t kt = 0; kt < nkt; ++kt) {
        __m256 acc[MR][NV];
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
        const float* xr = xb;
        if (FP8) {
          const uint8_t* w = f.w8.data() + (blk + kt) * b * MR;
          for (int64_t j = 0; j < b; ++j, xr += xs, w += MR) {
            __m256 xv[NV];
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) xv[v] = _mm256_load_ps(xr + 8 * v);
#pragma GCC unroll 6
            for (int r = 0; r < MR; ++r) {
              const __m256 wv = _mm256_broadcast_ss(lut + w[r]);
#pragma GCC unroll 2
              for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(wv, xv[v], acc[r][v]);
            }
          }
        } else {
          const float* w = f.wf.data() + (blk + kt) * b * MR;
          for (int64_t j = 0; j < b; ++j, xr += xs, w += MR) {
            __m256 xv[NV];
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) xv[v] = _mm256_load_ps(xr + 8 * v);
#pragma GCC unroll 6
            for (int r = 0; r < MR; ++r) {
              const __m256 wv = _mm256_broadcast_ss(w + r);
#pragma GCC unroll 2
              for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(wv, xv[v], acc[r][v]);
            }
          }
        }
        const int valid = int(std::min<int64_t>(MR, c - kt * MR));
        const float* sc = FP8 ? f.sc.data() + (blk + kt) * MR : nullptr;
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          if (r < valid) {
            float* yr = out + int64_t(orow[(kt * MR + r) * d]) * NB;
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) {
              __m256 o = acc[r][v];
              if (FP8) o = _mm256_mul_ps(o, _mm256_broadcast_ss(sc + r));
              _mm256_store_ps(yr + 8 * v, o);
            }
          }
        }
      }
    }
}

template <int MR, int NV>
void i8_t(const Factor& f, const int16_t* q, const float* colscale, float* out, int64_t blk0, int64_t blk1) {
  constexpr int NB = 8 * NV;
  const int64_t a = f.a, bp = f.bp, c = f.c, d = f.d, nkt = f.nkt;
  const int64_t qs = NB * 2;
  __m256 cs[NV];
  for (int v = 0; v < NV; ++v) cs[v] = _mm256_load_ps(colscale + 8 * v);
  (void)a;
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
      const int64_t i = blk_il / d, l = blk_il % d;
      const int16_t* xb = q + (i * d + l) * bp * NB * 2;
      const int32_t* orow = f.out_row.data() + i * c * d + l;
      const int64_t blk = (i * d + l) * nkt;
      for (int64_t kt = 0; kt < nkt; ++kt) {
        __m256i acc[MR][NV];
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();
        const int16_t* w = f.wq.data() + (blk + kt) * bp * MR * 2;
        const int16_t* xr = xb;
        for (int64_t jp = 0; jp < bp; ++jp, xr += qs, w += 2 * MR) {
          __m256i xv[NV];
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) xv[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xr + 16 * v));
#pragma GCC unroll 6
          for (int r = 0; r < MR; ++r) {
            int32_t pair;
            std::memcpy(&pair, w + 2 * r, 4);
            const __m256i wv = _mm256_set1_epi32(pair);
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(xv[v], wv));
          }
        }
        const int valid = int(std::min<int64_t>(MR, c - kt * MR));
        const float* sc = f.sc.data() + (blk + kt) * MR;
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          if (r < valid) {
            float* yr = out + int64_t(orow[(kt * MR + r) * d]) * NB;
            const __m256 s = _mm256_broadcast_ss(sc + r);
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v)
              _mm256_store_ps(yr + 8 * v, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][v]), cs[v]), s));
          }
        }
      }
    }
}

template <int NV>
void quant_t(const Factor& f, const float* in, int16_t* q, float* colscale) {
  constexpr int NB = 8 * NV;
  const int64_t a = f.a, b = f.b, d = f.d, bp = f.bp, M = f.in_dim();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx[NV];
  for (int v = 0; v < NV; ++v) mx[v] = _mm256_setzero_ps();
  for (int64_t r = 0; r < M; ++r)
    for (int v = 0; v < NV; ++v) mx[v] = _mm256_max_ps(mx[v], _mm256_and_ps(absmask, _mm256_load_ps(in + r * NB + 8 * v)));
  alignas(32) float amax[NB], inv[NB];
  for (int v = 0; v < NV; ++v) _mm256_store_ps(amax + 8 * v, mx[v]);
  for (int n = 0; n < NB; ++n) {
    colscale[n] = amax[n] / 127.f;
    inv[n] = amax[n] > 0.f ? 127.f / amax[n] : 0.f;
  }
  __m256 iv[NV];
  for (int v = 0; v < NV; ++v) iv[v] = _mm256_load_ps(inv + 8 * v);
  const __m256i lo = _mm256_set1_epi32(0xffff);
  const __m256 hi = _mm256_set1_ps(127.f), neg = _mm256_set1_ps(-127.f);
  for (int64_t i = 0; i < a; ++i)
    for (int64_t l = 0; l < d; ++l)
      for (int64_t jp = 0; jp < bp; ++jp) {
        const bool has1 = 2 * jp + 1 < b;
        int16_t* qr = q + ((i * d + l) * bp + jp) * NB * 2;
        const float* x0 = in + ((i * d + l) * b + 2 * jp) * NB;
        const float* x1 = x0 + NB;
        for (int v = 0; v < NV; ++v) {
          // min/max clamp also maps NaN to a finite value before the conversion
          const __m256 f0 = _mm256_min_ps(hi, _mm256_max_ps(neg, _mm256_mul_ps(_mm256_load_ps(x0 + 8 * v), iv[v])));
          const __m256i q0 = _mm256_cvtps_epi32(f0);
          __m256i q1 = _mm256_setzero_si256();
          if (has1) {
            const __m256 f1 = _mm256_min_ps(hi, _mm256_max_ps(neg, _mm256_mul_ps(_mm256_load_ps(x1 + 8 * v), iv[v])));
            q1 = _mm256_cvtps_epi32(f1);
          }
          const __m256i packed = _mm256_or_si256(_mm256_and_si256(q0, lo), _mm256_slli_epi32(q1, 16));
          _mm256_store_si256(reinterpret_cast<__m256i*>(qr + 16 * v), packed);
        }
      }
}

template <int NV, bool FP8>
void f32_nv(const Factor& f, const float* in, float* out, int64_t blk0, int64_t blk1) {
  switch (f.mr) {
    case 1: f32_t<1, NV, FP8>(f, in, out, blk0, blk1); break;
    case 2: f32_t<2, NV, FP8>(f, in, out, blk0, blk1); break;
    case 3: f32_t<3, NV, FP8>(f, in, out, blk0, blk1); break;
    case 4: f32_t<4, NV, FP8>(f, in, out, blk0, blk1); break;
    case 5: f32_t<5, NV, FP8>(f, in, out, blk0, blk1); break;
    default: f32_t<6, NV, FP8>(f, in, out, blk0, blk1); break;
  }
}
template <int NV>
void i8_nv(const Factor& f, const int16_t* q, const float* cs, float* out, int64_t blk0, int64_t blk1) {
  switch (f.mr) {
    case 1: i8_t<1, NV>(f, q, cs, out, blk0, blk1); break;
    case 2: i8_t<2, NV>(f, q, cs, out, blk0, blk1); break;
    case 3: i8_t<3, NV>(f, q, cs, out, blk0, blk1); break;
    case 4: i8_t<4, NV>(f, q, cs, out, blk0, blk1); break;
    case 5: i8_t<5, NV>(f, q, cs, out, blk0, blk1); break;
    default: i8_t<6, NV>(f, q, cs, out, blk0, blk1); break;
  }
}

void f32_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  nb == 8 ? f32_nv<1, false>(f, in, out, blk0, blk1) : f32_nv<2, false>(f, in, out, blk0, blk1);
}
void fp8_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  nb == 8 ? f32_nv<1, true>(f, in, out, blk0, blk1) : f32_nv<2, true>(f, in, out, blk0, blk1);
}
void quant_layer(const Factor& f, const float* in, int16_t* q, float* cs, int nb) {
  nb == 8 ? quant_t<1>(f, in, q, cs) : quant_t<2>(f, in, q, cs);
}
void i8_layer(const Factor& f, const int16_t* q, const float* cs, float* out, int nb, int64_t blk0, int64_t blk1) {
  nb == 8 ? i8_nv<1>(f, q, cs, out, blk0, blk1) : i8_nv<2>(f, q, cs, out, blk0, blk1);
}

}  // namespace

const LayerTable& avx2_table() {
  static const LayerTable t{f32_layer, fp8_layer, quant_layer, i8_layer};
  return t;
}

}  // namespace ks
}  // namespace bfc
