// AVX2/FMA layer kernels.  This translation unit alone is compiled with -mavx2 -mfma;
// it is only called after a run-time CPU check (cpu_has_avx2()).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ks_chain.h"
#include "ks_tile.h"

namespace bfc {
namespace ks {
namespace {

template <int MR, int NV, bool FP8>
void f32_t(const Factor& f, const float* in, float* out, int64_t blk0, int64_t blk1) {
  constexpr int NB = 8 * NV;
  const int64_t b = f.b, c = f.c, d = f.d, nkt = f.nkt;
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
      {
        const float* w = f.wf.data() + (blk + kt) * b * MR;
        for (int64_t j = 0; j < b; ++j, xr += NB, w += MR) {
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
  const int64_t bp = f.bp, c = f.c, d = f.d, nkt = f.nkt;
  __m256 cs[NV];
  for (int v = 0; v < NV; ++v) cs[v] = _mm256_load_ps(colscale + 8 * v);
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
      for (int64_t jp = 0; jp < bp; ++jp, xr += 2 * NB, w += 2 * MR) {
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
  for (int n = 0; n < NB; ++n) int8_column_scale(amax[n], &colscale[n], &inv[n]);
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

// Small blocks (b, c <= 4, mr == c): one (i, l) block per iteration, fully unrolled.
// MODE 0: float32, 1: fp8 (decoded weights, scale in the epilogue), 2: int8 quantized on
// the fly in float (exact: see Factor::wf), acc * colscale * scale in the epilogue.
// colmax (may be null): running max |output| per batch column, for the next factor's int8
// quantization (saves its amax pass; max is exact, so the result is the same).
template <int B, int C, int NV, int MODE>
void small_t(const Factor& f, const float* in, const float* inv, const float* cs, float* out, int64_t blk0,
             int64_t blk1, float* colmax) {
  constexpr int NB = 8 * NV;
  const int64_t d = f.d;
  const float* wf = f.wf.data();
  const float* sc = f.sc.data();
  const int32_t* orow_base = f.out_row.data();
  __m256 iv[NV], csv[NV];
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int v = 0; v < NV; ++v) {
    iv[v] = MODE == 2 ? _mm256_loadu_ps(inv + 8 * v) : _mm256_setzero_ps();
    csv[v] = MODE == 2 ? _mm256_loadu_ps(cs + 8 * v) : _mm256_setzero_ps();
  }
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx[NV];
  for (int v = 0; v < NV; ++v) mx[v] = colmax ? _mm256_loadu_ps(colmax + 8 * v) : _mm256_setzero_ps();
  const bool track = colmax != nullptr;
  int64_t i = blk0 / d, l = blk0 % d;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const float* xb = in + blk * B * NB;
    __m256 x[B][NV];
#pragma GCC unroll 4
    for (int j = 0; j < B; ++j)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        __m256 t = _mm256_load_ps(xb + j * NB + 8 * v);
        if (MODE == 2) {
          t = _mm256_mul_ps(t, iv[v]);
          t = _mm256_and_ps(t, _mm256_cmp_ps(t, t, _CMP_ORD_Q));  // NaN -> 0
          t = _mm256_min_ps(hi, _mm256_max_ps(lo, t));
          t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        x[j][v] = t;
      }
    const float* w = wf + blk * B * C;
    const int32_t* orow = orow_base + i * C * d + l;
#pragma GCC unroll 4
    for (int k = 0; k < C; ++k) {
      __m256 acc[NV];
      const __m256 w0 = _mm256_broadcast_ss(w + k);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_mul_ps(w0, x[0][v]);
#pragma GCC unroll 4
      for (int j = 1; j < B; ++j) {
        const __m256 wj = _mm256_broadcast_ss(w + j * C + k);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(wj, x[j][v], acc[v]);
      }
      float* yr = out + int64_t(orow[k * d]) * NB;
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        __m256 o = acc[v];
        if (MODE == 1) o = _mm256_mul_ps(o, _mm256_broadcast_ss(sc + blk * C + k));
        if (MODE == 2) o = _mm256_mul_ps(_mm256_mul_ps(o, csv[v]), _mm256_broadcast_ss(sc + blk * C + k));
        if (track) mx[v] = _mm256_max_ps(mx[v], _mm256_and_ps(absmask, o));
        _mm256_store_ps(yr + 8 * v, o);
      }
    }
    if (++l == d) l = 0, ++i;
  }
  if (track)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(colmax + 8 * v, mx[v]);
}

template <int NV, int MODE>
void small_nv(const Factor& f, const float* in, const float* inv, const float* cs, float* out, int64_t blk0,
              int64_t blk1, float* colmax) {
#define BFC_SMALL_CASE(BB, CC) \
  case (BB) * 8 + (CC): small_t<BB, CC, NV, MODE>(f, in, inv, cs, out, blk0, blk1, colmax); return;
  switch (f.b * 8 + f.c) {
    BFC_SMALL_CASE(1, 1) BFC_SMALL_CASE(1, 2) BFC_SMALL_CASE(1, 3) BFC_SMALL_CASE(1, 4)
    BFC_SMALL_CASE(2, 1) BFC_SMALL_CASE(2, 2) BFC_SMALL_CASE(2, 3) BFC_SMALL_CASE(2, 4)
    BFC_SMALL_CASE(3, 1) BFC_SMALL_CASE(3, 2) BFC_SMALL_CASE(3, 3) BFC_SMALL_CASE(3, 4)
    BFC_SMALL_CASE(4, 1) BFC_SMALL_CASE(4, 2) BFC_SMALL_CASE(4, 3) BFC_SMALL_CASE(4, 4)
    default: break;
  }
#undef BFC_SMALL_CASE
}

// f.path as the MODE of small_t / pair_t: 0 float32, 1 fp8, 2 int8
int path_mode(const Factor& f) { return f.path == Path::FP8 ? 1 : f.path == Path::I8 ? 2 : 0; }

// Butterfly pair f = (a, 2, 2, d), g = (2a, 2, 2, h = d/2) fused in registers.  Unit (i, l),
// l < h: f blocks i*d + l and i*d + l + h (inputs j = 0, 1 each) give f outputs (i, k, l)
// and (i, k, l + h), which are exactly the inputs j' = 0, 1 of g block (2i + k, l).
// MF / MG: 0 float32, 1 fp8 scale, 2 (f only) int8 quantized on the fly.
template <int NV, int MF, int MG>
void pair_t(const Factor& f, const Factor& g, const float* in, const float* inv, const float* cs, float* out,
            int64_t i0, int64_t i1, float* colmax) {
  constexpr int NB = 8 * NV;
  const int64_t d = f.d, h = g.d;
  const float* wf = f.wf.data();
  const float* wg = g.wf.data();
  const float* sf = f.sc.data();
  const float* sg = g.sc.data();
  const int32_t* orow = g.out_row.data();
  __m256 iv[NV], csv[NV];
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int v = 0; v < NV; ++v) {
    iv[v] = MF == 2 ? _mm256_loadu_ps(inv + 8 * v) : _mm256_setzero_ps();
    csv[v] = MF == 2 ? _mm256_loadu_ps(cs + 8 * v) : _mm256_setzero_ps();
  }
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx[NV];
  for (int v = 0; v < NV; ++v) mx[v] = colmax ? _mm256_loadu_ps(colmax + 8 * v) : _mm256_setzero_ps();
  const bool track = colmax != nullptr;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t l = 0; l < h; ++l) {
      const int64_t bA = i * d + l, bB = bA + h;
      const float* xA = in + bA * 2 * NB;
      const float* xB = in + bB * 2 * NB;
      const float* wA = wf + bA * 4;
      const float* wB = wf + bB * 4;
      // batch vectors innermost: each broadcast weight feeds NV FMAs
      __m256 x[4][NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        x[0][v] = _mm256_load_ps(xA + 8 * v);
        x[1][v] = _mm256_load_ps(xA + NB + 8 * v);
        x[2][v] = _mm256_load_ps(xB + 8 * v);
        x[3][v] = _mm256_load_ps(xB + NB + 8 * v);
        if (MF == 2) {
          for (int q = 0; q < 4; ++q) {
            __m256 t = _mm256_mul_ps(x[q][v], iv[v]);
            t = _mm256_and_ps(t, _mm256_cmp_ps(t, t, _CMP_ORD_Q));
            t = _mm256_min_ps(hi, _mm256_max_ps(lo, t));
            x[q][v] = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          }
        }
      }
      // f: y[A|B][k] = w[0*2+k] * x0 + w[1*2+k] * x1  (same order as small_t)
      __m256 y[4][NV];
#pragma GCC unroll 2
      for (int side = 0; side < 2; ++side) {
        const float* w = side ? wB : wA;
        const int64_t bs = side ? bB : bA;
#pragma GCC unroll 2
        for (int k = 0; k < 2; ++k) {
          const __m256 w0 = _mm256_broadcast_ss(w + k), w1 = _mm256_broadcast_ss(w + 2 + k);
          const __m256 s1 = MF ? _mm256_broadcast_ss(sf + bs * 2 + k) : _mm256_setzero_ps();
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) {
            __m256 t = _mm256_fmadd_ps(w1, x[2 * side + 1][v], _mm256_mul_ps(w0, x[2 * side][v]));
            if (MF == 1) t = _mm256_mul_ps(t, s1);
            if (MF == 2) t = _mm256_mul_ps(_mm256_mul_ps(t, csv[v]), s1);
            y[2 * side + k][v] = t;
          }
        }
      }
      // g block (2i + k, l): inputs j' = 0: y[k], j' = 1: y[2 + k]
#pragma GCC unroll 2
      for (int k = 0; k < 2; ++k) {
        const int64_t gb = (2 * i + k) * h + l;
        const float* w = wg + gb * 4;
#pragma GCC unroll 2
        for (int kk = 0; kk < 2; ++kk) {
          const __m256 w0 = _mm256_broadcast_ss(w + kk), w1 = _mm256_broadcast_ss(w + 2 + kk);
          const __m256 s2 = MG ? _mm256_broadcast_ss(sg + gb * 2 + kk) : _mm256_setzero_ps();
          float* dst = out + int64_t(orow[(2 * i + k) * 2 * h + kk * h + l]) * NB;
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) {
            __m256 z = _mm256_fmadd_ps(w1, y[2 + k][v], _mm256_mul_ps(w0, y[k][v]));
            if (MG == 1) z = _mm256_mul_ps(z, s2);
            if (track) mx[v] = _mm256_max_ps(mx[v], _mm256_and_ps(absmask, z));
            _mm256_store_ps(dst + 8 * v, z);
          }
        }
      }
    }
  }
  if (track)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(colmax + 8 * v, mx[v]);
}

void pair_layer(const Factor& f, const Factor& g, const float* in, const float* inv, const float* cs, float* out,
                int nb, int64_t i0, int64_t i1, float* colmax) {
  const int mf = path_mode(f), mg = path_mode(g);  // g is never int8 (pair_ok)
  with_nb(nb, [&](auto NB) {
    constexpr int NV = decltype(NB)::value / 8;
    switch (mf * 2 + mg) {
      case 0: pair_t<NV, 0, 0>(f, g, in, inv, cs, out, i0, i1, colmax); break;
      case 1: pair_t<NV, 0, 1>(f, g, in, inv, cs, out, i0, i1, colmax); break;
      case 2: pair_t<NV, 1, 0>(f, g, in, inv, cs, out, i0, i1, colmax); break;
      case 3: pair_t<NV, 1, 1>(f, g, in, inv, cs, out, i0, i1, colmax); break;
      case 4: pair_t<NV, 2, 0>(f, g, in, inv, cs, out, i0, i1, colmax); break;
      default: pair_t<NV, 2, 1>(f, g, in, inv, cs, out, i0, i1, colmax); break;
    }
  });
}

void amax_layer(const float* in, int64_t nrows, float* colscale, float* inv, int nb) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int v = 0; v < nb / 8; ++v) {
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    const float* p = in + 8 * v;
    int64_t r = 0;
    for (; r + 2 <= nrows; r += 2) {
      m0 = _mm256_max_ps(m0, _mm256_and_ps(absmask, _mm256_load_ps(p + r * nb)));
      m1 = _mm256_max_ps(m1, _mm256_and_ps(absmask, _mm256_load_ps(p + (r + 1) * nb)));
    }
    if (r < nrows) m0 = _mm256_max_ps(m0, _mm256_and_ps(absmask, _mm256_load_ps(p + r * nb)));
    alignas(32) float am[8];
    _mm256_store_ps(am, _mm256_max_ps(m0, m1));
    for (int n = 0; n < 8; ++n) int8_column_scale(am[n], &colscale[8 * v + n], &inv[8 * v + n]);
  }
}

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// 8x8 register transposes: 8 rows x 8 consecutive columns of x -> 8 buffer rows; with
// NB = 16 both halves of a buffer row (one 64-byte line) are written back to back.
void gather_layer(const Plan& p, const float* x, int64_t r0, int64_t nv, int nb, int64_t c0, int64_t c1,
                  float* buf) {
  const int64_t M = p.M;
  const int32_t* gr = p.gather_row.data();
  const int halves = nb / 8;
  int64_t s = c0;
  if (nv == nb) {
    const float* xr[16];
    for (int q = 0; q < nb; ++q) xr[q] = x + (r0 + q) * M;
    // 16 columns (one 64-byte line of each x row) per step
    for (; s + 16 <= c1; s += 16) {
      for (int h = 0; h < halves; ++h) {
        __m256 r[8], t[8];
        for (int q = 0; q < 8; ++q) {
          r[q] = _mm256_loadu_ps(xr[8 * h + q] + s);
          t[q] = _mm256_loadu_ps(xr[8 * h + q] + s + 8);
        }
        transpose8(r);
        transpose8(t);
        for (int q = 0; q < 8; ++q) {
          _mm256_store_ps(buf + int64_t(gr[s + q]) * nb + 8 * h, r[q]);
          _mm256_store_ps(buf + int64_t(gr[s + 8 + q]) * nb + 8 * h, t[q]);
        }
      }
    }
    for (; s + 8 <= c1; s += 8) {
      float* dst[8];
      for (int q = 0; q < 8; ++q) dst[q] = buf + int64_t(gr[s + q]) * nb;
      for (int h = 0; h < halves; ++h) {
        __m256 r[8];
        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(xr[8 * h + q] + s);
        transpose8(r);
        for (int q = 0; q < 8; ++q) _mm256_store_ps(dst[q] + 8 * h, r[q]);
      }
    }
  }
  for (; s < c1; ++s) {
    float* dst = buf + int64_t(gr[s]) * nb;
    for (int q = 0; q < nb; ++q) dst[q] = q < nv ? x[(r0 + q) * M + s] : 0.f;
  }
}

void scatter_layer(const Plan& p, const float* buf, const float* bias, float* y, int64_t r0, int64_t nv,
                   int nb, int64_t c0, int64_t c1) {
  const int64_t N = p.N;
  const int32_t* sr = p.scatter_row.data();
  int64_t o = c0;
  // 16 columns (one 64-byte line of each y row) per step
  for (; o + 16 <= c1; o += 16) {
    const __m256 bv0 = bias ? _mm256_loadu_ps(bias + o) : _mm256_setzero_ps();
    const __m256 bv1 = bias ? _mm256_loadu_ps(bias + o + 8) : _mm256_setzero_ps();
    for (int n0 = 0; n0 < nv; n0 += 8) {
      __m256 r[8], t[8];
      for (int q = 0; q < 8; ++q) {
        r[q] = _mm256_load_ps(buf + int64_t(sr[o + q]) * nb + n0);
        t[q] = _mm256_load_ps(buf + int64_t(sr[o + 8 + q]) * nb + n0);
      }
      transpose8(r);
      transpose8(t);
      const int rows = int(std::min<int64_t>(8, nv - n0));
      for (int q = 0; q < rows; ++q) {
        float* yr = y + (r0 + n0 + q) * N + o;
        _mm256_storeu_ps(yr, bias ? _mm256_add_ps(r[q], bv0) : r[q]);
        _mm256_storeu_ps(yr + 8, bias ? _mm256_add_ps(t[q], bv1) : t[q]);
      }
    }
  }
  for (; o + 8 <= c1; o += 8) {
    const float* src[8];
    for (int q = 0; q < 8; ++q) src[q] = buf + int64_t(sr[o + q]) * nb;
    const __m256 bv = bias ? _mm256_loadu_ps(bias + o) : _mm256_setzero_ps();
    for (int n0 = 0; n0 < nv; n0 += 8) {
      __m256 r[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_load_ps(src[q] + n0);
      transpose8(r);
      const int rows = int(std::min<int64_t>(8, nv - n0));
      for (int q = 0; q < rows; ++q) _mm256_storeu_ps(y + (r0 + n0 + q) * N + o, bias ? _mm256_add_ps(r[q], bv) : r[q]);
    }
  }
  for (; o < c1; ++o) {
    const float* src = buf + int64_t(sr[o]) * nb;
    for (int q = 0; q < nv; ++q) y[(r0 + q) * N + o] = bias ? src[q] + bias[o] : src[q];
  }
}

// small-block kernel for MODE = mode (run-time) and NV = nb / 8
void small_any(int mode, const Factor& f, const float* in, const float* inv, const float* cs, float* out, int nb,
               int64_t blk0, int64_t blk1, float* colmax) {
  with_nb(nb, [&](auto NB) {
    constexpr int NV = decltype(NB)::value / 8;
    if (mode == 0) small_nv<NV, 0>(f, in, inv, cs, out, blk0, blk1, colmax);
    else if (mode == 1) small_nv<NV, 1>(f, in, inv, cs, out, blk0, blk1, colmax);
    else small_nv<NV, 2>(f, in, inv, cs, out, blk0, blk1, colmax);
  });
}

template <bool FP8>
void f32_any(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  if (f.small) return small_any(FP8 ? 1 : 0, f, in, nullptr, nullptr, out, nb, blk0, blk1, nullptr);
  with_nb(nb, [&](auto NB) {
    with_mr(f.mr, [&](auto MR) { f32_t<decltype(MR)::value, decltype(NB)::value / 8, FP8>(f, in, out, blk0, blk1); });
  });
}
void f32_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  f32_any<false>(f, in, out, nb, blk0, blk1);
}
void fp8_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  f32_any<true>(f, in, out, nb, blk0, blk1);
}
void quant_layer(const Factor& f, const float* in, int16_t* q, float* cs, int nb) {
  with_nb(nb, [&](auto NB) { quant_t<decltype(NB)::value / 8>(f, in, q, cs); });
}
void i8_layer(const Factor& f, const int16_t* q, const float* cs, float* out, int nb, int64_t blk0, int64_t blk1) {
  with_nb(nb, [&](auto NB) {
    with_mr(f.mr, [&](auto MR) { i8_t<decltype(MR)::value, decltype(NB)::value / 8>(f, q, cs, out, blk0, blk1); });
  });
}
void small_layer(const Factor& f, const float* in, const float* inv, const float* cs, float* out, int nb,
                 int64_t blk0, int64_t blk1, float* colmax) {
  small_any(path_mode(f), f, in, inv, cs, out, nb, blk0, blk1, colmax);
}
void i8f_layer(const Factor& f, const float* in, const float* inv, const float* cs, float* out, int nb, int64_t blk0,
               int64_t blk1) {
  small_any(2, f, in, inv, cs, out, nb, blk0, blk1, nullptr);
}

}  // namespace

const LayerTable& avx2_table() {
  static const LayerTable t{f32_layer, fp8_layer, quant_layer, i8_layer, amax_layer, i8f_layer, pair_layer, small_layer, gather_layer, scatter_layer, nullptr, nullptr, nullptr, nullptr};
  return t;
}

}  // namespace ks
}  // namespace bfc
