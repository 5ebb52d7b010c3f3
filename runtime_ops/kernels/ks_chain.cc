// Plan building (validation + prepacking) and the per-tile chain executor.
#include "ks_chain.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <sstream>
#include <mutex>

namespace bfc {
namespace ks {
namespace {

constexpr int64_t kMaxDim = int64_t(1) << 31;      // any single feature dimension
constexpr int64_t kMaxElems = int64_t(1) << 40;    // guard for products of dimensions
constexpr int64_t kMaxInt8Reduction = int64_t(1) << 16;  // int32 accumulation headroom

bool mul_ok(int64_t x, int64_t y, int64_t* out) {
  if (x < 0 || y < 0) return false;
  if (x != 0 && y > kMaxElems / x) return false;
  *out = x * y;
  return true;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

const char* dtype_name(int t) {
  switch (t) {
    case 1: return "float32";
    case 3: return "int8";
    case 10: return "float16";
    case 17: return "float8e4m3fn";
    case 19: return "float8e5m2";
    default: return "unsupported";
  }
}

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

float values_at(const FactorInput& in, int64_t idx) {
  switch (in.values_dtype) {
    case 1: return static_cast<const float*>(in.values)[idx];
    case 3: return float(static_cast<const int8_t*>(in.values)[idx]);
    case 10: return half_to_float(static_cast<const uint16_t*>(in.values)[idx]);
    case 17: return luts().e4m3[static_cast<const uint8_t*>(in.values)[idx]];
    case 19: return luts().e5m2[static_cast<const uint8_t*>(in.values)[idx]];
    default: return 0.f;
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

std::string check_perm(const char* name, const std::vector<int64_t>& p, int64_t n) {
  if (p.empty()) return "";
  std::ostringstream o;
  if (int64_t(p.size()) != n) {
    o << "KSMatMul: attribute '" << name << "' has " << p.size() << " entries but the chain "
      << (name[0] == 'i' ? "input" : "output") << " dimension is " << n
      << " (it must be a permutation of 0.." << n - 1 << ", or absent for identity)";
    return o.str();
  }
  std::vector<char> seen(size_t(n), 0);
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] < 0 || p[i] >= n || seen[size_t(p[i])]) {
      o << "KSMatMul: attribute '" << name << "' is not a permutation of 0.." << n - 1 << ": entry " << i
        << " is " << p[i] << (p[i] >= 0 && p[i] < n ? " (repeated)" : " (out of range)");
      return o.str();
    }
    seen[size_t(p[i])] = 1;
  }
  return "";
}

}  // namespace

const char* isa_name(int isa) { return isa == 1 ? "avx2" : "portable"; }

bool cpu_has_avx2() {
#if defined(BFC_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::string build_plan(const std::vector<int64_t>& patterns, const std::vector<FactorInput>& inputs,
                       const std::vector<int64_t>& in_perm, const std::vector<int64_t>& out_perm,
                       const char* isa_override, Plan* plan) {
  std::ostringstream err;
  if (patterns.empty() || patterns.size() % 4 != 0) {
    err << "KSMatMul: attribute 'patterns' must hold 4 positive integers (a, b, c, d) per factor, got "
        << patterns.size() << " values";
    return err.str();
  }
  const size_t L = patterns.size() / 4;
  if (inputs.size() != L) {
    err << "KSMatMul: 'patterns' describes " << L << " factors, so the node needs " << 2 + 2 * L
        << " inputs (X, bias, then values_l, scale_l per factor), got factors for " << inputs.size();
    return err.str();
  }
  plan->factors.clear();
  plan->factors.resize(L);
  for (size_t l = 0; l < L; ++l) {
    const int64_t a = patterns[4 * l], b = patterns[4 * l + 1], c = patterns[4 * l + 2], d = patterns[4 * l + 3];
    if (a < 1 || b < 1 || c < 1 || d < 1 || a >= kMaxDim || b >= kMaxDim || c >= kMaxDim || d >= kMaxDim) {
      err << "KSMatMul: factor " << l << " has pattern (a, b, c, d) = (" << a << ", " << b << ", " << c << ", "
          << d << "); every entry must be a positive integer below 2^31";
      return err.str();
    }
    int64_t ad, abd, acd, nnz;
    if (!mul_ok(a, d, &ad) || !mul_ok(ad, b, &abd) || !mul_ok(ad, c, &acd) || !mul_ok(abd, c, &nnz) ||
        abd >= kMaxDim || acd >= kMaxDim) {
      err << "KSMatMul: factor " << l << " pattern (" << a << ", " << b << ", " << c << ", " << d
          << ") is too large (feature dimensions must stay below 2^31)";
      return err.str();
    }
    if (l > 0) {
      const Factor& p = plan->factors[l - 1];
      if (p.out_dim() != abd) {
        err << "KSMatMul: invalid chain: factor " << l - 1 << " (" << p.a << ", " << p.b << ", " << p.c << ", "
            << p.d << ") has a*c*d = " << p.out_dim() << " outputs but factor " << l << " (" << a << ", " << b
            << ", " << c << ", " << d << ") has a*b*d = " << abd << " inputs";
        return err.str();
      }
    }
    const FactorInput& in = inputs[l];
    const std::vector<int64_t> want = {a, d, b, c};
    if (in.values_shape != want) {
      err << "KSMatMul: input values_" << l << " (input " << 2 + 2 * l << ") has shape "
          << shape_str(in.values_shape) << " but pattern (" << a << ", " << b << ", " << c << ", " << d
          << ") needs (a, d, b, c) = " << shape_str(want);
      return err.str();
    }
    if (std::string(dtype_name(in.values_dtype)) == "unsupported") {
      err << "KSMatMul: input values_" << l << " (input " << 2 + 2 * l << ") has ONNX element type "
          << in.values_dtype << "; supported: int8, float8e4m3fn, float8e5m2, float16, float32";
      return err.str();
    }
    if (in.values == nullptr && nnz > 0) {
      err << "KSMatMul: input values_" << l << " has no data";
      return err.str();
    }
    if (in.scale_dtype != 1) {
      err << "KSMatMul: input scale_" << l << " (input " << 3 + 2 * l << ") must be float32, got ONNX element type "
          << in.scale_dtype;
      return err.str();
    }
    const std::vector<int64_t>& ss = in.scale_shape;
    if (ss.size() != 4 || (ss[0] != 1 && ss[0] != a) || (ss[1] != 1 && ss[1] != d) || ss[2] != 1 ||
        (ss[3] != 1 && ss[3] != c)) {
      err << "KSMatMul: input scale_" << l << " (input " << 3 + 2 * l << ") has shape " << shape_str(ss)
          << "; it must be 4-D and broadcastable to values (a, d, b, c) = " << shape_str(want)
          << " with every dim 1 or full and dim 2 equal to 1, e.g. (1, 1, 1, 1), (" << a << ", " << d
          << ", 1, 1) or (" << a << ", " << d << ", 1, " << c << ")";
      return err.str();
    }
    if (in.scale == nullptr) {
      err << "KSMatMul: input scale_" << l << " has no data";
      return err.str();
    }
    if (in.values_dtype == 3 && b > kMaxInt8Reduction) {
      err << "KSMatMul: int8 factor " << l << " has b = " << b << " > " << kMaxInt8Reduction
          << " inputs per block (int32 accumulation could overflow); use float16/float32 values";
      return err.str();
    }

    Factor& f = plan->factors[l];
    f.a = a, f.b = b, f.c = c, f.d = d;
    f.path = in.values_dtype == 3 ? Path::I8 : (in.values_dtype == 17 || in.values_dtype == 19) ? Path::FP8 : Path::F32;
    f.mr = choose_mr(c);
    f.small = b <= 4 && c <= 4;
    f.nkt = (c + f.mr - 1) / f.mr;
    f.bp = (b + 1) / 2;
    const int mr = f.mr;
    auto scale_at = [&](int64_t i, int64_t ll, int64_t k) {
      const int64_t si = ss[0] == 1 ? 0 : i, sl = ss[1] == 1 ? 0 : ll, sk = ss[3] == 1 ? 0 : k;
      return in.scale[(si * ss[1] + sl) * ss[3] + sk];
    };
    auto vidx = [&](int64_t i, int64_t ll, int64_t j, int64_t k) { return ((i * d + ll) * b + j) * c + k; };
    if (f.path == Path::F32) {
      f.wf.assign(size_t(ad * f.nkt * b * mr), 0.f);
      for (int64_t i = 0; i < a; ++i)
        for (int64_t ll = 0; ll < d; ++ll)
          for (int64_t kt = 0; kt < f.nkt; ++kt) {
            float* w = f.wf.data() + ((i * d + ll) * f.nkt + kt) * b * mr;
            for (int64_t j = 0; j < b; ++j)
              for (int r = 0; r < mr; ++r) {
                const int64_t k = kt * mr + r;
                if (k < c) w[j * mr + r] = values_at(in, vidx(i, ll, j, k)) * scale_at(i, ll, k);
              }
          }
    } else {
      f.sc.assign(size_t(ad * f.nkt * mr), 0.f);
      const float extra = 1.f;
      for (int64_t i = 0; i < a; ++i)
        for (int64_t ll = 0; ll < d; ++ll)
          for (int64_t kt = 0; kt < f.nkt; ++kt)
            for (int r = 0; r < mr; ++r) {
              const int64_t k = kt * mr + r;
              if (k < c) f.sc[size_t(((i * d + ll) * f.nkt + kt) * mr + r)] = scale_at(i, ll, k) * extra;
            }
      if (f.path == Path::FP8) {
        const float* lut = in.values_dtype == 17 ? luts().e4m3 : luts().e5m2;
        f.wf.assign(size_t(ad * f.nkt * b * mr), 0.f);
        const uint8_t* v8 = static_cast<const uint8_t*>(in.values);
        for (int64_t i = 0; i < a; ++i)
          for (int64_t ll = 0; ll < d; ++ll)
            for (int64_t kt = 0; kt < f.nkt; ++kt) {
              float* w = f.wf.data() + ((i * d + ll) * f.nkt + kt) * b * mr;
              for (int64_t j = 0; j < b; ++j)
                for (int r = 0; r < mr; ++r) {
                  const int64_t k = kt * mr + r;
                  if (k < c) w[j * mr + r] = lut[v8[vidx(i, ll, j, k)]];
                }
            }
      } else {
        f.wq.assign(size_t(ad * f.nkt * f.bp * mr * 2), 0);
        const int8_t* v8 = static_cast<const int8_t*>(in.values);
        for (int64_t i = 0; i < a; ++i)
          for (int64_t ll = 0; ll < d; ++ll)
            for (int64_t kt = 0; kt < f.nkt; ++kt) {
              int16_t* w = f.wq.data() + ((i * d + ll) * f.nkt + kt) * f.bp * mr * 2;
              for (int64_t j = 0; j < b; ++j)
                for (int r = 0; r < mr; ++r) {
                  const int64_t k = kt * mr + r;
                  if (k < c) w[((j / 2) * mr + r) * 2 + (j % 2)] = v8[vidx(i, ll, j, k)];
                }
            }
        if (f.small) {  // float copy for the exact float-accumulating small kernels
          f.wf.assign(size_t(ad * b * c), 0.f);
          for (int64_t i = 0; i < a; ++i)
            for (int64_t ll = 0; ll < d; ++ll)
              for (int64_t j = 0; j < b; ++j)
                for (int64_t k = 0; k < c; ++k)
                  f.wf[size_t(((i * d + ll) * b + j) * c + k)] = float(v8[vidx(i, ll, j, k)]);
        }
      }
    }
  }
  plan->M = plan->factors.front().in_dim();
  plan->N = plan->factors.back().out_dim();
  std::string e = check_perm("in_perm", in_perm, plan->M);
  if (!e.empty()) return e;
  e = check_perm("out_perm", out_perm, plan->N);
  if (!e.empty()) return e;
  // block-major storage order of every factor input (see ks_chain.h)
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
  plan->in_row.resize(size_t(plan->M));
  for (int64_t fi = 0; fi < plan->M; ++fi) plan->in_row[size_t(fi)] = block_row(plan->factors[0], fi);
  plan->in_perm = in_perm;
  plan->out_perm = out_perm;
  plan->gather_row.resize(size_t(plan->M));
  for (int64_t fi = 0; fi < plan->M; ++fi)
    plan->gather_row[size_t(in_perm.empty() ? fi : in_perm[size_t(fi)])] = plan->in_row[size_t(fi)];
  plan->scatter_row.resize(size_t(plan->N));
  for (int64_t o = 0; o < plan->N; ++o) plan->scatter_row[size_t(o)] = int32_t(out_perm.empty() ? o : out_perm[size_t(o)]);
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
  const std::string isa = isa_override ? isa_override : "";
  if (isa.empty() || isa == "auto") {
    plan->isa = cpu_has_avx2() ? 1 : 0;
  } else if (isa == "portable") {
    plan->isa = 0;
  } else if (isa == "avx2") {
    if (!cpu_has_avx2()) return "KSMatMul: BFC_KS_ISA=avx2 was requested but this build or CPU has no AVX2/FMA";
    plan->isa = 1;
  } else {
    return "KSMatMul: BFC_KS_ISA must be auto, portable or avx2, got '" + isa + "'";
  }
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
};

void gather_fn(void* u, size_t item) {
  Exec& e = *static_cast<Exec*>(u);
  const size_t t = item / size_t(e.gitems);
  const int64_t c0 = int64_t(item % size_t(e.gitems)) * e.gcols, c1 = std::min(e.plan->M, c0 + e.gcols);
  const int64_t r0 = (e.tile0 + int64_t(t)) * e.nb, nv = std::min<int64_t>(e.nb, e.rows - r0);
  e.T->gather(*e.plan, e.x, r0, nv, e.nb, c0, c1, e.A + t * e.buf_stride);
}

void quant_fn(void* u, size_t t) {
  Exec& e = *static_cast<Exec*>(u);
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
        for (int n = 0; n < e.nb; ++n) {  // as LayerTable::amax
          e.CS[t * e.nb + n] = am[n] / 127.f;
          e.INV[t * e.nb + n] = am[n] > 0.f ? 127.f / am[n] : 0.f;
        }
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
  const size_t per = size_t(f.nkt) * size_t(f.mr);
  switch (f.path) {
    case Path::F32: return per * size_t(f.b) * 4;
    case Path::FP8: return per * size_t(f.b) * 4 + per * 4;
    default: return per * size_t(f.bp) * 4 + per * 4;
  }
}

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
  const size_t total = 2 * e.buf_stride * panel + e.q_stride * panel + 3 * cs_floats + e.p_stride * panel;
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
    if (!run(pfor, pfor_ctx, gather_fn, size_t(e.ntiles * e.gitems), &e)) return fail;
    for (size_t l = 0; l < L;) {
      const Factor& f = plan.factors[l];
      e.f = &f;
      if (f.small) {
        size_t r = l;
        while (r < L && plan.factors[r].small) ++r;
        e.run0 = l, e.run1 = r;
        if (!run(pfor, pfor_ctx, small_run_fn, size_t(e.ntiles), &e)) return fail;
        if (run_passes(plan, e.T, l, r) % 2) std::swap(e.A, e.B);
        l = r;
        continue;
      }
      e.f_small_i8 = false;
      if (f.path == Path::I8 && !run(pfor, pfor_ctx, quant_fn, size_t(e.ntiles), &e)) return fail;
      const int64_t nblk = f.a * f.d;
      // chunks of blocks whose packed weights stay in L2 while every tile streams through them,
      // and enough chunks to keep the pool busy
      const size_t target = size_t(96) * 1024;
      int64_t chunk = std::max<int64_t>(1, int64_t(target / std::max<size_t>(1, block_bytes(f))));
      chunk = std::min<int64_t>(chunk, std::max<int64_t>(1, nblk / 8));
      e.chunk = chunk;
      if (!run(pfor, pfor_ctx, layer_fn, size_t((nblk + chunk - 1) / chunk), &e)) return fail;
      std::swap(e.A, e.B);
      ++l;
    }
    if (!run(pfor, pfor_ctx, scatter_fn, size_t(e.ntiles * e.sitems), &e)) return fail;
  }
  return "";
}

}  // namespace ks
}  // namespace bfc
