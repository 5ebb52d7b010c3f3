// Validation of a KSMatMul node: the one place that decides whether attributes, input
// types and shapes are acceptable.  Plain C++ (no ONNX Runtime types); the ORT adapter
// describes what it knows (shape inference: types and possibly symbolic shapes; kernel
// creation: constant factor tensors; compute: the actual X and bias) and turns a
// non-empty message into an ORT status.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace bfc {
namespace ks {

// ONNX element types the op reads.
enum : int { kTypeUnknown = 0, kTypeFloat = 1, kTypeInt8 = 3, kTypeFloat16 = 10, kTypeF8E4M3FN = 17, kTypeF8E5M2 = 19 };
constexpr int64_t kUnknownDim = -1;                  // a dim whose value is not known (symbolic or unnamed)
constexpr int64_t kMaxDim = int64_t(1) << 31;        // bound of every feature dimension (int32 row indices)
constexpr int64_t kMaxElems = int64_t(1) << 40;      // bound of products of dimensions (no int64 overflow)
constexpr int64_t kMaxInt8Reduction = int64_t(1) << 16;  // b of an int8 factor: |acc| <= b*127*127 < 2^31

// What is known about one input.  Unknown parts are skipped, known parts are checked.
struct TensorDesc {
  bool present = false;        // the input exists (bias is optional)
  int dtype = kTypeUnknown;    // ONNX element type
  bool rank_known = false;     // dims is meaningful
  std::vector<int64_t> dims;   // kUnknownDim = unknown dim
  const void* data = nullptr;  // constant data, when the caller has it
};

struct NodeDesc {
  bool has_patterns = false;
  std::vector<int64_t> patterns, in_perm, out_perm;  // empty perm = identity
  TensorDesc x, bias;
  std::vector<TensorDesc> factors;  // inputs 2, 3, ...: values_0, scale_0, values_1, ...
};

struct ChainDims {
  int64_t M = 0, N = 0;  // chain input / output features
  size_t L = 0;          // factors
};

// Attributes and every known type/shape of the node; need_constants: values and scales
// must carry data (kernel creation).  Returns "" (and the chain dims) or a message naming
// the op, the input and the shapes.
std::string validate_node(const NodeDesc& node, bool need_constants, ChainDims* dims);

// Inputs of one run (fully known shapes): their count, X and bias; rows = product of X's
// leading dims.
std::string validate_run(const ChainDims& chain, size_t num_inputs, const TensorDesc& x, const TensorDesc& bias,
                         int64_t* rows);

std::string shape_str(const std::vector<int64_t>& dims);  // "(2, ?, 8)", "(5,)"
const char* dtype_name(int onnx_type);                     // "float32", ... or "unsupported"

}  // namespace ks
}  // namespace bfc
