// LowBitMatMul GEMM / GEMV with AVX-512 VNNI (vpdpbusd).  Compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512vnni, called only after cpu_has_avx512vnni().  Layout and algebra: lowbit.h.
// One call of panel_rows computes R rows x one panel (up to 64 outputs) over all groups, reading
// the panel's stream once, in order (with software prefetch): for the decoder GEMV (rows <=
// kGemvRows) every row of the call is in the same pass, so the weights are streamed once per call.
// Per chunk, vector j of NV blocks is unpacked (Mode: masked in place, e_j * 2^sh_j as u8, one vpand
// per vector; or shifted down to the codes) and each row's s8 activation quad is broadcast once
// and multiplied (vpdpbusd, register operands) into the NV blocks' int32 accumulator of j's shift
// class: broadcasts cost an issue slot like the dot products on these cores, so each serves NV
// blocks.  Per group (and every kSegChunks chunks, which keeps every class sum below 2^31) the
// class sums are shifted right exactly and added to isum, which starts at -z * gsum[r, group]
// (the zero-point correction).  The group epilogue is acc = acc + float(isum) * s (mul then add:
// the reference's two roundings, no FMA), s the group's float16 (vcvtph2ps, exact) or float32
// scales that follow the group's chunks in the stream.  Larger batches run passes of 8 rows.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ks_tile.h"
#include "lowbit.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace bfc {
namespace lowbit {
namespace {

template <int BITS>
struct Fmt;
// ks inputs per chunk, lines per chunk and block, vectors per chunk (lowbit.h)
template <>
struct Fmt<4> {
  static constexpr int KS = 8, LINES = 1, NVEC = 2;
};
template <>
struct Fmt<2> {
  static constexpr int KS = 16, LINES = 1, NVEC = 4;
};
template <>
struct Fmt<3> {
  static constexpr int KS = 32, LINES = 3, NVEC = 8;
};

// Unpack modes: how far each vector is shifted down, which sets its accumulator class.
//   kInPlace: masked in place only (e_j * 2^sh_j), one class per distinct sh (4-bit 2, 2-bit 4, 3-bit 4)
//   kHalf:    2-bit: the upper crumbs shifted by 4 once (classes sh 0, 2); 3-bit: e6, e7 shifted
//             down (classes sh 0, 3); 4-bit: as kFull
//   kFull:    every vector shifted down to the codes (one class)
enum Mode { kInPlace = 0, kHalf = 1, kFull = 2 };

template <int BITS, int MODE>
struct Cls {
  static constexpr int count() {
    if (MODE == kFull || (BITS == 4 && MODE == kHalf)) return 1;
    if (MODE == kHalf) return 2;
    return BITS == 4 ? 2 : 4;
  }
  static constexpr int of(int j) {
    if (count() == 1) return 0;
    if (BITS == 4) return j;
    if (BITS == 2) return MODE == kHalf ? j % 2 : j;
    if (MODE == kHalf) return j < 6 ? j % 2 : 0;
    return j < 6 ? j % 2 : j - 4;
  }
  static constexpr int shift(int c) {
    if (BITS == 4) return 4 * c;
    if (BITS == 2) return 2 * c;
    return c == 0 ? 0 : c == 1 ? 3 : c + 2;
  }
};

inline __m512i bmask(int m) { return _mm512_set1_epi8(char(m)); }
inline __m512i ld(const uint8_t* p) { return _mm512_load_si512(reinterpret_cast<const void*>(p)); }
inline __m512i andm(const uint8_t* p, int m) { return _mm512_and_si512(ld(p), bmask(m)); }
inline __m512i andv(__m512i v, int m) { return _mm512_and_si512(v, bmask(m)); }
inline __m512i sr(__m512i v, int s) { return _mm512_srli_epi16(v, unsigned(s)); }

// vector J of one chunk of one block at c, as e_J << shift(of(J)) (lowbit.h layout)
template <int BITS, int MODE, int J>
inline __m512i extract(const uint8_t* c) {
  if constexpr (BITS == 4) {
    if constexpr (J == 0) return andm(c, 0x0f);
    else if constexpr (MODE == kInPlace) return andm(c, 0xf0);
    else return andv(sr(ld(c), 4), 0x0f);
  } else if constexpr (BITS == 2) {
    if constexpr (MODE == kInPlace) return andm(c, 3 << (2 * J));
    else if constexpr (MODE == kHalf) return J < 2 ? andm(c, 3 << (2 * J)) : andv(sr(ld(c), 4), 3 << (2 * (J - 2)));
    else return J == 0 ? andm(c, 3) : andv(sr(ld(c), 2 * J), 3);
  } else {
    if constexpr (J < 6) {
      const uint8_t* l = c + 64 * (J / 2);
      if constexpr (J % 2 == 0) return andm(l, 0x07);
      else if constexpr (MODE == kFull) return andv(sr(ld(l), 3), 0x07);
      else return andm(l, 0x38);
    } else if constexpr (MODE == kInPlace) {
      if constexpr (J == 6) return _mm512_or_si512(andv(sr(ld(c), 2), 0x30), andm(c + 128, 0x40));
      else return _mm512_or_si512(andv(sr(ld(c + 64), 1), 0x60), andm(c + 128, 0x80));
    } else {
      if constexpr (J == 6) return _mm512_or_si512(andv(sr(ld(c), 6), 0x03), andv(sr(ld(c + 128), 4), 0x04));
      else return _mm512_or_si512(andv(sr(ld(c + 64), 6), 0x03), andv(sr(ld(c + 128), 5), 0x04));
    }
  }
}

// acc += e (u8) . b (s8 quads).  Inline asm: GCC 12 copies the accumulator around every
// _mm512_dpbusd_epi32 in these loops (the tied operand is not coalesced).
inline __m512i dp(__m512i acc, __m512i e, __m512i b) {
#if defined(__GNUC__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(e), "v"(b));
#else
  acc = _mm512_dpbusd_epi32(acc, e, b);
#endif
  return acc;
}

inline __m512i bcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm512_set1_epi32(v);
}

template <int I, int N, class F>
inline void static_for(F&& f) {
  if constexpr (I < N) {
    f(ks::Int<I>{});
    static_for<I + 1, N>(f);
  }
}

// isum[r][v] (exact int32) of rows r < R over one group for blocks [vs, vs + NV) of the panel;
// gb: the group's stream, qg[r]: row r's activations at the group's padded start.  Each
// activation quad is broadcast once per chunk and used for the NV blocks.
#ifndef BFC_LB_PF
#define BFC_LB_PF 1536
#endif
// software prefetch distance in bytes of the GEMV passes (the stream is read once, in order; the
// hardware prefetchers alone leave ~15-25% of the bandwidth unused here); 0 in the batch path,
// which re-reads each panel from L2
constexpr int64_t kPrefetch = BFC_LB_PF;

template <int BITS, int R, int NV, int MODE, int64_t PF>
inline void group_sums(const uint8_t* gb, int nvp, int64_t nch, const int8_t* const* qg, const int32_t* corr, int vs,
                       __m512i (*isum)[NV]) {
  using F = Fmt<BITS>;
  using C = Cls<BITS, MODE>;
  constexpr int A = C::count();
  constexpr int64_t CB = 64 * F::LINES;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) isum[r][v] = _mm512_set1_epi32(corr[r]);
  const int64_t stride = nvp * CB;
  for (int64_t c0 = 0; c0 < nch; c0 += kSegChunks) {
    const int64_t c1 = std::min(nch, c0 + kSegChunks);
    __m512i acc[R][NV][A];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
#pragma GCC unroll 4
        for (int c = 0; c < A; ++c) acc[r][v][c] = _mm512_setzero_si512();
    const uint8_t* line = gb + c0 * stride + vs * CB;
    for (int64_t c = c0; c < c1; ++c, line += stride) {
      if constexpr (PF > 0) {
#pragma GCC unroll 12
        for (int l = 0; l < NV * F::LINES; ++l) _mm_prefetch(reinterpret_cast<const char*>(line + PF + 64 * l), _MM_HINT_T0);
      }
      static_for<0, F::NVEC>([&](auto J) {
        constexpr int j = decltype(J)::value, k = C::of(j);
        __m512i e[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) e[v] = extract<BITS, MODE, j>(line + v * CB);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512i b = bcast4(qg[r] + c * F::KS + 4 * j);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v][k] = dp(acc[r][v][k], e[v], b);
        }
      });
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        __m512i t = acc[r][v][0];
#pragma GCC unroll 4
        for (int c = 1; c < A; ++c) t = _mm512_add_epi32(t, _mm512_srai_epi32(acc[r][v][c], unsigned(C::shift(c))));
        isum[r][v] = _mm512_add_epi32(isum[r][v], t);
      }
  }
}

inline __m512 load_scales(const Plan& p, const uint8_t* sb, int v) {
  if (p.sc16) return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sb + 32 * v)));
  return _mm512_load_ps(reinterpret_cast<const float*>(sb + 64 * v));
}

// Per (bits, rows): the unpack mode and the blocks per pass NV (accumulator registers:
// R * NV * classes; each broadcast serves NV blocks).  Measured on AVX-512 VNNI (bench/bench_gemv.py).
#ifndef BFC_LB_CFG
template <int BITS, int R>
struct Cfg {
  static constexpr int MODE = R == 1 ? kInPlace : R <= 2 ? (BITS == 4 ? kInPlace : kHalf) : kFull;
  static constexpr int NV = R <= 4 ? 4 : R <= 6 ? 3 : 2;
};
// rows > kGemvRows: passes of R = 8 rows (Cfg<BITS, 8>) over each panel, re-read from L2 (block-
// outer passes with the float accumulators in registers measured 20-40% slower here)
template <int BITS>
struct BigCfg {
  static constexpr int R = 8;
};
#endif

template <int BITS, int R, int NV, int64_t PF>
inline void pass(const Plan& p, const uint8_t* gb, const uint8_t* sb, int nvp, int64_t nch, const int8_t* const* qg,
                 const int32_t* corr, int vs, __m512 (*facc)[kPanel]) {
  __m512i isum[R][NV];
  group_sums<BITS, R, NV, Cfg<BITS, R>::MODE, PF>(gb, nvp, nch, qg, corr, vs, isum);
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512 s = load_scales(p, sb, vs + v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      facc[r][vs + v] = _mm512_add_ps(facc[r][vs + v], _mm512_mul_ps(_mm512_cvtepi32_ps(isum[r][v]), s));
  }
}

inline void store_rows(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int R, int64_t blk,
                       const __m512* o) {
  const int64_t N = p.N, n0 = blk * 16;
  const __mmask16 mk = n0 + 16 <= N ? __mmask16(0xffff) : __mmask16((1u << (N - n0)) - 1);
  const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    __m512 v = _mm512_mul_ps(o[r], _mm512_set1_ps(a.cs[r0 + r]));
    if (bias != nullptr) v = _mm512_add_ps(v, bv);
    _mm512_mask_storeu_ps(y + (r0 + r) * N + n0, mk, v);
  }
}

// rows [r0, r0 + R) x panel pn, all groups; the panel's stream is read once, in order
template <int BITS, int R, int64_t PF>
void panel_rows(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t pn) {
  constexpr int NVM = Cfg<BITS, R>::NV;
  constexpr int64_t CB = 64 * Fmt<BITS>::LINES;
  const int nvp = panel_blocks(p, pn);
  const int64_t ng = p.ngroups;
  __m512 facc[R][kPanel];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanel; ++v) facc[r][v] = _mm512_setzero_ps();
  const int8_t* qg[R];
  int32_t corr[R];
  for (int64_t gi = 0; gi < ng; ++gi) {
    const uint8_t* gb = group_base(p, pn, nvp, gi);
    const int64_t nch = group_chunks(p, gi);
    const uint8_t* sb = gb + nvp * nch * CB;
    for (int r = 0; r < R; ++r) {
      qg[r] = a.q + (r0 + r) * p.Kp + p.gstart[size_t(gi)];
      corr[r] = -p.zero * a.gsum[(r0 + r) * ng + gi];
    }
    int vs = 0;
    if constexpr (NVM >= 4)
      if (nvp == 4) pass<BITS, R, 4, PF>(p, gb, sb, nvp, nch, qg, corr, 0, facc), vs = 4;
    if constexpr (NVM == 3)
      if (nvp >= 3) pass<BITS, R, 3, PF>(p, gb, sb, nvp, nch, qg, corr, 0, facc), vs = 3;
    if constexpr (NVM >= 2)
      for (; vs + 2 <= nvp; vs += 2) pass<BITS, R, 2, PF>(p, gb, sb, nvp, nch, qg, corr, vs, facc);
    for (; vs < nvp; ++vs) pass<BITS, R, 1, PF>(p, gb, sb, nvp, nch, qg, corr, vs, facc);
  }
  for (int v = 0; v < nvp; ++v) {
    __m512 o[R];
    for (int r = 0; r < R; ++r) o[r] = facc[r][v];
    store_rows(p, a, bias, y, r0, R, pn * kPanel + v, o);
  }
}

template <int BITS, int64_t PF>
void panel_any(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t nr, int64_t pn) {
  switch (nr) {
    case 1: return panel_rows<BITS, 1, PF>(p, a, bias, y, r0, pn);
    case 2: return panel_rows<BITS, 2, PF>(p, a, bias, y, r0, pn);
    case 3: return panel_rows<BITS, 3, PF>(p, a, bias, y, r0, pn);
    case 4: return panel_rows<BITS, 4, PF>(p, a, bias, y, r0, pn);
    case 5: return panel_rows<BITS, 5, PF>(p, a, bias, y, r0, pn);
    case 6: return panel_rows<BITS, 6, PF>(p, a, bias, y, r0, pn);
    case 7: return panel_rows<BITS, 7, PF>(p, a, bias, y, r0, pn);
    default: return panel_rows<BITS, 8, PF>(p, a, bias, y, r0, pn);
  }
}

template <int BITS>
void gemm_bits(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
               int64_t pn1) {
  for (int64_t pn = pn0; pn < pn1; ++pn) {
    if (r1 - r0 <= kGemvRows) {
      panel_any<BITS, kPrefetch>(p, a, bias, y, r0, r1 - r0, pn);
      continue;
    }
    // larger batches: BigCfg rows per pass (block-outer), the panel stays in L2
    constexpr int RB = BigCfg<BITS>::R;
    int64_t r = r0;
    for (; r + RB <= r1; r += RB) panel_rows<BITS, RB, 0>(p, a, bias, y, r, pn);
    if (r < r1) panel_any<BITS, 0>(p, a, bias, y, r, r1 - r, pn);
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

void gemm_avx512(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
                 int64_t pn1) {
  if (p.bits == 4) gemm_bits<4>(p, a, bias, y, r0, r1, pn0, pn1);
  else if (p.bits == 3) gemm_bits<3>(p, a, bias, y, r0, r1, pn0, pn1);
  else gemm_bits<2>(p, a, bias, y, r0, r1, pn0, pn1);
}

void quantize_avx512(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs) {
  quantize_avx512_impl(p, xr, r0, r1, q, gsum, cs);
}

}  // namespace lowbit
}  // namespace bfc
