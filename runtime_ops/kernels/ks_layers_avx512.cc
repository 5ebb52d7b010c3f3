// AVX-512 VNNI int8 kernels.  This translation unit alone is compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni; it is only called after a run-time CPU
// check (cpu_has_avx512vnni()).  Float32 / fp8 factors and the small-block kernels reuse
// the AVX2 table (16-wide float FMAs would give the same bits, they are not the bottleneck);
// with AVX512_BF16 (Plan::isa 3) big-block fp8 factors run ks_layers_avx512bf16.cc instead.
//
// int8 big-block factors (vpdpbusd, u8 x s8 -> s32):
//   activations: q = rint(clip(h * 127/amax, -127, 127)) exactly as the other paths, stored
//     as the byte u = q + 128 in groups of 4 consecutive block inputs j = 4*j4 + t:
//     q8[((blk*b4 + j4)*NB + n)*4 + t]  (one 64-byte line = 16 batch columns x 4 inputs);
//     inputs j >= b are padded with u = 128 (q = 0).
//   weights: Factor::wv[((tile*b4 + j4)*mrv + r)*4 + t] = V[i, l, 4*j4 + t, kt*mrv + r]
//     (0 for j >= b), packed once at kernel creation.
//   sum_j u_j w_j = sum_j q_j w_j + 128 * sum_j w_j: Factor::corr holds -128 * sum_j w_j per
//     output, the accumulator's start value.  The sum is exact in int32 (modular wrap of
//     vpdpbusd cancels: the true result |sum q w| <= 65536*127*128 < 2^31), so acc equals the
//     other paths' int32 accumulator bit for bit, and the epilogue
//     (float(acc) * colscale) * scale is the same two roundings in the same order.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ks_chain.h"
#include "ks_tile.h"

// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*()
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace bfc {
namespace ks {
namespace {

// One register tile kernel at two widths: Zmm (NB = 16 batch columns = 16 int32 lanes) and
// Ymm (NB = 8, AVX512VL).  The traits hold the few intrinsics that differ.
struct Zmm {
  static constexpr int NB = 16;
  using I = __m512i;
  using F = __m512;
  static I load(const uint8_t* p) { return _mm512_load_si512(reinterpret_cast<const void*>(p)); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  // acc += x (u8 quads) . the s8 quad at w broadcast to every lane: the embedded-broadcast
  // memory operand ({1to16}), one instruction (GCC 12 emits a separate vpbroadcastd for the
  // intrinsic with _mm512_set1_epi32)
  static I dpbusd_b(I acc, I x, const int8_t* w) {
#if defined(__GNUC__)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*reinterpret_cast<const int32_t*>(w)));
#else
    int32_t quad;
    std::memcpy(&quad, w, 4);
    acc = _mm512_dpbusd_epi32(acc, x, _mm512_set1_epi32(quad));
#endif
    return acc;
  }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static F set1f(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F zerof() { return _mm512_setzero_ps(); }
  static F absmax(F m, F o) { return _mm512_max_ps(m, _mm512_abs_ps(o)); }
  static void store(float* p, F v) { _mm512_store_ps(p, v); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
};
struct Ymm {
  static constexpr int NB = 8;
  using I = __m256i;
  using F = __m256;
  static I load(const uint8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I dpbusd_b(I acc, I x, const int8_t* w) {
#if defined(__GNUC__)
    __asm__("vpdpbusd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*reinterpret_cast<const int32_t*>(w)));
#else
    int32_t quad;
    std::memcpy(&quad, w, 4);
    acc = _mm256_dpbusd_epi32(acc, x, _mm256_set1_epi32(quad));
#endif
    return acc;
  }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static F set1f(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F zerof() { return _mm256_setzero_ps(); }
  static F absmax(F m, F o) { return _mm256_max_ps(m, _mm256_and_ps(o, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)))); }
  static void store(float* p, F v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
};

// 16 batch columns of one input, h * inv -> q = rint(clip(h * inv, -127, 127)) as int32, the
// float ops of the other paths; NaN stays NaN through the clamps (max/min return their second
// operand) and converts to INT_MIN, the one value outside [-127, 127] (pack_quads maps it to q = 0).
inline __m512i quant16(__m512 h, __m512 inv) {
  const __m512 t =
      _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-127.f), _mm512_mul_ps(h, inv)));
  return _mm512_cvtps_epi32(t);  // round to nearest even (MXCSR default)
}

// q of inputs t = 0..3 (quant16) -> one 64-byte line of u8 quads: byte 4n + t = q_t[n] + 128.
// Signed-saturating packs keep [-127, 127] and turn INT_MIN (NaN) into -128; per 128-bit lane
// they leave the bytes input-major ([q0 of columns 4L..4L+3, q1 ..., q2 ..., q3 ...]), one byte
// shuffle makes them column-major, and +128 (mod 256) gives u8 except for -128, which becomes
// 128 (q = 0, NaN -> 0 as the other paths).
inline __m512i pack_quads(__m512i q0, __m512i q1, __m512i q2, __m512i q3) {
  const __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(q0, q1), _mm512_packs_epi32(q2, q3));
  const __m512i s = _mm512_shuffle_epi8(b, _mm512_set4_epi32(0x0f0b0703, 0x0e0a0602, 0x0d090501, 0x0c080400));
  const __m512i m128 = _mm512_set1_epi8(-128);
  return _mm512_mask_sub_epi8(s, _mm512_cmpneq_epi8_mask(s, m128), s, m128);
}

// 16x16 transpose of r[0..15] (r[q][c] -> r[c][q]): unpack, in-lane shuffle, then a 4x4
// transpose of the 128-bit lanes.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // u[4i + k] lane L holds rows 4i..4i+3 of column 4L + k
  for (int k = 0; k < 4; ++k) {
    const __m512 a0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x44), a1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xEE);
    const __m512 a2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x44),
                 a3 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xEE);
    r[k] = _mm512_shuffle_f32x4(a0, a2, 0x88);
    r[4 + k] = _mm512_shuffle_f32x4(a0, a2, 0xDD);
    r[8 + k] = _mm512_shuffle_f32x4(a1, a3, 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(a1, a3, 0xDD);
  }
}

// acc[r] = sum_j q_j w_j for the outputs r of register tile `tile` (Factor::wv) over the block
// input quads xb: the accumulators start at corr = -128 * sum_j w_j (the u8 offset).
template <class V, int MRV>
__attribute__((always_inline)) inline void tile_dot(const Factor& f, const uint8_t* xb, int64_t tile,
                                                    typename V::I (&acc)[MRV]) {
  const int32_t* corr = f.corr.data() + tile * MRV;
#pragma GCC unroll 16
  for (int r = 0; r < MRV; ++r) acc[r] = V::set1(corr[r]);
  const int8_t* w = f.wv.data() + tile * f.b4 * MRV * 4;
  for (int64_t j4 = 0; j4 < f.b4; ++j4, xb += 4 * V::NB, w += 4 * MRV) {
    const typename V::I xv = V::load(xb);
#pragma GCC unroll 16
    for (int r = 0; r < MRV; ++r) acc[r] = V::dpbusd_b(acc[r], xv, w + 4 * r);
  }
}

// TRACK: colmax[0..NB) = max |output| per batch column over blocks [blk0, blk1) (the next
// int8 factor's amax without a pass over the buffer; max is exact, so the same number)
template <class V, int MRV, bool TRACK = false>
void i8_t(const Factor& f, const uint8_t* q, const float* colscale, float* out, int64_t blk0, int64_t blk1,
          float* colmax = nullptr) {
  constexpr int NB = V::NB;
  const int64_t b4 = f.b4, c = f.c, d = f.d, nkt = f.nktv;
  const typename V::F cs = V::loadu(colscale);
  typename V::F mx = V::zerof();
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
    const int64_t i = blk_il / d, l = blk_il % d;
    const uint8_t* xb = q + blk_il * b4 * NB * 4;
    const int32_t* orow = f.out_row.data() + i * c * d + l;
    const int64_t blk = blk_il * nkt;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      typename V::I acc[MRV];
      tile_dot<V, MRV>(f, xb, blk + kt, acc);
      const int valid = int(std::min<int64_t>(MRV, c - kt * MRV));
      const float* sc = f.scv.data() + (blk + kt) * MRV;
#pragma GCC unroll 16
      for (int r = 0; r < MRV; ++r) {
        if (r < valid) {
          float* yr = out + int64_t(orow[(kt * MRV + r) * d]) * NB;
          const typename V::F o = V::mul(V::mul(V::cvt(acc[r]), cs), V::set1f(sc[r]));
          if (TRACK) mx = V::absmax(mx, o);
          V::store(yr, o);
        }
      }
    }
  }
  if (TRACK) V::storeu(colmax, mx);
}

// The last factor writing y directly (Plan::direct_out: d == 1, c % 16 == 0, 16-output register
// tiles, no out_perm): each tile's 16 outputs (features i*c + kt*16 + r, 16 batch rows) are
// transposed in registers and stored as 16 consecutive columns of the nv rows of y (row stride
// ldy), bias added: the scatter pass without the buffer round trip, the same float ops.
void i8_direct(const Factor& f, const uint8_t* q, const float* colscale, const float* bias, float* y, int64_t ldy,
               int64_t nv, int64_t blk0, int64_t blk1) {
  const int64_t b4 = f.b4, c = f.c, nkt = f.nktv;
  const __m512 cs = _mm512_loadu_ps(colscale);
  for (int64_t i = blk0; i < blk1; ++i) {  // d == 1: block i*d + l is i
    const uint8_t* xb = q + i * b4 * 64;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      __m512i acc[16];
      tile_dot<Zmm, 16>(f, xb, i * nkt + kt, acc);
      const float* sc = f.scv.data() + (i * nkt + kt) * 16;
      __m512 o[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r)
        o[r] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r]), cs), _mm512_set1_ps(sc[r]));
      transpose16(o);
      const int64_t col = i * c + kt * 16;
      if (bias != nullptr) {
        const __m512 bv = _mm512_loadu_ps(bias + col);
        for (int64_t n = 0; n < nv; ++n) _mm512_storeu_ps(y + n * ldy + col, _mm512_add_ps(o[n], bv));
      } else {
        for (int64_t n = 0; n < nv; ++n) _mm512_storeu_ps(y + n * ldy + col, o[n]);
      }
    }
  }
}

// Per-column amax of the tile (or the max handed over by the previous factor's epilogue,
// which is the same number), then the u8 quads.  Same float ops as the other paths:
// v = h * inv, NaN -> 0, clamp to [-127, 127], round half to even.
template <int NB>
void quant_t(const Factor& f, const float* in, uint8_t* q, float* colscale, const float* amax_in = nullptr) {
  const int64_t nblk = f.a * f.d, b = f.b, b4 = f.b4, M = f.in_dim();
  alignas(64) float amax[16], inv[16];
  if (amax_in != nullptr) {
    for (int n = 0; n < NB; ++n) amax[n] = amax_in[n];
  } else if (NB == 16) {
    __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
    int64_t r = 0;
    for (; r + 2 <= M; r += 2) {
      m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_load_ps(in + r * 16)));
      m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_load_ps(in + (r + 1) * 16)));
    }
    if (r < M) m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_load_ps(in + r * 16)));
    _mm512_store_ps(amax, _mm512_max_ps(m0, m1));
  } else {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m0 = _mm256_setzero_ps();
    for (int64_t r = 0; r < M; ++r) m0 = _mm256_max_ps(m0, _mm256_and_ps(absmask, _mm256_load_ps(in + r * 8)));
    _mm256_store_ps(amax, m0);
  }
  for (int n = 0; n < NB; ++n) int8_column_scale(amax[n], &colscale[n], &inv[n]);
  if (NB == 16) {
    const __m512 iv = _mm512_load_ps(inv);
    const __m512i zero = _mm512_setzero_si512();  // padding inputs j >= b: q = 0
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const float* x = in + blk * b * 16;
      uint8_t* qb = q + blk * b4 * 64;
      int64_t j4 = 0;
      for (; 4 * j4 + 4 <= b; ++j4) {
        const float* p = x + 4 * j4 * 16;
        const __m512i u = pack_quads(quant16(_mm512_load_ps(p), iv), quant16(_mm512_load_ps(p + 16), iv),
                                     quant16(_mm512_load_ps(p + 32), iv), quant16(_mm512_load_ps(p + 48), iv));
        _mm512_store_si512(reinterpret_cast<void*>(qb + j4 * 64), u);
      }
      if (j4 < b4) {
        __m512i v[4];
        for (int t = 0; t < 4; ++t) v[t] = 4 * j4 + t < b ? quant16(_mm512_load_ps(x + (4 * j4 + t) * 16), iv) : zero;
        _mm512_store_si512(reinterpret_cast<void*>(qb + j4 * 64), pack_quads(v[0], v[1], v[2], v[3]));
      }
    }
  } else {
    const __m256 iv = _mm256_load_ps(inv);
    const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
    const __m256i off = _mm256_set1_epi32(128);
    auto qv = [&](const float* p) {
      __m256 t = _mm256_mul_ps(_mm256_load_ps(p), iv);
      t = _mm256_and_ps(t, _mm256_cmp_ps(t, t, _CMP_ORD_Q));
      t = _mm256_min_ps(hi, _mm256_max_ps(lo, t));
      return _mm256_add_epi32(_mm256_cvtps_epi32(t), off);
    };
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const float* x = in + blk * b * 8;
      uint8_t* qb = q + blk * b4 * 32;
      for (int64_t j4 = 0; j4 < b4; ++j4) {
        __m256i u = _mm256_setzero_si256();
        for (int t = 0; t < 4; ++t) {
          const __m256i v = 4 * j4 + t < b ? qv(x + (4 * j4 + t) * 8) : off;
          u = _mm256_or_si256(u, _mm256_sllv_epi32(v, _mm256_set1_epi32(8 * t)));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(qb + j4 * 32), u);
      }
    }
  }
}

void quant_layer(const Factor& f, const float* in, int16_t* q, float* cs, int nb) {
  uint8_t* q8 = reinterpret_cast<uint8_t*>(q);
  if (nb == 8) quant_t<8>(f, in, q8, cs);
  else quant_t<16>(f, in, q8, cs);
}

void quant_am_layer(const Factor& f, const float* in, const float* amax, int16_t* q, float* cs, int nb) {
  uint8_t* q8 = reinterpret_cast<uint8_t*>(q);
  if (nb == 8) quant_t<8>(f, in, q8, cs, amax);
  else quant_t<16>(f, in, q8, cs, amax);
}

void i8m_layer(const Factor& f, const int16_t* q, const float* cs, float* out, int nb, int64_t blk0, int64_t blk1,
               float* colmax) {
  const uint8_t* q8 = reinterpret_cast<const uint8_t*>(q);
  with_mrv(f.mrv, [&](auto MRV) {
    constexpr int R = decltype(MRV)::value;
    if (nb == 8) i8_t<Ymm, R, true>(f, q8, cs, out, blk0, blk1, colmax);
    else i8_t<Zmm, R, true>(f, q8, cs, out, blk0, blk1, colmax);
  });
}

void i8y_layer(const Factor& f, const int16_t* q, const float* cs, const float* bias, float* y, int64_t ldy, int64_t nv,
               int64_t blk0, int64_t blk1) {
  i8_direct(f, reinterpret_cast<const uint8_t*>(q), cs, bias, y, ldy, nv, blk0, blk1);
}

void i8_layer(const Factor& f, const int16_t* q, const float* cs, float* out, int nb, int64_t blk0, int64_t blk1) {
  const uint8_t* q8 = reinterpret_cast<const uint8_t*>(q);
  with_mrv(f.mrv, [&](auto MRV) {
    constexpr int R = decltype(MRV)::value;
    if (nb == 8) i8_t<Ymm, R>(f, q8, cs, out, blk0, blk1);
    else i8_t<Zmm, R>(f, q8, cs, out, blk0, blk1);
  });
}


// Full 16-row tiles: 16 columns of 16 x rows (one 64-byte line each) -> 16 whole buffer
// lines (the AVX2 version writes each line in two halves, 8 rows apart).  Other cases and
// column tails: the AVX2 gather.
void gather_layer(const Plan& p, const float* x, int64_t r0, int64_t nv, int nb, int64_t c0, int64_t c1,
                  float* buf) {
  int64_t s = c0;
  if (nb == 16 && nv == 16) {
    const int64_t M = p.M;
    const int32_t* gr = p.gather_row.data();
    const float* xr = x + r0 * M;
    for (; s + 16 <= c1; s += 16) {
      __m512 r[16];
      for (int q = 0; q < 16; ++q) r[q] = _mm512_loadu_ps(xr + q * M + s);
      transpose16(r);
      for (int k = 0; k < 16; ++k) _mm512_store_ps(buf + int64_t(gr[s + k]) * 16, r[k]);
    }
  }
  if (s < c1) avx2_table().gather(p, x, r0, nv, nb, s, c1, buf);
}

// Plan::gather_q: per-row amax straight from x (16 rows, nv valid, the others zero as the
// unfused gather leaves them), then 16x16 transposes whose columns are quantized and packed
// four at a time into the u8 quads quant_t writes: storage rows R..R+3 (R % 4 == 0, b % 4 == 0)
// are quad line R/4.  Same values, same float ops, same bits as gather + quant.
void gather_q_layer(const Plan& p, const Factor& f, const float* x, int64_t r0, int64_t nv, int16_t* q16,
                    float* colscale) {
  (void)f;
  uint8_t* q = reinterpret_cast<uint8_t*>(q16);
  const int64_t M = p.M;
  const float* xr = x + r0 * M;
  alignas(64) float amax[16], inv[16];
  for (int n = 0; n < 16; ++n) {
    if (n >= nv) {
      amax[n] = 0.f;
      continue;
    }
    const float* row = xr + n * M;
    __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 32 <= M; s += 32) {
      m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(row + s)));
      m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(row + s + 16)));
    }
    if (s < M) m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(row + s)));
    amax[n] = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  }
  for (int n = 0; n < 16; ++n) int8_column_scale(amax[n], &colscale[n], &inv[n]);
  const __m512 iv = _mm512_load_ps(inv);
  if (p.gather_q == 2) {
    const int64_t ng = int64_t(p.gq_lines.size()) / 16;
    for (int64_t g = 0; g < ng; ++g) {
      __m512i qt[4][16];
      for (int t = 0; t < 4; ++t) {
        const float* src = xr + p.gq_src[size_t(4 * g + t)];
        __m512 r[16];
        for (int k = 0; k < 16; ++k) r[k] = k < nv ? _mm512_loadu_ps(src + k * M) : _mm512_setzero_ps();
        transpose16(r);
        for (int k = 0; k < 16; ++k) qt[t][k] = quant16(r[k], iv);
      }
      const int32_t* ln = p.gq_lines.data() + 16 * g;
      for (int k = 0; k < 16; ++k)
        _mm512_store_si512(reinterpret_cast<void*>(q + int64_t(ln[k]) * 64),
                           pack_quads(qt[0][k], qt[1][k], qt[2][k], qt[3][k]));
    }
    return;
  }
  const int32_t* gr = p.gather_row.data();
  for (int64_t s = 0; s < M; s += 16) {
    __m512 r[16];
    for (int k = 0; k < 16; ++k) r[k] = k < nv ? _mm512_loadu_ps(xr + k * M + s) : _mm512_setzero_ps();
    transpose16(r);
    for (int g = 0; g < 16; g += 4) {
      const __m512i u = pack_quads(quant16(r[g], iv), quant16(r[g + 1], iv), quant16(r[g + 2], iv),
                                   quant16(r[g + 3], iv));
      _mm512_store_si512(reinterpret_cast<void*>(q + int64_t(gr[s + g] / 4) * 64), u);
    }
  }
}

void scatter_layer(const Plan& p, const float* buf, const float* bias, float* y, int64_t r0, int64_t nv, int nb,
                   int64_t c0, int64_t c1) {
  int64_t o = c0;
  if (nb == 16) {
    const int64_t N = p.N;
    const int32_t* sr = p.scatter_row.data();
    for (; o + 16 <= c1; o += 16) {
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(buf + int64_t(sr[o + k]) * 16);
      transpose16(r);
      const __m512 bv = bias ? _mm512_loadu_ps(bias + o) : _mm512_setzero_ps();
      for (int q = 0; q < nv; ++q) _mm512_storeu_ps(y + (r0 + q) * N + o, bias ? _mm512_add_ps(r[q], bv) : r[q]);
    }
  }
  if (o < c1) avx2_table().scatter(p, buf, bias, y, r0, nv, nb, o, c1);
}

}  // namespace

const LayerTable& avx512_table() {
  static const LayerTable t = [] {
    LayerTable r = avx2_table();
    r.quant = quant_layer;
    r.i8 = i8_layer;
    r.gather = gather_layer;
    r.scatter = scatter_layer;
    r.gather_q = gather_q_layer;
    r.quant_am = quant_am_layer;
    r.i8m = i8m_layer;
    r.i8y = i8y_layer;
    return r;
  }();
  return t;
}

}  // namespace ks
}  // namespace bfc
