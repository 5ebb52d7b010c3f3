// LowBitMatMul: validation, prepacking, the run (rotation, row quantization, GEMM) and the
// portable GEMM.  See lowbit.h for the algebra and the packed layout.
#include "lowbit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <sstream>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "ks_tile.h"

namespace bfc {
namespace lowbit {
namespace {

constexpr int kTypeUint8 = 2;
constexpr int kTypeInt8 = 3;

std::string op(const std::string& m) { return "LowBitMatMul: " + m; }

// bytes of the packed code stream of `count` codes (bfc.lowbit.packing.packed_nbytes)
int64_t stream_bytes(int64_t count, int64_t bits) {
  const int64_t per = bits == 3 ? 8 : 8 / bits, nb = bits == 3 ? 3 : 1;
  return (count + per - 1) / per * nb;
}

// code i of the little-endian bit stream (bfc.lowbit.packing.pack_bits)
inline int code_at(const uint8_t* s, int64_t i, int64_t bits) {
  const int64_t bit = i * bits, byte = bit >> 3, sh = bit & 7;
  uint32_t v = s[byte];
  if (sh + bits > 8) v |= uint32_t(s[byte + 1]) << 8;
  return int((v >> sh) & ((1u << bits) - 1));
}

// float32 -> float16 bits when v is exactly a float16 (then half_to_float gives v back bit for bit)
bool exact_half(float v, uint16_t* out) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, ex = (u >> 23) & 0xffu, man = u & 0x7fffffu;
  uint16_t h;
  if (ex == 0xff) {
    if ((man & 0x1fffu) != 0 || (man != 0 && (man >> 13) == 0)) return false;
    h = uint16_t(sign | 0x7c00u | (man >> 13));
  } else if (ex == 0) {
    if (man != 0) return false;
    h = uint16_t(sign);
  } else {
    const int e = int(ex) - 127 + 15;
    if (e >= 31) return false;
    if (e >= 1) {
      if (man & 0x1fffu) return false;
      h = uint16_t(sign | uint32_t(e) << 10 | (man >> 13));
    } else {
      const int sh = 13 + (1 - e);
      if (sh > 24) return false;
      const uint32_t full = man | 0x800000u;
      if (full & ((1u << sh) - 1)) return false;
      h = uint16_t(sign | (full >> sh));
    }
  }
  const float back = ks::half_to_float(h);
  uint32_t ub;
  std::memcpy(&ub, &back, 4);
  if (ub != u) return false;
  *out = h;
  return true;
}

// Plan::w: zeroed, 64-byte aligned; from 2 MiB on, 2 MiB aligned and advised for transparent huge
// pages where Linux has them (the pages before the aligned start are never touched).
void alloc_stream(size_t bytes, Plan* p) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t align = bytes >= kHuge ? kHuge : 64;
  p->w_mem.reset(new uint8_t[bytes + align]);
  uint8_t* w = p->w_mem.get() + ((align - (reinterpret_cast<uintptr_t>(p->w_mem.get()) & (align - 1))) & (align - 1));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == kHuge) madvise(w, bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  std::memset(w, 0, bytes);
  p->w = w;
  p->w_bytes = bytes;
}

// code u into vector j, byte i of the chunk at c (lowbit.h layout)
inline void put_code(uint8_t* c, int64_t bits, int j, int64_t i, int u) {
  if (bits == 4) {
    c[i] = uint8_t(c[i] | u << (4 * j));
  } else if (bits == 2) {
    c[i] = uint8_t(c[i] | u << (2 * j));
  } else if (j < 6) {
    c[64 * (j / 2) + i] = uint8_t(c[64 * (j / 2) + i] | u << (3 * (j % 2)));
  } else {
    c[64 * (j - 6) + i] = uint8_t(c[64 * (j - 6) + i] | (u & 3) << 6);
    c[128 + i] = uint8_t(c[128 + i] | (u >> 2) << (j == 6 ? 6 : 7));
  }
}

inline int get_code(const uint8_t* c, int64_t bits, int j, int64_t i) {
  if (bits == 4) return (c[i] >> (4 * j)) & 15;
  if (bits == 2) return (c[i] >> (2 * j)) & 3;
  if (j < 6) return (c[64 * (j / 2) + i] >> (3 * (j % 2))) & 7;
  return (c[64 * (j - 6) + i] >> 6) | ((c[128 + i] >> (j == 6 ? 6 : 7)) & 1) << 2;
}

ks::NodeDesc rotation_desc(const Desc& d) {
  ks::NodeDesc n;
  n.has_patterns = true;
  n.patterns = d.rot_patterns;
  n.factors = d.rot;
  n.x = d.x;
  return n;
}

// K = m * 2^k with m odd
void split_size(int64_t K, int64_t* m, int64_t* k) {
  *k = 0;
  while (K % 2 == 0) K /= 2, ++*k;
  *m = K;
}

// (a, b, c, d) of the butterfly rotation's factors and the expected shapes of its inputs
void angle_chain(int64_t K, std::vector<int64_t>* pats, std::vector<std::vector<int64_t>>* shapes) {
  int64_t m, k;
  split_size(K, &m, &k);
  const int64_t d0 = int64_t(1) << k;
  *pats = {1, m, m, d0};
  *shapes = {{1, d0, m, m}};
  for (int64_t l = 1; l <= k; ++l) {
    const int64_t a = m << (l - 1), dl = int64_t(1) << (k - l);
    pats->insert(pats->end(), {a, 2, 2, dl});
    shapes->push_back({a, dl});
  }
}

float float_at(const ks::TensorDesc& t, int64_t i) {
  return t.dtype == ks::kTypeFloat ? static_cast<const float*>(t.data)[i]
                                   : ks::half_to_float(static_cast<const uint16_t*>(t.data)[i]);
}

std::string check_angles(const Desc& d, bool need_constants) {
  std::vector<int64_t> pats;
  std::vector<std::vector<int64_t>> shapes;
  angle_chain(d.K, &pats, &shapes);
  std::ostringstream e;
  if (!d.rot_patterns.empty()) {
    e << "give either 'rot_patterns' or 'rot_angles', not both";
  } else if (d.rot.size() != shapes.size()) {
    e << "rot_angles: K = " << d.K << " needs " << shapes.size() << " rotation inputs (the (1, " << pats[3] << ", "
      << pats[1] << ", " << pats[2] << ") block, then one angle tensor per butterfly stage), got " << d.rot.size();
  } else {
    for (size_t i = 0; i < shapes.size() && e.str().empty(); ++i) {
      const ks::TensorDesc& t = d.rot[i];
      if (t.dtype != ks::kTypeUnknown && t.dtype != ks::kTypeFloat && t.dtype != ks::kTypeFloat16)
        e << "rotation input " << d.rot_first + i << " must be float16 or float32, got ONNX element type " << t.dtype;
      else if (t.rank_known && t.dims != shapes[i]) {
        bool ok = t.dims.size() == shapes[i].size();
        for (size_t j = 0; ok && j < t.dims.size(); ++j) ok = t.dims[j] == ks::kUnknownDim || t.dims[j] == shapes[i][j];
        if (!ok) e << "rotation input " << d.rot_first + i << " has shape " << ks::shape_str(t.dims) << ", expected "
                   << ks::shape_str(shapes[i]);
      }
      if (e.str().empty() && need_constants && (t.data == nullptr || !t.rank_known || t.dtype == ks::kTypeUnknown))
        e << "rotation input " << d.rot_first + i << " must be a constant initializer";
    }
  }
  return e.str().empty() ? "" : std::string(d.op_name) + ": " + e.str();
}


// Plan::rt from the (validated) rotation factors: float32 / float16 values times their scale
void row_wise_values(const Desc& d, Plan* p) {
  p->rt.clear();
  const size_t L = d.rot_patterns.size() / 4;
  std::vector<std::vector<float>> rt(L);
  for (size_t f = 0; f < L; ++f) {
    const int64_t* pt = &d.rot_patterns[4 * f];
    const int64_t a = pt[0], b = pt[1], c = pt[2], dd = pt[3];
    const ks::TensorDesc& v = d.rot[2 * f];
    const ks::TensorDesc& sc = d.rot[2 * f + 1];
    if (v.dtype != ks::kTypeFloat && v.dtype != ks::kTypeFloat16) return;
    const std::vector<int64_t>& ss = sc.dims;
    const float* sv = static_cast<const float*>(sc.data);
    rt[f].resize(size_t(a * b * c * dd));
    for (int64_t i = 0; i < a; ++i)
      for (int64_t l = 0; l < dd; ++l)
        for (int64_t j = 0; j < b; ++j)
          for (int64_t k = 0; k < c; ++k) {
            const float s = sv[((ss[0] == 1 ? 0 : i) * ss[1] + (ss[1] == 1 ? 0 : l)) * ss[3] + (ss[3] == 1 ? 0 : k)];
            rt[f][size_t(((i * b + j) * c + k) * dd + l)] = float_at(v, ((i * dd + l) * b + j) * c + k) * s;
          }
  }
  p->rt.swap(rt);
}

// x Q for rows [r0, r1) one row at a time: per factor o[i, k, :] = sum_j h[i, j, :] * rt[i, j, k, :]
// over the d contiguous features (vectorizable), two row-sized buffers ping-ponging.
void rotate_rows(const Plan& p, const float* x, int64_t r0, int64_t r1, float* xr, float* tmp) {
  const int64_t K = p.K;
  const size_t L = p.rt.size();
  for (int64_t r = r0; r < r1; ++r) {
    const float* h = x + r * K;
    for (size_t f = 0; f < L; ++f) {
      const ks::Factor& fa = p.rot.factors[f];
      const int64_t a = fa.a, b = fa.b, c = fa.c, d = fa.d;
      float* o = f + 1 == L ? xr + r * K : (f % 2 ? tmp + K : tmp);
      const float* w = p.rt[f].data();
      if (b == 2 && c == 2) {  // butterfly stage: both outputs of a 2 x 2 block in one pass
        for (int64_t i = 0; i < a; ++i) {
          const float* h0 = h + 2 * i * d;
          const float* h1 = h0 + d;
          const float* w00 = w + 4 * i * d;
          const float *w01 = w00 + d, *w10 = w00 + 2 * d, *w11 = w00 + 3 * d;
          float* o0 = o + 2 * i * d;
          float* o1 = o0 + d;
          for (int64_t l = 0; l < d; ++l) {
            const float x0 = h0[l], x1 = h1[l];
            o0[l] = x0 * w00[l] + x1 * w10[l];
            o1[l] = x0 * w01[l] + x1 * w11[l];
          }
        }
        h = o;
        continue;
      }
      for (int64_t i = 0; i < a; ++i)
        for (int64_t k = 0; k < c; ++k) {
          float* ok = o + (i * c + k) * d;
          for (int64_t l = 0; l < d; ++l) ok[l] = 0.f;
          for (int64_t j = 0; j < b; ++j) {
            const float* hj = h + (i * b + j) * d;
            const float* wk = w + ((i * b + j) * c + k) * d;
            for (int64_t l = 0; l < d; ++l) ok[l] = ok[l] + hj[l] * wk[l];
          }
        }
      h = o;
    }
  }
}

// The rotation attributes and inputs of d (none, rot_patterns or rot_angles); messages name d.op_name.
std::string check_rotation(const Desc& d, bool need_constants) {
  std::ostringstream e;
  const std::string name = std::string(d.op_name) + ": ";
  if (d.has_angles && d.rot_angles != 0 && d.rot_angles != 1) {
    e << "attribute 'rot_angles' must be 0 or 1, got " << d.rot_angles;
    return name + e.str();
  }
  if (d.rot_angles == 1) return check_angles(d, need_constants);
  if (!d.has_rot || d.rot_patterns.empty()) {
    if (!d.rot.empty()) {
      e << "without 'rot_patterns' or 'rot_angles' the node takes " << d.rot_first << " inputs, got "
        << d.rot_first + d.rot.size();
      return name + e.str();
    }
    return "";
  }
  ks::ChainDims cd;
  std::string r = ks::validate_node(rotation_desc(d), need_constants, &cd);
  if (!r.empty())
    return name + "rotation (inputs " + std::to_string(d.rot_first) +
           ".., values_l/scale_l numbered from input 2 in this message): " + r;
  if (cd.M != d.K || cd.N != d.K) {
    e << "rotation chain 'rot_patterns' maps " << cd.M << " -> " << cd.N << " features but must map K -> K = " << d.K;
    return name + e.str();
  }
  return "";
}

// x_scale of a known X: float32 X.shape[:-1] + (1,)
std::string check_x_scale(const ks::TensorDesc& x, const ks::TensorDesc& s, const char* what) {
  std::ostringstream e;
  if (!s.present) return std::string(what) + " is missing (input 4 of the prequantized form)";
  if (s.dtype != ks::kTypeUnknown && s.dtype != ks::kTypeFloat) {
    e << what << " must be float32, got ONNX element type " << s.dtype;
  } else if (s.rank_known && x.rank_known) {
    bool ok = s.dims.size() == x.dims.size() && !s.dims.empty() &&
              (s.dims.back() == 1 || s.dims.back() == ks::kUnknownDim);
    for (size_t i = 0; ok && i + 1 < s.dims.size(); ++i)
      ok = s.dims[i] == x.dims[i] || s.dims[i] == ks::kUnknownDim || x.dims[i] == ks::kUnknownDim;
    if (!ok) e << what << " has shape " << ks::shape_str(s.dims) << " but X (input 0) has shape "
               << ks::shape_str(x.dims) << ": it must be X.shape[:-1] + (1,)";
  }
  return e.str();
}

std::string check_prequantized(const Desc& d) {
  if ((d.has_rot && !d.rot_patterns.empty()) || d.rot_angles != 0)
    return op("prequantized = 1 takes X already rotated (RotateQuantize): no 'rot_patterns' or 'rot_angles'");
  if (!d.rot.empty())
    return op("prequantized = 1 takes 5 inputs (X, bias, codes, scales, x_scale), got " +
              std::to_string(4 + d.rot.size() + (d.x_scale.present ? 1 : 0)));
  if (!d.x_scale.present) return "";  // shape inference without the input: validate_run checks it
  const std::string e = check_x_scale(d.x, d.x_scale, "x_scale (input 4)");
  return e.empty() ? e : op(e);
}

// Plan::rotate, rot, rt, rot_inputs from the rotation attributes and inputs of the validated d.
std::string build_rotation(const Desc& d, const char* isa_override, Plan* p) {
  std::string e;
  p->rotate = d.rot_angles == 1 || (d.has_rot && !d.rot_patterns.empty());
  p->rot_inputs = d.rot.size();
  if (d.rot_angles == 1) {  // the chain's values from the block and the angles
    Desc c = d;
    std::vector<std::vector<int64_t>> shapes;
    angle_chain(d.K, &c.rot_patterns, &shapes);
    std::vector<std::vector<float>> vals(shapes.size());
    static const float one = 1.f;
    c.rot.clear();
    for (size_t l = 0; l < shapes.size(); ++l) {
      const ks::TensorDesc& t = d.rot[l];
      const int64_t* pt = &c.rot_patterns[4 * l];
      if (l == 0) {
        vals[0].resize(size_t(pt[3] * pt[1] * pt[2]));
        for (size_t i = 0; i < vals[0].size(); ++i) vals[0][i] = float_at(t, int64_t(i));
      } else {
        vals[l].resize(size_t(pt[0] * pt[3] * 4));
        for (int64_t i = 0; i < pt[0] * pt[3]; ++i) {
          const double ang = double(float_at(t, i));
          const float cs = float(std::cos(ang)), sn = float(std::sin(ang));
          vals[l][size_t(4 * i)] = cs, vals[l][size_t(4 * i + 1)] = sn;
          vals[l][size_t(4 * i + 2)] = sn, vals[l][size_t(4 * i + 3)] = -cs;
        }
      }
      c.rot.push_back(ks::TensorDesc{true, ks::kTypeFloat, true, {pt[0], pt[3], pt[1], pt[2]}, vals[l].data()});
      c.rot.push_back(ks::TensorDesc{true, ks::kTypeFloat, true, {1, 1, 1, 1}, &one});
    }
    e = ks::build_plan(rotation_desc(c), isa_override, &p->rot);
    if (!e.empty()) return std::string(d.op_name) + ": rotation: " + e;
    row_wise_values(c, p);
  } else if (p->rotate) {
    e = ks::build_plan(rotation_desc(d), isa_override, &p->rot);
    if (!e.empty()) return std::string(d.op_name) + ": rotation: " + e;
    row_wise_values(d, p);
  }
  return "";
}

}  // namespace

size_t rotation_inputs(const Desc& d) {
  if (d.prequantized == 1) return 0;
  size_t nrot = 2 * (d.rot_patterns.size() / 4);
  if (d.rot_angles == 1) {  // block + one angle tensor per butterfly stage (K = m 2^k)
    nrot = 1;
    for (int64_t K = d.K; K > 0 && K % 2 == 0; K /= 2) ++nrot;
  }
  return nrot;
}

std::string validate(const Desc& d, bool need_constants) {
  std::ostringstream e;
  if (!d.has_k || !d.has_n || !d.has_bits || !d.has_group)
    return op("attributes 'K', 'N', 'bits' and 'group_size' (int64) are required");
  if (d.K < 1 || d.K >= ks::kMaxDim || d.N < 1 || d.N >= ks::kMaxDim || d.K > ks::kMaxElems / d.N) {
    e << "K = " << d.K << " and N = " << d.N << " must be positive, below 2^31, with K*N below 2^40";
    return op(e.str());
  }
  if (d.bits != 2 && d.bits != 3 && d.bits != 4) {
    e << "bits = " << d.bits << "; supported: 2, 3, 4";
    return op(e.str());
  }
  if (d.group < 1 || d.group > d.K || d.group > kMaxGroup) {
    e << "group_size = " << d.group << " must lie in [1, min(K, 2^20)] with K = " << d.K;
    return op(e.str());
  }
  const int64_t ng = (d.K + d.group - 1) / d.group;
  const int64_t nbytes = stream_bytes(ng * d.group * d.N, d.bits);
  const ks::TensorDesc& c = d.codes;
  const ks::TensorDesc& s = d.scales;
  if (c.dtype != ks::kTypeUnknown && c.dtype != kTypeUint8) {
    e << "codes (input 2) must be uint8, got ONNX element type " << c.dtype;
  } else if (c.rank_known && (c.dims.size() != 1 || (c.dims[0] != ks::kUnknownDim && c.dims[0] != nbytes))) {
    e << "codes (input 2) has shape " << ks::shape_str(c.dims) << " but " << ng << " groups of " << d.group
      << " rows x N = " << d.N << " codes of " << d.bits << " bits need (" << nbytes << ",)";
  } else if (s.dtype != ks::kTypeUnknown && s.dtype != ks::kTypeFloat && s.dtype != ks::kTypeFloat16) {
    e << "scales (input 3) must be float16 or float32, got ONNX element type " << s.dtype;
  } else if (s.rank_known && (s.dims.size() != 2 || (s.dims[0] != ks::kUnknownDim && s.dims[0] != ng) ||
                              (s.dims[1] != ks::kUnknownDim && s.dims[1] != d.N))) {
    e << "scales (input 3) has shape " << ks::shape_str(s.dims) << " but needs (n_groups, N) = (" << ng << ", "
      << d.N << ")";
  } else if (need_constants && (c.data == nullptr || s.data == nullptr || !c.rank_known || !s.rank_known ||
                                c.dtype == ks::kTypeUnknown || s.dtype == ks::kTypeUnknown)) {
    e << (c.data == nullptr ? "codes (input 2)" : "scales (input 3)")
      << " must be a constant initializer (prepacked at session creation)";
  } else if (d.has_prequantized && d.prequantized != 0 && d.prequantized != 1) {
    e << "attribute 'prequantized' must be 0 or 1, got " << d.prequantized;
  } else if (d.x.rank_known) {
    const int want = d.prequantized == 1 ? kTypeInt8 : ks::kTypeFloat;
    if (d.x.dtype != ks::kTypeUnknown && d.x.dtype != want)
      e << "X (input 0) must be " << (want == kTypeInt8 ? "int8 (prequantized = 1)" : "float32")
        << ", got ONNX element type " << d.x.dtype;
    else if (d.x.dims.empty() || (d.x.dims.back() != ks::kUnknownDim && d.x.dims.back() != d.K))
      e << "X (input 0) has shape " << ks::shape_str(d.x.dims) << " but needs rank >= 1 and last dim K = " << d.K;
  }
  if (e.str().empty() && d.bias.present) {
    const bool ok = (d.bias.dtype == ks::kTypeUnknown || d.bias.dtype == ks::kTypeFloat) &&
                    (!d.bias.rank_known || (d.bias.dims.size() == 1 &&
                                            (d.bias.dims[0] == ks::kUnknownDim || d.bias.dims[0] == d.N)));
    if (!ok)
      e << "bias (input 1) has shape " << (d.bias.rank_known ? ks::shape_str(d.bias.dims) : "?")
        << " and ONNX element type " << d.bias.dtype << "; it must be float32 (" << d.N << ",)";
  }
  if (!e.str().empty()) return op(e.str());
  if (d.prequantized == 1) return check_prequantized(d);
  return check_rotation(d, need_constants);
}

std::string build_plan(const Desc& d, const char* isa_override, Plan* p) {
  std::string e = validate(d, true);
  if (!e.empty()) return e;
  p->isa = ks::resolve_isa(isa_override, &e);
  if (p->isa < 0) return e;
  p->K = d.K, p->N = d.N, p->bits = d.bits, p->group = d.group;
  p->ngroups = (d.K + d.group - 1) / d.group;
  p->zero = 1 << (d.bits - 1);
  p->ks = d.bits == 4 ? 8 : d.bits == 3 ? 32 : 16;
  p->cb = d.bits == 3 ? 192 : 64;
  p->gstart.assign(size_t(p->ngroups + 1), 0);
  p->kmap.assign(size_t(d.K), 0);
  for (int64_t gi = 0; gi < p->ngroups; ++gi) {
    const int64_t k0 = gi * d.group, len = std::min(d.group, d.K - k0);
    for (int64_t k = 0; k < len; ++k) p->kmap[size_t(k0 + k)] = int32_t(p->gstart[size_t(gi)] + k);
    p->gstart[size_t(gi + 1)] = p->gstart[size_t(gi)] + (len + p->ks - 1) / p->ks * p->ks;
  }
  p->Kp = p->gstart.back();
  p->nblk = (d.N + 15) / 16;
  p->Np = p->nblk * 16;
  p->npanel = (p->nblk + kPanel - 1) / kPanel;
  // scales: float16 in the stream when every one is exactly a float16 (always for float16 inputs)
  // and the kernel converts them in registers (AVX-512: vcvtph2ps); float32 for AVX2 (no F16C in
  // its flags) and portable
  const int64_t nsc = p->ngroups * d.N;
  std::vector<uint16_t> sh;
  p->sc16 = p->isa >= 2;
  if (!p->sc16) {
  } else if (d.scales.dtype == ks::kTypeFloat16) {
    sh.assign(static_cast<const uint16_t*>(d.scales.data), static_cast<const uint16_t*>(d.scales.data) + nsc);
  } else {
    sh.resize(size_t(nsc));
    const float* sf = static_cast<const float*>(d.scales.data);
    for (int64_t i = 0; i < nsc && p->sc16; ++i) p->sc16 = exact_half(sf[i], &sh[size_t(i)]);
    if (!p->sc16) sh.clear();
  }
  const int64_t chunks = p->Kp / p->ks;
  p->panel_bytes = kPanel * chunks * p->cb + p->ngroups * scale_bytes(*p, kPanel);
  const int last = panel_blocks(*p, p->npanel - 1);
  const size_t wbytes = size_t((p->npanel - 1) * p->panel_bytes + last * chunks * p->cb +
                               p->ngroups * scale_bytes(*p, last));
  alloc_stream(wbytes, p);
  const uint8_t* s = static_cast<const uint8_t*>(d.codes.data);
  for (int64_t k = 0; k < d.K; ++k) {
    const int64_t gi = k / d.group, off = p->kmap[size_t(k)] - p->gstart[size_t(gi)];
    const int64_t c = off / p->ks, j = (off % p->ks) / 4, t = off % 4;
    for (int64_t pn = 0; pn < p->npanel; ++pn) {
      const int nvp = panel_blocks(*p, pn);
      uint8_t* gb = const_cast<uint8_t*>(group_base(*p, pn, nvp, gi)) + c * nvp * p->cb;  // w is ours
      const int64_t n1 = std::min(d.N, (pn + 1) * kPanel * 16);
      for (int64_t n = pn * kPanel * 16; n < n1; ++n) {
        const int64_t v = (n / 16) % kPanel;
        put_code(gb + v * p->cb, d.bits, int(j), (n % 16) * 4 + t, code_at(s, k * d.N + n, d.bits));
      }
    }
  }
  for (int64_t pn = 0; pn < p->npanel; ++pn) {
    const int nvp = panel_blocks(*p, pn);
    for (int64_t gi = 0; gi < p->ngroups; ++gi) {
      uint8_t* sb = const_cast<uint8_t*>(group_base(*p, pn, nvp, gi)) + nvp * group_chunks(*p, gi) * p->cb;
      const int64_t n1 = std::min(d.N, (pn + 1) * kPanel * 16);
      for (int64_t n = pn * kPanel * 16; n < n1; ++n) {
        const int64_t o = n - pn * kPanel * 16, i = gi * d.N + n;
        if (p->sc16) std::memcpy(sb + 2 * o, &sh[size_t(i)], 2);
        else reinterpret_cast<float*>(sb)[o] = float_at(d.scales, i);
      }
    }
  }
  p->prequantized = d.prequantized == 1;
  e = build_rotation(d, isa_override, p);
  if (!e.empty()) return e;
  return "";
}

std::string validate_run(const Plan& p, size_t num_inputs, const ks::TensorDesc& x, const ks::TensorDesc& bias,
                         const ks::TensorDesc& x_scale, int64_t* rows) {
  *rows = 0;
  const size_t want = 4 + (p.prequantized ? 1 : p.rot_inputs);
  if (num_inputs != want) return op("the node needs " + std::to_string(want) + " inputs, got " + std::to_string(num_inputs));
  const int xtype = p.prequantized ? kTypeInt8 : ks::kTypeFloat;
  if (!x.present || !x.rank_known || x.dims.empty() || x.dims.back() != p.K || x.dtype != xtype)
    return op("X (input 0) has shape " + (x.rank_known ? ks::shape_str(x.dims) : std::string("?")) + "; it must be " +
              (p.prequantized ? "int8" : "float32") + " with last dim K = " + std::to_string(p.K));
  if (p.prequantized) {
    ks::TensorDesc s = x_scale;
    if (s.present && !s.rank_known) s.present = false;
    std::string e = check_x_scale(x, s, "x_scale (input 4)");
    if (e.empty() && s.dims.back() != 1) e = "x_scale (input 4) must have last dim 1";
    if (!e.empty()) return op(e);
  }
  if (bias.present && (bias.dtype != ks::kTypeFloat || bias.dims.size() != 1 || bias.dims[0] != p.N))
    return op("bias (input 1) must be float32 (" + std::to_string(p.N) + ",), got shape " + ks::shape_str(bias.dims));
  int64_t r = 1;
  const int64_t width = std::max(p.K, p.N);
  for (size_t i = 0; i + 1 < x.dims.size(); ++i) {
    const int64_t v = x.dims[i];
    if (v < 0 || (v != 0 && r > ks::kMaxElems / v) || (r * v != 0 && r * v > ks::kMaxElems / width))
      return op("X (input 0) shape " + ks::shape_str(x.dims) + " is negative or too large");
    r *= v;
  }
  if (p.prequantized && r > 0 && x_scale.data == nullptr) return op("x_scale (input 4) has no data");
  *rows = r;
  return "";
}

// q = rint(clip(h * inv, -127, 127)) (NaN -> 0) as KSMatMul's int8 (bfc/ops.py _quantize_rows);
// rint by the 1.5 * 2^23 trick (exact round-half-even for |t| <= 127, vectorizable).
void quantize_rows(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs) {
  const int64_t K = p.K;
  for (int64_t r = r0; r < r1; ++r) {
    const float* h = xr + r * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(h[k]));
    float inv;
    ks::int8_column_scale(amax, &cs[r], &inv);
    int8_t* qr = q + r * p.Kp;
    std::memset(qr, 0, size_t(p.Kp));
    int32_t* gs = gsum + r * p.ngroups;
    for (int64_t gi = 0; gi < p.ngroups; ++gi) {
      const int64_t k0 = gi * p.group, len = std::min(p.group, K - k0);
      int8_t* dst = qr + p.gstart[size_t(gi)];
      int32_t sum = 0;
      for (int64_t k = 0; k < len; ++k) {
        float t = h[k0 + k] * inv;
        t = t == t ? t : 0.f;
        t = std::min(127.f, std::max(-127.f, t));
        const float rt = (t + 12582912.f) - 12582912.f;
        const int v = int(rt);
        dst[k] = int8_t(v);
        sum += v;
      }
      gs[gi] = sum;
    }
  }
}

int code_at_packed(const Plan& p, int64_t kp, int64_t n) {
  int64_t gi = std::upper_bound(p.gstart.begin(), p.gstart.end(), kp) - p.gstart.begin() - 1;
  const int64_t off = kp - p.gstart[size_t(gi)], pn = n / (16 * kPanel);
  const int nvp = panel_blocks(p, pn);
  const uint8_t* c = group_base(p, pn, nvp, gi) + ((off / p.ks) * nvp + (n / 16) % kPanel) * p.cb;
  return get_code(c, p.bits, int((off % p.ks) / 4), (n % 16) * 4 + off % 4);
}

float scale_at_packed(const Plan& p, int64_t gi, int64_t n) {
  const int64_t pn = n / (16 * kPanel), o = n - pn * 16 * kPanel;
  const int nvp = panel_blocks(p, pn);
  const uint8_t* sb = group_base(p, pn, nvp, gi) + nvp * group_chunks(p, gi) * p.cb;
  if (p.sc16) {
    uint16_t h;
    std::memcpy(&h, sb + 2 * o, 2);
    return ks::half_to_float(h);
  }
  float f;
  std::memcpy(&f, sb + 4 * o, 4);
  return f;
}

// Reference-order GEMM in plain C++: per panel and group, each chunk decoded once for all rows.
void gemm_portable(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
                   int64_t pn1) {
  const int64_t R = r1 - r0, W = 16 * kPanel;
  std::vector<int32_t> isum(size_t(R * W));
  std::vector<float> acc(size_t(R * W));
  std::vector<uint8_t> u(size_t(p.ks * W));
  for (int64_t pn = pn0; pn < pn1; ++pn) {
    const int nvp = panel_blocks(p, pn);
    const int64_t nout = std::min<int64_t>(16 * nvp, p.N - pn * W);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t gi = 0; gi < p.ngroups; ++gi) {
      const uint8_t* gb = group_base(p, pn, nvp, gi);
      const int64_t nch = group_chunks(p, gi);
      std::fill(isum.begin(), isum.end(), 0);
      for (int64_t c = 0; c < nch; ++c) {
        for (int v = 0; v < nvp; ++v)
          for (int64_t kk = 0; kk < p.ks; ++kk)
            for (int n = 0; n < 16; ++n)
              u[size_t(kk * W + v * 16 + n)] =
                  uint8_t(get_code(gb + (c * nvp + v) * p.cb, p.bits, int(kk / 4), n * 4 + kk % 4));
        for (int64_t r = 0; r < R; ++r) {
          const int8_t* qr = a.q + (r0 + r) * p.Kp + p.gstart[size_t(gi)] + c * p.ks;
          int32_t* is = isum.data() + r * W;
          for (int64_t kk = 0; kk < p.ks; ++kk) {
            const int32_t qv = qr[kk];
            const uint8_t* uk = u.data() + kk * W;
            for (int64_t n = 0; n < 16 * nvp; ++n) is[n] += qv * int32_t(uk[n]);
          }
        }
      }
      const uint8_t* sb = gb + nvp * nch * p.cb;
      for (int64_t n = 0; n < nout; ++n) {
        float s;
        if (p.sc16) {
          uint16_t h;
          std::memcpy(&h, sb + 2 * n, 2);
          s = ks::half_to_float(h);
        } else {
          std::memcpy(&s, sb + 4 * n, 4);
        }
        for (int64_t r = 0; r < R; ++r) {
          const int32_t v = isum[size_t(r * W + n)] - p.zero * a.gsum[(r0 + r) * p.ngroups + gi];
          const float f = float(v) * s;
          acc[size_t(r * W + n)] = acc[size_t(r * W + n)] + f;
        }
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = 0; n < nout; ++n) {
        float v = acc[size_t(r * W + n)] * a.cs[r0 + r];
        if (bias != nullptr) v = v + bias[pn * W + n];
        y[(r0 + r) * p.N + pn * W + n] = v;
      }
  }
}

namespace {

struct Exec {
  const Plan* p;
  GemmFn gemm;
  const float* xr;
  Act act;
  int8_t* q;
  int32_t* gsum;
  float* cs;
  const float* bias;
  float* y;
  int64_t rows;
  int64_t qrows;        // rows per quantization item
  int64_t rchunk, nchunk, ritems;  // GEMM items: row chunks x panel chunks
};

void quant_fn(void* u, size_t i) {
  Exec& e = *static_cast<Exec*>(u);
  const int64_t r0 = int64_t(i) * e.qrows, r1 = std::min(e.rows, r0 + e.qrows);
#if defined(BFC_HAVE_AVX512)
  if (e.p->isa >= 2) return quantize_avx512(*e.p, e.xr, r0, r1, e.q, e.gsum, e.cs);
#endif
  quantize_rows(*e.p, e.xr, r0, r1, e.q, e.gsum, e.cs);
}

void gemm_fn(void* u, size_t i) {
  Exec& e = *static_cast<Exec*>(u);
  const int64_t ri = int64_t(i) % e.ritems, ni = int64_t(i) / e.ritems;
  const int64_t r0 = ri * e.rchunk, r1 = std::min(e.rows, r0 + e.rchunk);
  const int64_t pn0 = ni * e.nchunk, pn1 = std::min(e.p->npanel, pn0 + e.nchunk);
  e.gemm(*e.p, e.act, e.bias, e.y, r0, r1, pn0, pn1);
}

bool run_items(ks::ParallelFor pfor, void* ctx, void (*fn)(void*, size_t), size_t n, Exec* e) {
  if (n <= 1 || pfor == nullptr) {
    for (size_t i = 0; i < n; ++i) fn(e, i);
    return true;
  }
  return pfor(ctx, fn, n, e);
}

const char* const kPforFailed = "LowBitMatMul: onnxruntime's parallel-for failed";

GemmFn gemm_fn_of(const Plan& p) {
  return
#if defined(BFC_HAVE_AVX512)
      p.isa >= 2 ? gemm_avx512 :
#endif
#if defined(BFC_HAVE_AVX2)
      p.isa >= 1 ? gemm_avx2 :
#endif
                 gemm_portable;
}

// x Q into xr (rows x K; tmp: 2K + 16 floats, used row by row up to kRowWiseRows rows), or x itself
// without a rotation; *out the rotated rows
std::string rotate(const Plan& p, const float* x, int64_t rows, float* xr, float* tmp, ks::ParallelFor pfor,
                   void* ctx, const float** out) {
  *out = x;
  if (!p.rotate) return "";
  if (!p.rt.empty() && rows <= kRowWiseRows) {
    rotate_rows(p, x, 0, rows, xr, tmp);
  } else {
    std::string err = ks::run_chain(p.rot, x, nullptr, xr, rows, pfor, ctx);
    if (!err.empty()) return err;
  }
  *out = xr;
  return "";
}

std::string gemm(Exec* ep, const float* bias, float* y, ks::ParallelFor pfor, void* ctx);

}  // namespace

std::string run(const Plan& p, const float* x, const float* bias, float* y, int64_t rows, ks::ParallelFor pfor,
                void* ctx) {
  if (rows <= 0) return "";
  Exec e{};
  e.p = &p;
  e.gemm = gemm_fn_of(p);
  // scratch: xr (rotation output), q, gsum, cs
  const size_t xr_f = p.rotate ? size_t(rows) * size_t(p.K) : 0;
  const size_t q_f = (size_t(rows) * size_t(p.Kp) + 3) / 4 + 16;
  const size_t g_f = size_t(rows) * size_t(p.ngroups) + 16;
  const bool row_wise = p.rotate && !p.rt.empty() && rows <= kRowWiseRows;
  const size_t tmp_f = row_wise ? 2 * size_t(p.K) + 16 : 0;
  const size_t total = xr_f + 16 + q_f + g_f + size_t(rows) + 16 + tmp_f;
  // reused across calls when no other call holds it (no zeroing, no page faults)
  std::unique_lock<std::mutex> lock(p.scratch_mu, std::try_to_lock);
  ks::ScratchBuf local;
  float* base = (lock.owns_lock() ? p.scratch : local).get(total);
  float* xr = base;
  e.q = reinterpret_cast<int8_t*>(base + xr_f + 16);
  e.gsum = reinterpret_cast<int32_t*>(base + xr_f + 16 + q_f);
  e.cs = base + xr_f + 16 + q_f + g_f;
  std::string err = rotate(p, x, rows, xr, e.cs + rows + 16, pfor, ctx, &e.xr);
  if (!err.empty()) return op(err);
  e.rows = rows;
  e.qrows = 16;
  if (!run_items(pfor, ctx, quant_fn, size_t((rows + e.qrows - 1) / e.qrows), &e)) return kPforFailed;
  return gemm(&e, bias, y, pfor, ctx);
}

std::string run_quantized(const Plan& p, const int8_t* q, const float* cs, const float* bias, float* y,
                          int64_t rows, ks::ParallelFor pfor, void* ctx) {
  if (rows <= 0) return "";
  Exec e{};
  e.p = &p;
  e.gemm = gemm_fn_of(p);
  // the kernel layout of q (groups padded to Kp, zeros) and its group sums; the row scales as given
  const size_t q_f = (size_t(rows) * size_t(p.Kp) + 3) / 4 + 16;
  const size_t g_f = size_t(rows) * size_t(p.ngroups) + 16;
  std::unique_lock<std::mutex> lock(p.scratch_mu, std::try_to_lock);
  ks::ScratchBuf local;
  float* base = (lock.owns_lock() ? p.scratch : local).get(q_f + g_f);
  int8_t* qp = reinterpret_cast<int8_t*>(base);
  int32_t* gsum = reinterpret_cast<int32_t*>(base + q_f);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = q + r * p.K;
    int8_t* qr = qp + r * p.Kp;
    std::memset(qr, 0, size_t(p.Kp));
    for (int64_t gi = 0; gi < p.ngroups; ++gi) {
      const int64_t k0 = gi * p.group, len = std::min(p.group, p.K - k0);
      std::memcpy(qr + p.gstart[size_t(gi)], src + k0, size_t(len));
      int32_t sum = 0;
      for (int64_t k = 0; k < len; ++k) sum += src[k0 + k];
      gsum[r * p.ngroups + gi] = sum;
    }
  }
  e.q = qp, e.gsum = gsum, e.cs = const_cast<float*>(cs);
  e.rows = rows;
  return gemm(&e, bias, y, pfor, ctx);
}

namespace {
// GEMM items of a prepared Exec (q, gsum, cs, rows set)
std::string gemm(Exec* ep, const float* bias, float* y, ks::ParallelFor pfor, void* ctx) {
  Exec& e = *ep;
  const Plan& p = *e.p;
  const int64_t rows = e.rows;
  e.act = Act{e.q, e.gsum, e.cs};
  e.bias = bias, e.y = y;
  // items: panels (64 outputs) x row chunks of 64 rows; up to kGemvRows rows are one row chunk
  // (the GEMV kernels stream each panel's weights once for all rows)
  e.rchunk = rows <= kGemvRows ? kGemvRows : 64;
  e.nchunk = 1;
  e.ritems = (rows + e.rchunk - 1) / e.rchunk;
  const int64_t nitems = (p.npanel + e.nchunk - 1) / e.nchunk;
  if (!run_items(pfor, ctx, gemm_fn, size_t(e.ritems * nitems), &e)) return kPforFailed;
  return "";
}
}  // namespace

// ---- RotateQuantize ------------------------------------------------------------------------------
std::string validate_rotate_quantize(const Desc& d, bool need_constants) {
  const std::string name = std::string(d.op_name) + ": ";
  std::ostringstream e;
  if (!d.has_k) return name + "attribute 'K' (int64) is required";
  if (d.K < 1 || d.K >= ks::kMaxDim) {
    e << "K = " << d.K << " must be positive and below 2^31";
  } else if (d.rot_angles != 1 && (!d.has_rot || d.rot_patterns.empty())) {
    e << "give the rotation: 'rot_patterns' or 'rot_angles' = 1 (LowBitMatMul quantizes unrotated rows itself)";
  } else if (d.x.rank_known) {
    if (d.x.dtype != ks::kTypeUnknown && d.x.dtype != ks::kTypeFloat)
      e << "X (input 0) must be float32, got ONNX element type " << d.x.dtype;
    else if (d.x.dims.empty() || (d.x.dims.back() != ks::kUnknownDim && d.x.dims.back() != d.K))
      e << "X (input 0) has shape " << ks::shape_str(d.x.dims) << " but needs rank >= 1 and last dim K = " << d.K;
  }
  if (!e.str().empty()) return name + e.str();
  return check_rotation(d, need_constants);
}

std::string build_rotate_quantize(const Desc& d, const char* isa_override, Plan* p) {
  std::string e = validate_rotate_quantize(d, true);
  if (!e.empty()) return e;
  p->isa = ks::resolve_isa(isa_override, &e);
  if (p->isa < 0) return e;
  // one group of K inputs, unpadded: quantize_rows / quantize_avx512 write q rows of K bytes
  p->K = p->Kp = p->group = d.K;
  p->ngroups = 1;
  p->gstart = {0, d.K};
  return build_rotation(d, isa_override, p);
}

std::string validate_rotate_quantize_run(const Plan& p, size_t num_inputs, const ks::TensorDesc& x, int64_t* rows) {
  *rows = 0;
  const std::string name = "RotateQuantize: ";
  if (num_inputs != 1 + p.rot_inputs)
    return name + "the node needs " + std::to_string(1 + p.rot_inputs) + " inputs, got " + std::to_string(num_inputs);
  if (!x.present || !x.rank_known || x.dims.empty() || x.dims.back() != p.K || x.dtype != ks::kTypeFloat)
    return name + "X (input 0) has shape " + (x.rank_known ? ks::shape_str(x.dims) : std::string("?")) +
           "; it must be float32 with last dim K = " + std::to_string(p.K);
  int64_t r = 1;
  for (size_t i = 0; i + 1 < x.dims.size(); ++i) {
    const int64_t v = x.dims[i];
    if (v < 0 || (v != 0 && r > ks::kMaxElems / v) || (r * v != 0 && r * v > ks::kMaxElems / p.K))
      return name + "X (input 0) shape " + ks::shape_str(x.dims) + " is negative or too large";
    r *= v;
  }
  *rows = r;
  return "";
}

std::string rotate_quantize(const Plan& p, const float* x, int8_t* q, float* cs, int64_t rows, ks::ParallelFor pfor,
                            void* ctx) {
  if (rows <= 0) return "";
  Exec e{};
  e.p = &p;
  const size_t xr_f = size_t(rows) * size_t(p.K);
  const size_t total = xr_f + 16 + size_t(rows) + 16 + 2 * size_t(p.K) + 16;
  std::unique_lock<std::mutex> lock(p.scratch_mu, std::try_to_lock);
  ks::ScratchBuf local;
  float* base = (lock.owns_lock() ? p.scratch : local).get(total);
  e.gsum = reinterpret_cast<int32_t*>(base + xr_f + 16);  // one group: the row sums (not an output)
  std::string err = rotate(p, x, rows, base, base + xr_f + 16 + rows + 16, pfor, ctx, &e.xr);
  if (!err.empty()) return "RotateQuantize: " + err;
  e.q = q, e.cs = cs;
  e.rows = rows;
  e.qrows = 16;
  if (!run_items(pfor, ctx, quant_fn, size_t((rows + e.qrows - 1) / e.qrows), &e))
    return "RotateQuantize: onnxruntime's parallel-for failed";
  return "";
}

}  // namespace lowbit
}  // namespace bfc
