// ONNX Runtime adapter for ai.bfc::KSMatMul (opset 1).  Thin: it describes what ORT knows
// about the node as a ks::NodeDesc (attributes, input types and shapes, constant data),
// lets kernels/ validate it (ks::validate_node, ks::build_plan, ks::validate_run), calls
// the kernel and returns every message as an OrtStatus.  Nothing throws across the C
// boundary and nothing aborts: shape inference, kernel creation and compute all validate.
// Spec and numpy reference: bfc/ops.py (ks_matmul_reference).
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "../kernels/ks_chain.h"
#include "op_common.h"

namespace bfc {
namespace ort {
namespace {

const char* const kOpName = "KSMatMul";

struct Kernel {
  Api api;
  ks::Plan plan;
  ks::ChainDims dims;
};

// ---- kernel creation: attributes and constant inputs -> NodeDesc -> build_plan ---------
OrtStatus* create_kernel(const CustomOp*, const OrtApi* ort_api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  const Api api = Api::load(ort_api);
  try {
    ks::NodeDesc n;
    bool unused = false;
    std::string e = kernel_int_list(api, info, kOpName, "patterns", &n.patterns, &n.has_patterns);
    if (e.empty()) e = kernel_int_list(api, info, kOpName, "in_perm", &n.in_perm, &unused);
    if (e.empty()) e = kernel_int_list(api, info, kOpName, "out_perm", &n.out_perm, &unused);
    // factor inputs 2 .. 2L+1, plus input 2L+2 when it is a constant (too many inputs);
    // a non-constant bias is checked at run time
    const size_t L = n.patterns.size() / 4;
    n.factors.resize(2 * L + 1);
    for (size_t i = 0; e.empty() && i < n.factors.size(); ++i)
      e = constant_input(api, info, kOpName, 2 + i, &n.factors[i]);
    if (e.empty() && n.factors.back().data == nullptr) n.factors.pop_back();
    if (e.empty()) e = constant_input(api, info, kOpName, 1, &n.bias);
    if (n.bias.data == nullptr) n.bias = ks::TensorDesc();
    std::unique_ptr<Kernel> k(new Kernel());
    k->api = api;
    if (e.empty()) e = ks::build_plan(n, std::getenv("BFC_KS_ISA"), &k->plan);
    if (!e.empty()) return error(api, e);
    k->dims = ks::ChainDims{k->plan.M, k->plan.N, L};
    *kernel = k.release();
    return nullptr;
  } catch (const std::bad_alloc&) {
    return error(api, "KSMatMul: out of memory while prepacking the factors", kFail);
  } catch (const std::exception& ex) {
    return error(api, std::string("KSMatMul: kernel creation failed: ") + ex.what(), kFail);
  } catch (...) {
    return error(api, "KSMatMul: kernel creation failed", kFail);
  }
}

// ---- compute ----------------------------------------------------------------------------
OrtStatus* compute(void* kp, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kp);
  if (k == nullptr) return nullptr;  // unreachable: CreateKernelV2 failed and ORT stopped
  return compute_rows(
      k->api, ctx, kOpName, k->dims.N,
      [k](size_t nin, const ks::TensorDesc& x, const ks::TensorDesc& b, int64_t* rows) {
        return ks::validate_run(k->dims, nin, x, b, rows);
      },
      [k](const ks::TensorDesc& x, const float* b, float* y, int64_t rows, PforCtx* p) {
        return ks::run_chain(k->plan, static_cast<const float*>(x.data), b, y, rows, ort_parallel_for, p);
      });
}

// ---- shape inference ------------------------------------------------------------------
// Y = X.shape[:-1] + (N,).  A leading dim of X is copied as its value or its symbolic name
// (set_output).  Rank 0 means "unknown rank" here (a scalar X is rejected at run time): Y stays
// unknown.  An invalid node leaves Y unknown and returns the message; onnxruntime <= 1.32
// ignores that status (kernel creation reports the same validation error).
OrtStatus* infer_shape(const CustomOp*, OrtShapeInferContext* ctx) {
  if (g_api == nullptr) return nullptr;
  const Api api = Api::load(g_api);
  try {
    ks::NodeDesc n;
    bool unused = false;
    std::string e = infer_int_list(api, ctx, kOpName, "patterns", &n.patterns, &n.has_patterns);
    if (e.empty()) e = infer_int_list(api, ctx, kOpName, "in_perm", &n.in_perm, &unused);
    if (e.empty()) e = infer_int_list(api, ctx, kOpName, "out_perm", &n.out_perm, &unused);
    size_t nin = 0;
    if (OrtStatus* st = api.ShapeInferContext_GetInputCount(ctx, &nin)) return st;
    std::vector<std::string> xsym;
    n.factors.resize(nin > 2 ? nin - 2 : 0);
    for (size_t i = 0; i < nin && e.empty(); ++i) {
      ks::TensorDesc& t = i == 0 ? n.x : i == 1 ? n.bias : n.factors[i - 2];
      e = infer_input(api, ctx, i, i == 1, &t, i == 0 ? &xsym : nullptr);
    }
    ks::ChainDims dims;
    if (e.empty()) e = ks::validate_node(n, false, &dims);
    if (!e.empty()) return error(api, e);
    if (!n.x.rank_known) return nullptr;
    return set_output(api, ctx, 0, ks::kTypeFloat, n.x.dims, xsym, dims.N);
  } catch (...) {
    return error(api, "KSMatMul: shape inference failed (out of memory?)", kFail);
  }
}

void destroy(void* k) { delete static_cast<Kernel*>(k); }
const char* get_name(const CustomOp*) { return kOpName; }

// KSMatMul: X, bias (optional), then variadic values_l, scale_l per factor
CustomOp make_op() {
  CustomOp op = base_op();
  op.GetName = get_name;
  op.KernelDestroy = destroy;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = infer_shape;
  return op;
}

const CustomOp g_op = make_op();

}  // namespace

const CustomOp* ks_matmul_op() { return &g_op; }

}  // namespace ort
}  // namespace bfc
