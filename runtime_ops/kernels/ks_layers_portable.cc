// Portable layer kernels: plain C++ loops over fixed-size register tiles (the compiler
// vectorizes them for whatever target it builds for).  Reference for the AVX2 kernels.
#include <algorithm>
#include <cmath>

#include "ks_chain.h"
#include "ks_tile.h"

namespace bfc {
namespace ks {
namespace {

template <int MR, int NB>
void f32_t(const Factor& f, const float* in, float* out, bool fp8, int64_t blk0, int64_t blk1) {
  const int64_t b = f.b, c = f.c, d = f.d, nkt = f.nkt;
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
    const int64_t i = blk_il / d, l = blk_il % d;
    const float* xb = in + (i * d + l) * b * NB;
    const int32_t* orow = f.out_row.data() + i * c * d + l;
    const int64_t blk = (i * d + l) * nkt;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      float acc[MR][NB] = {};
      {
        const float* w = f.wf.data() + (blk + kt) * b * MR;
        for (int64_t j = 0; j < b; ++j) {
          const float* xr = xb + j * NB;
          for (int r = 0; r < MR; ++r) {
            const float wv = w[j * MR + r];
            for (int n = 0; n < NB; ++n) acc[r][n] += wv * xr[n];
          }
        }
      }
      const int valid = int(std::min<int64_t>(MR, c - kt * MR));
      for (int r = 0; r < valid; ++r) {
        float* yr = out + int64_t(orow[(kt * MR + r) * d]) * NB;
        const float s = fp8 ? f.sc[size_t((blk + kt) * MR + r)] : 1.f;
        for (int n = 0; n < NB; ++n) yr[n] = fp8 ? acc[r][n] * s : acc[r][n];
      }
    }
  }
}

template <int MR, int NB>
void i8_t(const Factor& f, const int16_t* q, const float* colscale, float* out, int64_t blk0, int64_t blk1) {
  const int64_t bp = f.bp, c = f.c, d = f.d, nkt = f.nkt;
  for (int64_t blk_il = blk0; blk_il < blk1; ++blk_il) {
    const int64_t i = blk_il / d, l = blk_il % d;
    const int16_t* xb = q + (i * d + l) * bp * NB * 2;
    const int32_t* orow = f.out_row.data() + i * c * d + l;
    const int64_t blk = (i * d + l) * nkt;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      int32_t acc[MR][NB] = {};
      const int16_t* w = f.wq.data() + (blk + kt) * bp * MR * 2;
      for (int64_t jp = 0; jp < bp; ++jp) {
        const int16_t* xr = xb + jp * NB * 2;
        for (int r = 0; r < MR; ++r) {
          const int32_t w0 = w[(jp * MR + r) * 2], w1 = w[(jp * MR + r) * 2 + 1];
          for (int n = 0; n < NB; ++n) acc[r][n] += int32_t(xr[2 * n]) * w0 + int32_t(xr[2 * n + 1]) * w1;
        }
      }
      const int valid = int(std::min<int64_t>(MR, c - kt * MR));
      for (int r = 0; r < valid; ++r) {
        float* yr = out + int64_t(orow[(kt * MR + r) * d]) * NB;
        const float s = f.sc[size_t((blk + kt) * MR + r)];
        for (int n = 0; n < NB; ++n) yr[n] = float(acc[r][n]) * colscale[n] * s;
      }
    }
  }
}

template <int NB>
void quant_t(const Factor& f, const float* in, int16_t* q, float* colscale) {
  const int64_t a = f.a, b = f.b, d = f.d, bp = f.bp, M = f.in_dim();
  float amax[NB] = {};
  for (int64_t r = 0; r < M; ++r)
    for (int n = 0; n < NB; ++n) {
      const float v = std::fabs(in[r * NB + n]);
      if (v > amax[n]) amax[n] = v;
    }
  float inv[NB];
  for (int n = 0; n < NB; ++n) int8_column_scale(amax[n], &colscale[n], &inv[n]);
  for (int64_t i = 0; i < a; ++i)
    for (int64_t l = 0; l < d; ++l)
      for (int64_t jp = 0; jp < bp; ++jp) {
        int16_t* qr = q + ((i * d + l) * bp + jp) * NB * 2;
        for (int t = 0; t < 2; ++t) {
          const int64_t j = 2 * jp + t;
          const float* xr = j < b ? in + ((i * d + l) * b + j) * NB : nullptr;
          for (int n = 0; n < NB; ++n) {
            float v = xr ? xr[n] * inv[n] : 0.f;
            if (!(v == v)) v = 0.f;
            v = std::min(127.f, std::max(-127.f, v));
            qr[2 * n + t] = int16_t(std::nearbyint(v));
          }
        }
      }
}

void f32_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  with_nb(nb, [&](auto NB) { with_mr(f.mr, [&](auto MR) { f32_t<decltype(MR)::value, decltype(NB)::value>(f, in, out, false, blk0, blk1); }); });
}
void fp8_layer(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1) {
  with_nb(nb, [&](auto NB) { with_mr(f.mr, [&](auto MR) { f32_t<decltype(MR)::value, decltype(NB)::value>(f, in, out, true, blk0, blk1); }); });
}
void quant_layer(const Factor& f, const float* in, int16_t* q, float* cs, int nb) {
  with_nb(nb, [&](auto NB) { quant_t<decltype(NB)::value>(f, in, q, cs); });
}
void i8_layer(const Factor& f, const int16_t* q, const float* cs, float* out, int nb, int64_t blk0, int64_t blk1) {
  with_nb(nb, [&](auto NB) { with_mr(f.mr, [&](auto MR) { i8_t<decltype(MR)::value, decltype(NB)::value>(f, q, cs, out, blk0, blk1); }); });
}

void gather(const Plan& p, const float* x, int64_t r0, int64_t nv, int nb, int64_t c0, int64_t c1, float* buf) {
  const int64_t M = p.M;
  const int32_t* gr = p.gather_row.data();
  constexpr int64_t kChunk = 256;  // columns per pass: the touched rows of buf stay in L1
  for (int64_t s0 = c0; s0 < c1; s0 += kChunk) {
    const int64_t s1 = std::min(c1, s0 + kChunk);
    for (int64_t n = 0; n < nb; ++n) {
      if (n < nv) {
        const float* xr = x + (r0 + n) * M;
        for (int64_t s = s0; s < s1; ++s) buf[int64_t(gr[s]) * nb + n] = xr[s];
      } else {
        for (int64_t s = s0; s < s1; ++s) buf[int64_t(gr[s]) * nb + n] = 0.f;
      }
    }
  }
}

void scatter(const Plan& p, const float* buf, const float* bias, float* y, int64_t r0, int64_t nv, int nb,
             int64_t c0, int64_t c1) {
  const int64_t N = p.N;
  const int32_t* sr = p.scatter_row.data();
  constexpr int64_t kChunk = 256;
  for (int64_t o0 = c0; o0 < c1; o0 += kChunk) {
    const int64_t o1 = std::min(c1, o0 + kChunk);
    for (int64_t n = 0; n < nv; ++n) {
      float* yr = y + (r0 + n) * N;
      for (int64_t o = o0; o < o1; ++o) {
        const float v = buf[int64_t(sr[o]) * nb + n];
        yr[o] = bias ? v + bias[o] : v;
      }
    }
  }
}

}  // namespace

const LayerTable& portable_table() {
  static const LayerTable t{f32_layer, fp8_layer, quant_layer, i8_layer, nullptr, nullptr, nullptr, nullptr, gather, scatter, nullptr, nullptr, nullptr, nullptr};
  return t;
}

}  // namespace ks
}  // namespace bfc
