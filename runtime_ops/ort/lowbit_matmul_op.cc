// ONNX Runtime adapter for ai.bfc::LowBitMatMul (opset 1): rotated low-bit weights, int8 row
// activations (kernels/lowbit.h; spec and numpy reference in bfc/ops.py).  Two input forms:
//   float X:                  X, bias?, codes, scales, rotation inputs...   (rotation + row
//                             quantization inside the node)
//   prequantized = 1, int8 X: X = q, bias?, codes, scales, x_scale        (q and the row scales
//                             x_scale of RotateQuantize, shared by the layers reading one tensor)
// Validation as KSMatMul's: attributes and known shapes in shape inference and at kernel
// creation, the run's X / bias / x_scale at every run; every message is an OrtStatus.
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "../kernels/lowbit.h"
#include "op_common.h"

namespace bfc {
namespace ort {
namespace {

const char* const kOpName = "LowBitMatMul";

struct Kernel {
  Api api;
  lowbit::Plan plan;
};

template <class IntFn, class ListFn>
std::string attrs(lowbit::Desc* d, IntFn&& get_int, ListFn&& get_list) {
  std::string e = get_int("K", &d->K, &d->has_k);
  if (e.empty()) e = get_int("N", &d->N, &d->has_n);
  if (e.empty()) e = get_int("bits", &d->bits, &d->has_bits);
  if (e.empty()) e = get_int("group_size", &d->group, &d->has_group);
  if (e.empty()) e = get_list("rot_patterns", &d->rot_patterns, &d->has_rot);
  if (e.empty()) e = get_int("rot_angles", &d->rot_angles, &d->has_angles);
  if (e.empty()) e = get_int("prequantized", &d->prequantized, &d->has_prequantized);
  if (e.empty() && d->has_rot && d->rot_patterns.size() % 4 != 0)
    e = "LowBitMatMul: attribute 'rot_patterns' must hold 4 integers (a, b, c, d) per rotation factor, got " +
        std::to_string(d->rot_patterns.size());
  return e;
}

OrtStatus* create_kernel(const CustomOp*, const OrtApi* ort_api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  const Api api = Api::load(ort_api);
  try {
    lowbit::Desc d;
    std::string e = attrs(
        &d, [&](const char* n, int64_t* v, bool* p) { return kernel_int(api, info, kOpName, n, v, p); },
        [&](const char* n, std::vector<int64_t>* v, bool* p) {
          return kernel_int_list(api, info, kOpName, n, v, p);
        });
    const size_t nrot = lowbit::rotation_inputs(d);
    if (e.empty()) e = constant_input(api, info, kOpName, 2, &d.codes);
    if (e.empty()) e = constant_input(api, info, kOpName, 3, &d.scales);
    d.rot.resize(nrot);
    for (size_t i = 0; e.empty() && i < nrot; ++i) e = constant_input(api, info, kOpName, 4 + i, &d.rot[i]);
    if (e.empty()) e = constant_input(api, info, kOpName, 1, &d.bias);
    if (d.bias.data == nullptr) d.bias = ks::TensorDesc();
    std::unique_ptr<Kernel> k(new Kernel());
    k->api = api;
    if (e.empty()) e = lowbit::build_plan(d, std::getenv("BFC_KS_ISA"), &k->plan);
    if (!e.empty()) return error(api, e);
    *kernel = k.release();
    return nullptr;
  } catch (const std::bad_alloc&) {
    return error(api, "LowBitMatMul: out of memory while prepacking the weights", kFail);
  } catch (...) {
    return error(api, "LowBitMatMul: kernel creation failed", kFail);
  }
}

OrtStatus* compute(void* kp, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kp);
  if (k == nullptr) return nullptr;
  const Api& api = k->api;
  ks::TensorDesc xs;  // x_scale (prequantized form): input 4
  if (k->plan.prequantized) {
    size_t nin = 0;
    if (OrtStatus* st = api.KernelContext_GetInputCount(ctx, &nin)) return st;
    if (nin == 5) {
      const OrtValue* v = nullptr;
      if (OrtStatus* st = api.KernelContext_GetInput(ctx, 4, &v)) return st;
      if (v != nullptr) {
        std::string e = describe_value(api, v, &xs);
        if (!e.empty()) return error(api, "LowBitMatMul: x_scale (input 4): " + e);
      }
    }
  }
  return compute_rows(
      api, ctx, kOpName, k->plan.N,
      [k, &xs](size_t nin, const ks::TensorDesc& x, const ks::TensorDesc& b, int64_t* rows) {
        return lowbit::validate_run(k->plan, nin, x, b, xs, rows);
      },
      [k, &xs](const ks::TensorDesc& x, const float* b, float* y, int64_t rows, PforCtx* p) {
        if (k->plan.prequantized)
          return lowbit::run_quantized(k->plan, static_cast<const int8_t*>(x.data),
                                       static_cast<const float*>(xs.data), b, y, rows, ort_parallel_for, p);
        return lowbit::run(k->plan, static_cast<const float*>(x.data), b, y, rows, ort_parallel_for, p);
      });
}

OrtStatus* infer_shape(const CustomOp*, OrtShapeInferContext* ctx) {
  if (g_api == nullptr) return nullptr;
  const Api api = Api::load(g_api);
  try {
    lowbit::Desc d;
    std::string e = attrs(
        &d, [&](const char* n, int64_t* v, bool* p) { return infer_int(api, ctx, kOpName, n, v, p); },
        [&](const char* n, std::vector<int64_t>* v, bool* p) {
          return infer_int_list(api, ctx, kOpName, n, v, p);
        });
    size_t nin = 0;
    if (OrtStatus* st = api.ShapeInferContext_GetInputCount(ctx, &nin)) return st;
    std::vector<std::string> xsym;
    // prequantized: input 4 is x_scale (inputs after it count as rotation inputs: rejected)
    const size_t first_rot = d.prequantized == 1 ? 5 : 4;
    d.rot.resize(nin > first_rot ? nin - first_rot : 0);
    for (size_t i = 0; i < nin && e.empty(); ++i) {
      ks::TensorDesc& t = i == 0 ? d.x : i == 1 ? d.bias : i == 2 ? d.codes : i == 3 ? d.scales
                        : i < first_rot ? d.x_scale : d.rot[i - first_rot];
      e = infer_input(api, ctx, i, i == 1, &t, i == 0 ? &xsym : nullptr);
    }
    if (e.empty() && nin < 4) e = "LowBitMatMul: the node needs X, bias, codes and scales (4 inputs at least)";
    if (e.empty()) e = lowbit::validate(d, false);
    if (!e.empty()) return error(api, e);
    if (!d.x.rank_known) return nullptr;
    return set_output(api, ctx, 0, ks::kTypeFloat, d.x.dims, xsym, d.N);
  } catch (...) {
    return error(api, "LowBitMatMul: shape inference failed (out of memory?)", kFail);
  }
}

void destroy(void* k) { delete static_cast<Kernel*>(k); }
const char* get_name(const CustomOp*) { return kOpName; }
// X: float32, or int8 in the prequantized form (checked by validate / validate_run)
int input_type(const CustomOp*, size_t i) { return i == 1 ? ks::kTypeFloat : ks::kTypeUnknown; }

// LowBitMatMul: X, bias (optional), then variadic codes, scales, rotation inputs or x_scale
CustomOp make_op() {
  CustomOp op = base_op();
  op.GetName = get_name;
  op.GetInputType = input_type;
  op.KernelDestroy = destroy;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = infer_shape;
  return op;
}

const CustomOp g_op = make_op();

}  // namespace

const CustomOp* lowbit_matmul_op() { return &g_op; }

}  // namespace ort
}  // namespace bfc
