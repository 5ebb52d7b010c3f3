// Plan building (prepacking after validate_node) and the per-tile chain executor.
#include "ks_chain.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

#include "ks_tile.h"

namespace bfc {
namespace ks {

float half_to_float(uint16_t h) {
  const uint32_t s = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  float v;
  if (e == 0) {
    v = std::ldexp(float(m), -24);
  } else if (e == 31) {
    v = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(float(m | 0x400u), int(e) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= s;
  std::memcpy(&v, &bits, 4);
  return v;
}

namespace {

struct Luts {
  float e4m3[256];
  float e5m2[256];
  Luts() {
    for (int x = 0; x < 256; ++x) {
      const float sign = (x & 0x80) ? -1.f : 1.f;
      {  // e4m3fn: bias 7, no infinities, S.1111.111 is NaN
        const int e = (x >> 3) & 0xf, m = x & 7;
        float v;
        if (e == 0xf && m == 7) v = std::numeric_limits<float>::quiet_NaN();
        else if (e == 0) v = std::ldexp(float(m), -9);
        else v = std::ldexp(float(8 + m), e - 10);
        e4m3[x] = sign * v;
      }
      {  // e5m2: bias 15, IEEE-like
        const int e = (x >> 2) & 0x1f, m = x & 3;
        float v;
        if (e == 0x1f) v = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
        else if (e == 0) v = std::ldexp(float(m), -16);
        else v = std::ldexp(float(4 + m), e - 17);
        e5m2[x] = sign * v;
      }
    }
  }
};
const Luts& luts() {
  static const Luts l;
  return l;
}

// values[idx] decoded exactly to float32 (dtype validated by validate_node)
float value_at(int dtype, const void* values, int64_t idx) {
  switch (dtype) {
    case kTypeFloat: return static_cast<const float*>(values)[idx];
    case kTypeInt8: return float(static_cast<const int8_t*>(values)[idx]);
    case kTypeFloat16: return half_to_float(static_cast<const uint16_t*>(values)[idx]);
    case kTypeF8E4M3FN: return luts().e4m3[static_cast<const uint8_t*>(values)[idx]];
    default: return luts().e5m2[static_cast<const uint8_t*>(values)[idx]];
  }
}

int choose_mr(int64_t c) {
  if (c <= 6) return int(c);
  // 6 rows x 16 columns = 12 accumulators cover the FMA latency with fewer input reloads
  // than 4 or 5 rows; take fewer rows only when 6 would waste more than ~10% of the tile
  if (((c + 5) / 6 * 6 - c) * 10 <= c) return 6;
  int best = 6;
  int64_t best_waste = (c + 5) / 6 * 6 - c;
  for (int m = 5; m >= 4; --m) {
    const int64_t waste = (c + m - 1) / m * m - c;
    if (waste < best_waste) best = m, best_waste = waste;
  }
  return best;
}

// Prepacks factor (a, b, c, d) from canonical values V (a, d, b, c) and scale S (4-D,
// broadcast over dims of size 1).  Register tile (i, l, kt) covers outputs k = kt*mr + r.
void pack_factor(const int64_t* pat, const TensorDesc& values, const TensorDesc& scale, Factor* f) {
  const int64_t a = pat[0], b = pat[1], c = pat[2], d = pat[3];
  f->a = a, f->b = b, f->c = c, f->d = d;
  const int dt = values.dtype;
  f->path = dt == kTypeInt8 ? Path::I8 : (dt == kTypeF8E4M3FN || dt == kTypeF8E5M2) ? Path::FP8 : Path::F32;
  f->mr = choose_mr(c);
  f->small = b <= 4 && c <= 4;
  f->nkt = (c + f->mr - 1) / f->mr;
  f->bp = (b + 1) / 2;
  const int mr = f->mr;
  const std::vector<int64_t>& ss = scale.dims;
  const float* sv = static_cast<const float*>(scale.data);
  auto scale_at = [&](int64_t i, int64_t l, int64_t k) {
    const int64_t si = ss[0] == 1 ? 0 : i, sl = ss[1] == 1 ? 0 : l, sk = ss[3] == 1 ? 0 : k;
    return sv[(si * ss[1] + sl) * ss[3] + sk];
  };
  auto v_at = [&](int64_t i, int64_t l, int64_t j, int64_t k) {
    return value_at(dt, values.data, ((i * d + l) * b + j) * c + k);
  };
  // packed slot of (block i*d + l, tile kt, output r): F32 weights hold V*S (scale folded
  // in); FP8 the decoded bytes and I8 (small factors only) the integers as floats, the
  // scale applied in the epilogue from sc.  Small factors have mr == c, nkt == 1, so wf
  // is then simply V[i, l, j, k] at ((i*d + l)*b + j)*c + k.
  const bool fold_scale = f->path == Path::F32;
  if (f->path != Path::I8 || f->small) f->wf.assign(size_t(a * d * f->nkt * b * mr), 0.f);
  if (f->path != Path::F32) f->sc.assign(size_t(a * d * f->nkt * mr), 0.f);
  if (f->path == Path::I8) f->wq.assign(size_t(a * d * f->nkt * f->bp * mr * 2), 0);
  for (int64_t i = 0; i < a; ++i)
    for (int64_t l = 0; l < d; ++l)
      for (int64_t kt = 0; kt < f->nkt; ++kt) {
        const int64_t tile = (i * d + l) * f->nkt + kt;
        for (int r = 0; r < mr && kt * mr + r < c; ++r) {
          const int64_t k = kt * mr + r;
          if (!fold_scale) f->sc[size_t(tile * mr + r)] = scale_at(i, l, k);
          for (int64_t j = 0; j < b; ++j) {
            const float v = v_at(i, l, j, k);
            if (!f->wf.empty()) f->wf[size_t(tile * b * mr + j * mr + r)] = fold_scale ? v * scale_at(i, l, k) : v;
            // int8 pairs: wq[((tile*bp + j/2)*mr + r)*2 + j%2] = V[i, l, j, k]
            if (f->path == Path::I8) f->wq[size_t(((tile * f->bp + j / 2) * mr + r) * 2 + j % 2)] = int16_t(v);
          }
        }
      }
}

// VNNI layout of a big-block int8 factor (see Factor::wv), from the int16 pairs and the
// epilogue scales pack_factor already holds.
void pack_vnni(const TensorDesc& values, Factor* f) {
  const int64_t a = f->a, b = f->b, c = f->c, d = f->d;
  const int8_t* v = static_cast<const int8_t*>(values.data);  // (a, d, b, c), dtype checked
  const int mrv = choose_mrv(c);
  f->mrv = mrv;
  f->nktv = (c + mrv - 1) / mrv;
  f->b4 = (b + 3) / 4;
  const int64_t ntile = a * d * f->nktv;
  f->wv.assign(size_t(ntile * f->b4 * mrv * 4), 0);
  f->corr.assign(size_t(ntile * mrv), 0);
  f->scv.assign(size_t(ntile * mrv), 0.f);
  for (int64_t blk = 0; blk < a * d; ++blk)
    for (int64_t k = 0; k < c; ++k) {
      const int64_t kt = k / mrv, r = k % mrv, tile = blk * f->nktv + kt;
      // sc is laid out with mr rows per tile (pack_factor)
      f->scv[size_t(tile * mrv + r)] = f->sc[size_t((blk * f->nkt + k / f->mr) * f->mr + k % f->mr)];
      int32_t sum = 0;
      for (int64_t j = 0; j < b; ++j) {
        const int8_t w = v[(blk * b + j) * c + k];
        sum += w;
        f->wv[size_t(((tile * f->b4 + j / 4) * mrv + r) * 4 + j % 4)] = w;
      }
      f->corr[size_t(tile * mrv + r)] = -128 * sum;  // |sum| <= 2^16 * 128: no overflow
    }
  f->wq.clear();
  f->wq.shrink_to_fit();
}


// float32 -> bfloat16 bits, exact for every fp8 value (checked by the caller's decode)
uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return uint16_t(u >> 16);
}

// AVX512_BF16 layout of a big-block fp8 factor (see Factor::wb) from the decoded values in wf
// (pack_factor: wf[(tile_mr*b + j)*mr + r], scale not folded) and the scales in sc.
void pack_bf16(Factor* f) {
  const int64_t a = f->a, b = f->b, c = f->c, d = f->d;
  const int mrv = choose_mrv(c);
  f->mrv = mrv;
  f->nktv = (c + mrv - 1) / mrv;
  const int64_t ntile = a * d * f->nktv, bp = f->bp;
  f->wb.assign(size_t(ntile * bp * mrv), 0);
  f->scv.assign(size_t(ntile * mrv), 0.f);
  for (int64_t blk = 0; blk < a * d; ++blk)
    for (int64_t k = 0; k < c; ++k) {
      const int64_t tile = blk * f->nktv + k / mrv, r = k % mrv;
      const int64_t t_mr = blk * f->nkt + k / f->mr, r_mr = k % f->mr;
      f->scv[size_t(tile * mrv + r)] = f->sc[size_t(t_mr * f->mr + r_mr)];
      for (int64_t j = 0; j < b; ++j) {
        const uint32_t h = bf16_bits(f->wf[size_t((t_mr * b + j) * f->mr + r_mr)]);
        f->wb[size_t((tile * bp + j / 2) * mrv + r)] |= j % 2 ? h << 16 : h;
      }
    }
  f->wf.clear();
  f->wf.shrink_to_fit();
}

}  // namespace

const char* isa_name(int isa) {
  return isa == 3 ? "avx512bf16" : isa == 2 ? "avx512" : isa == 1 ? "avx2" : "portable";
}

bool cpu_has_avx2() {
#if defined(BFC_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512vnni() {
#if defined(BFC_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  // libgcc's feature bits include the OS check (XCR0 enables the opmask / zmm state)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if defined(BFC_HAVE_AVX512BF16) && (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return cpu_has_avx512vnni() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

int resolve_isa(const char* isa_override, std::string* err) {
  const std::string isa = isa_override ? isa_override : "";
  if (isa.empty() || isa == "auto")
    return cpu_has_avx512bf16() ? 3 : cpu_has_avx512vnni() ? 2 : cpu_has_avx2() ? 1 : 0;
  if (isa == "avx512bf16") {
    if (cpu_has_avx512bf16()) return 3;
    *err = "KSMatMul: BFC_KS_ISA=avx512bf16 was requested but this build or CPU has no AVX-512 VNNI + BF16";
    return -1;
  }
  if (isa == "portable") return 0;
  if (isa == "avx2") {
    if (cpu_has_avx2()) return 1;
    *err = "KSMatMul: BFC_KS_ISA=avx2 was requested but this build or CPU has no AVX2/FMA";
    return -1;
  }
  if (isa == "avx512") {
    if (cpu_has_avx512vnni()) return 2;
    *err = "KSMatMul: BFC_KS_ISA=avx512 was requested but this build or CPU has no AVX-512 F/BW/VL + VNNI";
    return -1;
  }
  *err = "KSMatMul: BFC_KS_ISA must be auto, portable, avx2, avx512 or avx512bf16, got '" + isa + "'";
  return -1;
}

std::string build_plan(const NodeDesc& n, const char* isa_override, Plan* plan) {
  ChainDims dims;
  std::string e = validate_node(n, true, &dims);
  if (!e.empty()) return e;
  plan->isa = resolve_isa(isa_override, &e);
  if (plan->isa < 0) return e;
  const size_t L = n.patterns.size() / 4;
  plan->M = dims.M, plan->N = dims.N;
  plan->factors.assign(L, Factor());
  for (size_t l = 0; l < L; ++l) {
    Factor& f = plan->factors[l];
    pack_factor(&n.patterns[4 * l], n.factors[2 * l], n.factors[2 * l + 1], &f);
    if (plan->isa >= 2 && f.path == Path::I8 && !f.small) pack_vnni(n.factors[2 * l], &f);
    if (plan->isa == 3 && f.path == Path::FP8 && !f.small) pack_bf16(&f);
  }
  // block-major storage order of every factor input (see ks_chain.h): feature
  // i*b*d + j*d + l of factor f lives in row (i*d + l)*b + j
  auto block_row = [](const Factor& f, int64_t feat) {
    const int64_t i = feat / (f.b * f.d), rem = feat % (f.b * f.d), j = rem / f.d, l = rem % f.d;
    return int32_t((i * f.d + l) * f.b + j);
  };
  for (size_t l = 0; l < L; ++l) {
    Factor& f = plan->factors[l];
    f.out_row.resize(size_t(f.out_dim()));
    for (int64_t o = 0; o < f.out_dim(); ++o)
      f.out_row[size_t(o)] = l + 1 < L ? block_row(plan->factors[l + 1], o) : int32_t(o);
  }
  // X column s feeds chain input fi with in_perm[fi] = s; Y column o reads chain output out_perm[o]
  plan->gather_row.resize(size_t(plan->M));
  for (int64_t fi = 0; fi < plan->M; ++fi)
    plan->gather_row[size_t(n.in_perm.empty() ? fi : n.in_perm[size_t(fi)])] = block_row(plan->factors[0], fi);
  plan->scatter_row.resize(size_t(plan->N));
  for (int64_t o = 0; o < plan->N; ++o)
    plan->scatter_row[size_t(o)] = int32_t(n.out_perm.empty() ? o : n.out_perm[size_t(o)]);
  plan->gather_q = 0;
  plan->gq_lines.clear();
  plan->gq_src.clear();
  if (plan->isa >= 2 && L > 0) {
    const Factor& f0 = plan->factors[0];
    const int64_t M = plan->M;
    const std::vector<int32_t>& gr = plan->gather_row;
    if (f0.path == Path::I8 && !f0.small && f0.mrv > 0 && f0.b % 4 == 0 && M % 64 == 0) {
      bool ok = true;
      for (int64_t s = 0; ok && s < M; s += 4) {
        ok = gr[size_t(s)] % 4 == 0;
        for (int t = 1; ok && t < 4; ++t) ok = gr[size_t(s + t)] == gr[size_t(s)] + t;
      }
      if (ok) {
        plan->gather_q = 1;
      } else {
        std::vector<int32_t> inv(static_cast<size_t>(M));
        for (int64_t s = 0; s < M; ++s) inv[size_t(gr[size_t(s)])] = int32_t(s);
        ok = true;
        for (int64_t cb = 0; ok && cb < M / 16; ++cb) {
          if (gr[size_t(16 * cb)] % 4 != 0) continue;  // a byte t > 0 source block
          int32_t line[16];
          for (int k = 0; ok && k < 16; ++k) {
            ok = gr[size_t(16 * cb + k)] % 4 == 0;
            line[k] = gr[size_t(16 * cb + k)] / 4;
          }
          plan->gq_src.push_back(int32_t(16 * cb));
          for (int t = 1; ok && t < 4; ++t) {
            const int32_t st = inv[size_t(4 * line[0] + t)];
            ok = st % 16 == 0;
            for (int k = 1; ok && k < 16; ++k) ok = inv[size_t(4 * line[k] + t)] == st + k;
            plan->gq_src.push_back(st);
          }
          plan->gq_lines.insert(plan->gq_lines.end(), line, line + 16);
        }
        ok = ok && int64_t(plan->gq_lines.size()) * 4 == M;
        plan->gather_q = ok ? 2 : 0;
        if (!ok) plan->gq_lines.clear(), plan->gq_src.clear();
      }
    }
  }
  plan->direct_out = false;
  if (plan->isa >= 2 && L > 0) {
    const Factor& fl = plan->factors[L - 1];
    bool ident = true;
    for (int64_t o = 0; ident && o < plan->N; ++o) ident = plan->scatter_row[size_t(o)] == o;
    plan->direct_out = ident && fl.path == Path::I8 && !fl.small && fl.mrv == 16 && fl.d == 1 && fl.c % 16 == 0;
  }
  plan->max_dim = plan->M;
  plan->max_pairs = 0;
  for (const Factor& f : plan->factors) {
    plan->max_dim = std::max(plan->max_dim, f.out_dim());
    if (f.path == Path::I8) plan->max_pairs = std::max(plan->max_pairs, f.a * f.bp * f.d);
  }
  // depth-first tail: small-block factors whose a_l divide each other, int8 only at its
  // start (an int8 factor needs the amax of its whole input), starting where one group's
  // buffer (b*d features x 16 columns) fits in about 32 KB
  plan->df_start = L;
  for (size_t s = L; s-- > 0;) {
    const Factor& f = plan->factors[s];
    if (!f.small) break;
    if (s + 1 < L) {
      const Factor& g = plan->factors[s + 1];
      if (g.a % f.a != 0 || g.path == Path::I8) break;
    }
    if (f.b * f.d <= 256) plan->df_start = s;
  }
  if (plan->df_start + 1 >= L) plan->df_start = L;  // a single factor gains nothing
  plan->df_group_rows = 0;
  for (size_t m = plan->df_start + 1; m < L; ++m)
    plan->df_group_rows = std::max(plan->df_group_rows, plan->factors[m].in_dim() / plan->factors[plan->df_start].a);
  return "";
}

int tile_width(int64_t rows) { return rows <= 8 ? 8 : 16; }

namespace {

constexpr size_t kAlignFloats = 16;  // 64 bytes
inline size_t round_up(size_t n) { return (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats; }

struct Exec {
  const Plan* plan;
  const LayerTable* T;
  const float* x;
  const float* bias;
  float* y;
  int64_t rows, ntiles;         // ntiles: tiles of the current panel
  int64_t tile0;                // first tile of the current panel
  int64_t gcols, scols;         // columns per gather / scatter item
  int64_t gitems, sitems;       // gather / scatter items per tile
  int nb;
  size_t buf_stride, q_stride;  // floats per tile
  float* A;                     // current input buffers (ntiles x buf_stride)
  float* B;                     // output buffers
  float* Q;                     // int8 pair buffers (int16 viewed as float slots)
  float* CS;                    // per-tile column scales (ntiles x nb)
  float* INV;                   // per-tile inverse column scales (ntiles x nb), small int8 path
  float* MX;                    // per-tile column max |activation| (ntiles x nb), small int8 path
  const Factor* f;
  bool f_small_i8;              // f runs through T->amax / T->i8f
  int64_t chunk;                // blocks per chunk
  size_t run0, run1;            // small-block run [run0, run1) for small_run_fn
  float* P;                     // depth-first private buffers (one pair per tile)
  size_t p_stride;              // floats per tile (two buffers)
  float* MXP;                   // per-(chunk, tile) column max |output| of a tracked int8 layer
  int64_t nparts;               // chunks that wrote MXP (0: no tracked max for the next factor)
  bool track;                   // layer_fn: f runs T->i8m (writes MXP)
  bool direct;                  // layer_fn: f (the last factor) runs T->i8y into y
};

void gather_fn(void* u, size_t item) {
  Exec& e = *static_cast<Exec*>(u);
  const size_t t = item / size_t(e.gitems);
  const int64_t c0 = int64_t(item % size_t(e.gitems)) * e.gcols, c1 = std::min(e.plan->M, c0 + e.gcols);
  const int64_t r0 = (e.tile0 + int64_t(t)) * e.nb, nv = std::min<int64_t>(e.nb, e.rows - r0);
  e.T->gather(*e.plan, e.x, r0, nv, e.nb, c0, c1, e.A + t * e.buf_stride);
}

void gather_q_fn(void* u, size_t t) {
  Exec& e = *static_cast<Exec*>(u);
  const int64_t r0 = (e.tile0 + int64_t(t)) * e.nb, nv = std::min<int64_t>(e.nb, e.rows - r0);
  e.T->gather_q(*e.plan, e.plan->factors[0], e.x, r0, nv, reinterpret_cast<int16_t*>(e.Q + t * e.q_stride),
                e.CS + t * e.nb);
}

void quant_fn(void* u, size_t t) {
  Exec& e = *static_cast<Exec*>(u);
  if (e.nparts > 0) {  // amax from the previous factor's epilogues: no amax pass over the buffer
    alignas(64) float am[16];
    for (int n = 0; n < e.nb; ++n) am[n] = 0.f;
    for (int64_t c = 0; c < e.nparts; ++c) {
      const float* pm = e.MXP + (size_t(c) * size_t(e.ntiles) + t) * size_t(e.nb);
      for (int n = 0; n < e.nb; ++n) am[n] = std::max(am[n], pm[n]);
    }
    e.T->quant_am(*e.f, e.A + t * e.buf_stride, am, reinterpret_cast<int16_t*>(e.Q + t * e.q_stride),
                  e.CS + t * e.nb, e.nb);
    return;
  }
  if (e.f_small_i8)
    e.T->amax(e.A + t * e.buf_stride, e.f->in_dim(), e.CS + t * e.nb, e.INV + t * e.nb, e.nb);
  else
    e.T->quant(*e.f, e.A + t * e.buf_stride, reinterpret_cast<int16_t*>(e.Q + t * e.q_stride), e.CS + t * e.nb,
               e.nb);
}

// one factor, blocks [blk0, blk1) of tile t: in/out are that tile's buffers
inline void apply_blocks(const Exec& e, const Factor& f, bool small_i8, size_t t, const float* in, float* out,
                         int64_t blk0, int64_t blk1) {
  switch (f.path) {
    case Path::F32: e.T->f32(f, in, out, e.nb, blk0, blk1); break;
    case Path::FP8: e.T->fp8(f, in, out, e.nb, blk0, blk1); break;
    case Path::I8:
      if (small_i8)
        e.T->i8f(f, in, e.INV + t * e.nb, e.CS + t * e.nb, out, e.nb, blk0, blk1);
      else
        e.T->i8(f, reinterpret_cast<const int16_t*>(e.Q + t * e.q_stride), e.CS + t * e.nb, out, e.nb, blk0, blk1);
      break;
  }
}

void layer_fn(void* u, size_t c) {
  Exec& e = *static_cast<Exec*>(u);
  const Factor& f = *e.f;
  const int64_t blk0 = int64_t(c) * e.chunk, blk1 = std::min<int64_t>(f.a * f.d, blk0 + e.chunk);
  if (e.direct) {
    for (int64_t t = 0; t < e.ntiles; ++t) {
      const int64_t r0 = (e.tile0 + t) * e.nb, nv = std::min<int64_t>(e.nb, e.rows - r0);
      e.T->i8y(f, reinterpret_cast<const int16_t*>(e.Q + t * e.q_stride), e.CS + t * e.nb, e.bias,
               e.y + r0 * e.plan->N, e.plan->N, nv, blk0, blk1);
    }
    return;
  }
  if (e.track) {
    for (int64_t t = 0; t < e.ntiles; ++t)
      e.T->i8m(f, reinterpret_cast<const int16_t*>(e.Q + t * e.q_stride), e.CS + t * e.nb, e.B + t * e.buf_stride,
               e.nb, blk0, blk1, e.MXP + (c * size_t(e.ntiles) + size_t(t)) * size_t(e.nb));
    return;
  }
  for (int64_t t = 0; t < e.ntiles; ++t)
    apply_blocks(e, f, e.f_small_i8, size_t(t), e.A + t * e.buf_stride, e.B + t * e.buf_stride, blk0, blk1);
}

// Runs of small-block factors go tile by tile: one item = one tile through factors
// [run0, run1) (int8 amax/quant of that tile included), so a whole butterfly is one
// parallel-for over tiles and each tile's buffers stay in L2.  From df_start on, the
// tail runs group by group ("depth first"): the first tail factor reads the tile's
// input rows of the group, the last writes its output rows, and the factors between
// ping-pong through the tile's private pair of group-sized buffers (group sizes change
// along a chain, so groups cannot share rows of A and B).
inline float* shift_rows(float* p, int64_t rows, int nb) {  // p - rows*nb without pointer UB
  return reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(p) - uintptr_t(rows) * uintptr_t(nb) * sizeof(float));
}

// factors m and m + 1 run fused as a butterfly pair (see LayerTable::pair)
bool pair_ok(const Plan& plan, const LayerTable* T, size_t m) {
  if (T->pair == nullptr || m + 1 >= plan.factors.size() || m + 1 == plan.df_start) return false;
  const Factor& f = plan.factors[m];
  const Factor& g = plan.factors[m + 1];
  return f.b == 2 && f.c == 2 && g.b == 2 && g.c == 2 && g.a == 2 * f.a && f.d == 2 * g.d && g.path != Path::I8;
}

// buffer passes of the small-block run [l, r) (each pass swaps the tile buffers)
size_t run_passes(const Plan& plan, const LayerTable* T, size_t l, size_t r) {
  size_t passes = 0;
  for (size_t m = l; m < r; ++passes) {
    if (m == plan.df_start) return passes + 1;
    m += pair_ok(plan, T, m) && m + 1 < r ? 2 : 1;
  }
  return passes;
}

void small_run_fn(void* u, size_t t) {
  Exec& e = *static_cast<Exec*>(u);
  const Plan& plan = *e.plan;
  const size_t L = plan.factors.size();
  float* in = e.A + t * e.buf_stride;
  float* out = e.B + t * e.buf_stride;
  const float* inv = e.INV + t * e.nb;
  const float* cs = e.CS + t * e.nb;
  bool have_max = false;  // MX holds max |input| per column of factor m (tracked by the previous pass)
  for (size_t m = e.run0; m < e.run1;) {
    const Factor& f = plan.factors[m];
    const bool small_i8 = f.path == Path::I8 && e.T->i8f != nullptr;
    if (f.path == Path::I8) {
      if (small_i8 && have_max) {
        const float* am = e.MX + t * e.nb;
        for (int n = 0; n < e.nb; ++n) int8_column_scale(am[n], &e.CS[t * e.nb + n], &e.INV[t * e.nb + n]);
      } else if (small_i8)
        e.T->amax(in, f.in_dim(), e.CS + t * e.nb, e.INV + t * e.nb, e.nb);
      else
        e.T->quant(f, in, reinterpret_cast<int16_t*>(e.Q + t * e.q_stride), e.CS + t * e.nb, e.nb);
    }
    if (m == plan.df_start) {
      const int64_t a0 = f.a;
      float* priv[2] = {e.P + t * e.p_stride, e.P + t * e.p_stride + e.p_stride / 2};
      for (int64_t g = 0; g < a0; ++g) {
        const float* gin = in;
        int pass = 0;
        for (size_t q = m; q < L; ++pass) {
          const Factor& fq = plan.factors[q];
          const bool pair = pair_ok(plan, e.T, q) && (q == m || plan.factors[q].path != Path::I8);
          const size_t last = pair ? q + 1 : q;  // factor whose output this pass writes
          float* gout = last + 1 == L ? out
                                      : shift_rows(priv[pass % 2], g * (plan.factors[last + 1].in_dim() / a0), e.nb);
          if (pair) {
            const int64_t r = fq.a / a0;
            e.T->pair(fq, plan.factors[q + 1], gin, inv, cs, gout, e.nb, g * r, (g + 1) * r, nullptr);
          } else {
            const int64_t per = fq.a / a0 * fq.d;
            apply_blocks(e, fq, q == m && small_i8, t, gin, gout, g * per, (g + 1) * per);
          }
          gin = gout;
          q = last + 1;
        }
      }
      return;
    }
    const bool pair = pair_ok(plan, e.T, m) && m + 1 < e.run1;
    const size_t next = pair ? m + 2 : m + 1;
    // the next factor is int8: track max |output| here instead of an amax pass there
    float* mx = nullptr;
    if (e.T->small != nullptr && next < e.run1 && plan.factors[next].path == Path::I8) {
      mx = e.MX + t * e.nb;
      for (int n = 0; n < e.nb; ++n) mx[n] = 0.f;
    }
    if (pair)
      e.T->pair(f, plan.factors[m + 1], in, inv, cs, out, e.nb, 0, f.a, mx);
    else if (e.T->small != nullptr)
      e.T->small(f, in, inv, cs, out, e.nb, 0, f.a * f.d, mx);
    else
      apply_blocks(e, f, small_i8, t, in, out, 0, f.a * f.d);
    have_max = mx != nullptr;
    m = next;
    std::swap(in, out);
  }
}

void scatter_fn(void* u, size_t item) {
  Exec& e = *static_cast<Exec*>(u);
  const size_t t = item / size_t(e.sitems);
  const int64_t c0 = int64_t(item % size_t(e.sitems)) * e.scols, c1 = std::min(e.plan->N, c0 + e.scols);
  const int64_t r0 = (e.tile0 + int64_t(t)) * e.nb, nv = std::min<int64_t>(e.nb, e.rows - r0);
  e.T->scatter(*e.plan, e.A + t * e.buf_stride, e.bias, e.y, r0, nv, e.nb, c0, c1);
}

bool run(ParallelFor pfor, void* ctx, void (*fn)(void*, size_t), size_t n, Exec* e) {
  if (n == 0) return true;
  if (n == 1 || pfor == nullptr) {
    for (size_t i = 0; i < n; ++i) fn(e, i);
    return true;
  }
  return pfor(ctx, fn, n, e);
}

// Bytes of packed weights per (i, l) block.
size_t block_bytes(const Factor& f) {
  if (!f.wv.empty()) return size_t(f.nktv) * size_t(f.mrv) * (size_t(f.b4) * 4 + 8);
  const size_t per = size_t(f.nkt) * size_t(f.mr);
  switch (f.path) {
    case Path::F32: return per * size_t(f.b) * 4;
    case Path::FP8: return per * size_t(f.b) * 4 + per * 4;
    default: return per * size_t(f.bp) * 4 + per * 4;
  }
}

// blocks per layer_fn item: chunks whose packed weights stay in L2 while every tile streams
// through them, and enough chunks to keep the pool busy
int64_t chunk_of(const Factor& f) {
  const int64_t nblk = f.a * f.d;
  const size_t target = size_t(96) * 1024;
  int64_t chunk = std::max<int64_t>(1, int64_t(target / std::max<size_t>(1, block_bytes(f))));
  return std::min<int64_t>(chunk, std::max<int64_t>(1, nblk / 8));
}

// big-block VNNI int8 factor (T->i8 / T->i8m run it)
inline bool vnni_i8(const Factor& f) { return f.path == Path::I8 && !f.small && f.mrv > 0; }

}  // namespace

std::string run_chain(const Plan& plan, const float* x, const float* bias, float* y, int64_t rows,
                      ParallelFor pfor, void* pfor_ctx) {
  if (rows <= 0) return "";
  // Scratch: reused across calls when no other call holds it (no zeroing, no page faults).
  std::unique_lock<std::mutex> lock(plan.scratch_mu, std::try_to_lock);
  ScratchBuf local;
  ScratchBuf& sb = lock.owns_lock() ? plan.scratch : local;
  Exec e{};
  e.plan = &plan;
  e.T =
#if defined(BFC_HAVE_AVX512BF16)
      plan.isa == 3 ? &avx512bf16_table() :
#endif
#if defined(BFC_HAVE_AVX512)
      plan.isa >= 2 ? &avx512_table() :
#endif
#if defined(BFC_HAVE_AVX2)
      plan.isa == 1 ? &avx2_table() :
#endif
                    &portable_table();
  e.x = x, e.bias = bias, e.y = y, e.rows = rows;
  e.nb = tile_width(rows);
  const int64_t all_tiles = num_tiles(rows, e.nb);
  e.buf_stride = round_up(size_t(plan.max_dim) * e.nb);
  e.q_stride = round_up(size_t(plan.max_pairs) * e.nb);
  // panel: tiles whose two activation buffers fit in about 1 MB (at least 2 tiles, so
  // two threads share the gathers of a panel)
  const size_t tile_bytes = (2 * e.buf_stride + e.q_stride) * sizeof(float);
  // panels of equal size (an even number of tiles where possible: the tiles of a small-block
  // run are the parallel items, so an odd panel leaves a thread idle)
  const int64_t max_panel = std::max<int64_t>(2, int64_t((size_t(1) << 20) / tile_bytes));
  const int64_t npanels = (all_tiles + max_panel - 1) / max_panel;
  int64_t panel = (all_tiles + npanels - 1) / npanels;
  if (panel % 2 == 1 && panel < all_tiles) ++panel;
  const size_t cs_floats = round_up(size_t(panel) * e.nb);
  e.p_stride = 2 * round_up(size_t(plan.df_group_rows) * e.nb);
  // fused int8 passes (AVX-512 tables, 16-wide tiles): first quantization in the gather, the
  // amax of a VNNI factor following a VNNI factor tracked in the previous epilogue
  const bool fuse = e.T->gather_q != nullptr && e.nb == 16;
  const bool direct = plan.direct_out && e.T->i8y != nullptr && e.nb == 16;
  int64_t max_parts = 0;
  if (fuse)
    for (size_t l = 0; l + 1 < plan.factors.size(); ++l)
      if (vnni_i8(plan.factors[l]) && vnni_i8(plan.factors[l + 1])) {
        const Factor& f = plan.factors[l];
        max_parts = std::max(max_parts, (f.a * f.d + chunk_of(f) - 1) / chunk_of(f));
      }
  const size_t mxp_floats = round_up(size_t(max_parts) * size_t(panel) * size_t(e.nb));
  const size_t total =
      2 * e.buf_stride * panel + e.q_stride * panel + 3 * cs_floats + e.p_stride * panel + mxp_floats;
  float* base = sb.get(total);
  auto cols_per_item = [](int64_t n) { return std::max<int64_t>(64, (n / 4 + 15) / 16 * 16); };
  e.gcols = cols_per_item(plan.M), e.scols = cols_per_item(plan.N);
  e.gitems = (plan.M + e.gcols - 1) / e.gcols, e.sitems = (plan.N + e.scols - 1) / e.scols;
  const char* const fail = "KSMatMul: onnxruntime's parallel-for failed";
  const size_t L = plan.factors.size();
  for (e.tile0 = 0; e.tile0 < all_tiles; e.tile0 += panel) {
    e.ntiles = std::min<int64_t>(panel, all_tiles - e.tile0);
    e.A = base;
    e.B = base + e.buf_stride * panel;
    e.Q = e.B + e.buf_stride * panel;
    e.CS = e.Q + e.q_stride * panel;
    e.INV = e.CS + cs_floats;
    e.MX = e.INV + cs_floats;
    e.P = e.MX + cs_floats;
    e.MXP = e.P + e.p_stride * panel;
    e.nparts = 0;
    const bool gq = fuse && plan.gather_q;
    if (gq) {
      if (!run(pfor, pfor_ctx, gather_q_fn, size_t(e.ntiles), &e)) return fail;
    } else if (!run(pfor, pfor_ctx, gather_fn, size_t(e.ntiles * e.gitems), &e)) {
      return fail;
    }
    for (size_t l = 0; l < L;) {
      const Factor& f = plan.factors[l];
      e.f = &f;
      if (f.small) {
        size_t r = l;
        while (r < L && plan.factors[r].small) ++r;
        e.run0 = l, e.run1 = r;
        e.nparts = 0;
        if (!run(pfor, pfor_ctx, small_run_fn, size_t(e.ntiles), &e)) return fail;
        if (run_passes(plan, e.T, l, r) % 2) std::swap(e.A, e.B);
        l = r;
        continue;
      }
      e.f_small_i8 = false;
      if (f.path == Path::I8 && !(l == 0 && gq) && !run(pfor, pfor_ctx, quant_fn, size_t(e.ntiles), &e))
        return fail;
      const int64_t nblk = f.a * f.d;
      e.chunk = chunk_of(f);
      const int64_t nchunks = (nblk + e.chunk - 1) / e.chunk;
      e.track = fuse && l + 1 < L && vnni_i8(f) && vnni_i8(plan.factors[l + 1]);
      e.direct = direct && l + 1 == L;
      if (!run(pfor, pfor_ctx, layer_fn, size_t(nchunks), &e)) return fail;
      if (e.direct) {  // y written: no last buffer, no scatter
        e.direct = false;
        break;
      }
      e.nparts = e.track ? nchunks : 0;
      e.track = false;
      std::swap(e.A, e.B);
      ++l;
    }
    if (!direct && !run(pfor, pfor_ctx, scatter_fn, size_t(e.ntiles * e.sitems), &e)) return fail;
  }
  return "";
}

}  // namespace ks
}  // namespace bfc
