// The one validation of a KSMatMul node (see ks_validate.h and the spec in bfc/ops.py).
#include "ks_validate.h"

#include <algorithm>
#include <sstream>

namespace bfc {
namespace ks {
namespace {

// x * y for non-negative x, y; false when the product exceeds kMaxElems (no overflow:
// y > kMaxElems / x  <=>  x * y > kMaxElems for x > 0).
bool mul_ok(int64_t x, int64_t y, int64_t* out) {
  if (x < 0 || y < 0 || (x != 0 && y > kMaxElems / x)) return false;
  *out = x * y;
  return true;
}

std::string pattern_str(const int64_t* p) {
  std::ostringstream o;
  o << "(" << p[0] << ", " << p[1] << ", " << p[2] << ", " << p[3] << ")";
  return o.str();
}

std::string input_name(const char* kind, size_t l) {
  std::ostringstream o;
  o << kind << "_" << l << " (input " << 2 + 2 * l + (kind[0] == 's') << ")";
  return o.str();
}

// known dims equal, unknown dims match anything
bool dims_match(const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  if (got.size() != want.size()) return false;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != kUnknownDim && got[i] != want[i]) return false;
  return true;
}

std::string check_perm(const char* name, const std::vector<int64_t>& p, int64_t n) {
  if (p.empty()) return "";
  std::ostringstream o;
  if (int64_t(p.size()) != n) {
    o << "KSMatMul: attribute '" << name << "' has " << p.size() << " entries but the chain "
      << (name[0] == 'i' ? "input" : "output") << " dimension is " << n << " (it must be a permutation of 0.."
      << n - 1 << ", or absent for identity)";
    return o.str();
  }
  std::vector<char> seen(size_t(n), 0);
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] < 0 || p[i] >= n || seen[size_t(p[i])]) {
      o << "KSMatMul: attribute '" << name << "' is not a permutation of 0.." << n - 1 << ": entry " << i << " is "
        << p[i] << (p[i] >= 0 && p[i] < n ? " (repeated)" : " (out of range)");
      return o.str();
    }
    seen[size_t(p[i])] = 1;
  }
  return "";
}

// X, bias, then values_l, scale_l for each of the L factors
std::string check_input_count(size_t L, size_t num_inputs) {
  if (num_inputs == 2 + 2 * L) return "";
  std::ostringstream err;
  err << "KSMatMul: 'patterns' describes " << L << " factors, so the node needs " << 2 + 2 * L
      << " inputs (X, bias, then values_l, scale_l per factor), got " << num_inputs;
  if (num_inputs > 2 + 2 * L) err << " (more)";
  else if (num_inputs >= 2) err << ": " << input_name(num_inputs % 2 ? "scale" : "values", (num_inputs - 2) / 2) << " is missing";
  return err.str();
}

// patterns -> M, N.  Chain rule: outputs of factor l (a*c*d) = inputs of factor l+1 (a*b*d).
std::string check_patterns(const NodeDesc& n, ChainDims* dims) {
  std::ostringstream err;
  if (!n.has_patterns) return "KSMatMul: attribute 'patterns' (int64 list, (a, b, c, d) per factor) is required";
  const std::vector<int64_t>& p = n.patterns;
  if (p.empty() || p.size() % 4 != 0) {
    err << "KSMatMul: attribute 'patterns' must hold 4 positive integers (a, b, c, d) per factor, got " << p.size()
        << " values";
    return err.str();
  }
  int64_t prev_out = 0;
  for (size_t l = 0; l < p.size() / 4; ++l) {
    const int64_t* q = &p[4 * l];
    const int64_t a = q[0], b = q[1], c = q[2], d = q[3];
    if (a < 1 || b < 1 || c < 1 || d < 1 || a >= kMaxDim || b >= kMaxDim || c >= kMaxDim || d >= kMaxDim) {
      err << "KSMatMul: factor " << l << " has pattern (a, b, c, d) = " << pattern_str(q)
          << "; every entry must be a positive integer below 2^31";
      return err.str();
    }
    int64_t ad, abd, acd, nnz;
    if (!mul_ok(a, d, &ad) || !mul_ok(ad, b, &abd) || !mul_ok(ad, c, &acd) || !mul_ok(abd, c, &nnz) ||
        abd >= kMaxDim || acd >= kMaxDim) {
      err << "KSMatMul: factor " << l << " pattern " << pattern_str(q)
          << " is too large (feature dimensions must stay below 2^31, a*b*c*d below 2^40)";
      return err.str();
    }
    if (l > 0 && prev_out != abd) {
      err << "KSMatMul: invalid chain: factor " << l - 1 << " " << pattern_str(q - 4) << " has a*c*d = " << prev_out
          << " outputs but factor " << l << " " << pattern_str(q) << " has a*b*d = " << abd << " inputs";
      return err.str();
    }
    if (l == 0) dims->M = abd;
    prev_out = dims->N = acd;
  }
  return "";
}

// values (a, d, b, c) of a supported type; scale float32, 4-D, every dim 1 or full, dim 2 = 1
std::string check_factor(const NodeDesc& n, bool need_constants, size_t l) {
  const int64_t* q = &n.patterns[4 * l];
  const int64_t a = q[0], b = q[1], c = q[2], d = q[3];
  const TensorDesc& v = n.factors[2 * l];
  const TensorDesc& s = n.factors[2 * l + 1];
  const std::vector<int64_t> want = {a, d, b, c};
  std::ostringstream err;
  if (v.dtype != kTypeUnknown && std::string(dtype_name(v.dtype)) == "unsupported") {
    err << "KSMatMul: input " << input_name("values", l) << " has ONNX element type " << v.dtype
        << "; supported: int8, float8e4m3fn, float8e5m2, float16, float32";
  } else if (v.rank_known && !dims_match(v.dims, want)) {
    err << "KSMatMul: input " << input_name("values", l) << " has shape " << shape_str(v.dims) << " but pattern "
        << pattern_str(q) << " needs (a, d, b, c) = " << shape_str(want);
  } else if (v.dtype == kTypeInt8 && b > kMaxInt8Reduction) {
    err << "KSMatMul: int8 factor " << l << " has b = " << b << " > " << kMaxInt8Reduction
        << " inputs per block (int32 accumulation could overflow); use float16/float32 values";
  } else if (s.dtype != kTypeUnknown && s.dtype != kTypeFloat) {
    err << "KSMatMul: input " << input_name("scale", l) << " must be float32, got ONNX element type " << s.dtype;
  } else if (s.rank_known && (s.dims.size() != 4 || !dims_match(s.dims, {s.dims[0] == 1 ? 1 : a, s.dims[1] == 1 ? 1 : d, 1,
                                                                          s.dims[3] == 1 ? 1 : c}))) {
    err << "KSMatMul: input " << input_name("scale", l) << " has shape " << shape_str(s.dims)
        << "; it must be 4-D and broadcastable to values (a, d, b, c) = " << shape_str(want)
        << " with every dim 1 or full and dim 2 equal to 1, e.g. (1, 1, 1, 1), (" << a << ", " << d << ", 1, 1) or ("
        << a << ", " << d << ", 1, " << c << ")";
  } else if (need_constants && (v.data == nullptr || s.data == nullptr || !v.rank_known || !s.rank_known ||
                                  v.dtype == kTypeUnknown || s.dtype == kTypeUnknown)) {
    err << "KSMatMul: " << input_name(v.data == nullptr ? "values" : "scale", l)
        << " must be a constant initializer (values and scales are prepacked at session creation)";
  }
  return err.str();
}

// X: rank >= 1, last dim M, leading dims >= 0 (unknown dims pass)
std::string check_x(const ChainDims& chain, const TensorDesc& x) {
  if (!x.rank_known) return "";
  std::ostringstream err;
  if (x.dtype != kTypeUnknown && x.dtype != kTypeFloat) {
    err << "KSMatMul: X (input 0) must be float32, got ONNX element type " << x.dtype;
  } else if (x.dims.empty() || (x.dims.back() != kUnknownDim && x.dims.back() != chain.M)) {
    err << "KSMatMul: X (input 0) has shape " << shape_str(x.dims)
        << " but the chain expects rank >= 1 and a last dimension of M = " << chain.M;
  } else {
    for (int64_t v : x.dims)
      if (v < 0 && v != kUnknownDim) {
        err << "KSMatMul: X (input 0) has a negative dimension in shape " << shape_str(x.dims);
        break;
      }
  }
  return err.str();
}

std::string check_bias(const ChainDims& chain, const TensorDesc& bias) {
  if (!bias.present) return "";
  const bool type_ok = bias.dtype == kTypeUnknown || bias.dtype == kTypeFloat;
  if (type_ok && (!bias.rank_known || dims_match(bias.dims, {chain.N}))) return "";
  std::ostringstream err;
  err << "KSMatMul: bias (input 1) has shape " << (bias.rank_known ? shape_str(bias.dims) : "?")
      << " and ONNX element type " << bias.dtype << "; it must be float32 of shape (" << chain.N
      << ",), N = " << chain.N << " outputs of the chain";
  return err.str();
}

}  // namespace

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    o << (i ? ", " : "");
    if (s[i] == kUnknownDim) o << "?";
    else o << s[i];
  }
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

const char* dtype_name(int t) {
  switch (t) {
    case kTypeFloat: return "float32";
    case kTypeInt8: return "int8";
    case kTypeFloat16: return "float16";
    case kTypeF8E4M3FN: return "float8e4m3fn";
    case kTypeF8E5M2: return "float8e5m2";
    default: return "unsupported";
  }
}

std::string validate_node(const NodeDesc& n, bool need_constants, ChainDims* dims) {
  *dims = ChainDims{};
  std::string e = check_patterns(n, dims);
  if (!e.empty()) return e;
  const size_t L = dims->L = n.patterns.size() / 4;
  if (!(e = check_input_count(L, 2 + n.factors.size())).empty()) return e;
  for (size_t l = 0; l < L; ++l)
    if (!(e = check_factor(n, need_constants, l)).empty()) return e;
  if (!(e = check_perm("in_perm", n.in_perm, dims->M)).empty()) return e;
  if (!(e = check_perm("out_perm", n.out_perm, dims->N)).empty()) return e;
  if (!(e = check_bias(*dims, n.bias)).empty()) return e;
  return check_x(*dims, n.x);
}

std::string validate_run(const ChainDims& chain, size_t num_inputs, const TensorDesc& x, const TensorDesc& bias,
                         int64_t* rows) {
  *rows = 0;
  std::string e = check_input_count(chain.L, num_inputs);
  if (!e.empty()) return e;
  if (!x.present || !x.rank_known) return "KSMatMul: input X (input 0) is missing";
  e = check_x(chain, x);
  if (e.empty()) e = check_bias(chain, bias);
  if (!e.empty()) return e;
  // rows * max(M, N) <= kMaxElems bounds every index of X and Y
  int64_t r = 1, elems = 0;
  for (size_t i = 0; i + 1 < x.dims.size(); ++i)
    if (x.dims[i] == kUnknownDim || !mul_ok(r, x.dims[i], &r) || !mul_ok(r, std::max(chain.M, chain.N), &elems))
      return "KSMatMul: X (input 0) shape " + shape_str(x.dims) + " is unknown or too large";
  *rows = r;
  return "";
}

}  // namespace ks
}  // namespace bfc
