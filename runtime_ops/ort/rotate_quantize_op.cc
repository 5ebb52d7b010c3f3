// ONNX Runtime adapter for ai.bfc::RotateQuantize (opset 1): the rotation and per-row int8
// quantization of LowBitMatMul, computed once per input tensor and shared by the layers that read
// it (Q, K and V read the same LayerNorm output).  Spec and numpy reference: bfc/ops.py
// (rotate_quantize_reference).
//
//   inputs:  X float32 [..., K], then the rotation inputs (as LowBitMatMul's inputs 4..: rot_patterns
//            values_l/scale_l pairs, or rot_angles = 1: the block and one angle tensor per stage)
//   outputs: Q int8 [..., K]       q[r, k] = rint(clip(xr[r, k] * 127/amax_r, -127, 127)), xr = x Q
//            S float32 [..., 1]    s[r] = amax_r / 127
//   so that  LowBitMatMul(Q, bias, codes, scales, S; prequantized = 1)
//          = LowBitMatMul(X, bias, codes, scales, rotation...)     bit for bit (the same kernels).
// Validation: attributes and known shapes in shape inference, constants at kernel creation, X at
// every run; every message is an OrtStatus.
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "../kernels/lowbit.h"
#include "op_common.h"

namespace bfc {
namespace ort {
namespace {

const char* const kOpName = "RotateQuantize";
constexpr int kTypeInt8 = 3;

struct Kernel {
  Api api;
  lowbit::Plan plan;
};

template <class IntFn, class ListFn>
std::string attrs(lowbit::Desc* d, IntFn&& get_int, ListFn&& get_list) {
  d->op_name = kOpName;
  d->rot_first = 1;
  std::string e = get_int("K", &d->K, &d->has_k);
  if (e.empty()) e = get_list("rot_patterns", &d->rot_patterns, &d->has_rot);
  if (e.empty()) e = get_int("rot_angles", &d->rot_angles, &d->has_angles);
  if (e.empty() && d->has_rot && d->rot_patterns.size() % 4 != 0)
    e = std::string(kOpName) + ": attribute 'rot_patterns' must hold 4 integers (a, b, c, d) per rotation factor, got " +
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
    d.rot.resize(e.empty() ? lowbit::rotation_inputs(d) : 0);
    for (size_t i = 0; e.empty() && i < d.rot.size(); ++i) e = constant_input(api, info, kOpName, 1 + i, &d.rot[i]);
    std::unique_ptr<Kernel> k(new Kernel());
    k->api = api;
    if (e.empty()) e = lowbit::build_rotate_quantize(d, std::getenv("BFC_KS_ISA"), &k->plan);
    if (!e.empty()) return error(api, e);
    *kernel = k.release();
    return nullptr;
  } catch (const std::bad_alloc&) {
    return error(api, "RotateQuantize: out of memory while building the rotation", kFail);
  } catch (...) {
    return error(api, "RotateQuantize: kernel creation failed", kFail);
  }
}

OrtStatus* compute(void* kp, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kp);
  if (k == nullptr) return nullptr;
  const Api& api = k->api;
  try {
    size_t nin = 0;
    if (OrtStatus* st = api.KernelContext_GetInputCount(ctx, &nin)) return st;
    ks::TensorDesc x;
    const OrtValue* v = nullptr;
    if (OrtStatus* st = api.KernelContext_GetInput(ctx, 0, &v)) return st;
    std::string e = v == nullptr ? std::string("RotateQuantize: X (input 0) is missing") : describe_value(api, v, &x);
    int64_t rows = 0;
    if (e.empty()) e = lowbit::validate_rotate_quantize_run(k->plan, nin, x, &rows);
    if (!e.empty()) return error(api, e);
    std::vector<int64_t> sd = x.dims;
    sd.back() = 1;
    OrtValue *qv = nullptr, *sv = nullptr;
    if (OrtStatus* st = api.KernelContext_GetOutput(ctx, 0, x.dims.data(), x.dims.size(), &qv)) return st;
    if (OrtStatus* st = api.KernelContext_GetOutput(ctx, 1, sd.data(), sd.size(), &sv)) return st;
    if (rows == 0) return nullptr;
    void *q = nullptr, *s = nullptr;
    if (qv == nullptr || sv == nullptr) return error(api, "RotateQuantize: onnxruntime returned no output tensor", kFail);
    if (OrtStatus* st = api.GetTensorMutableData(qv, &q)) return st;
    if (OrtStatus* st = api.GetTensorMutableData(sv, &s)) return st;
    if (x.data == nullptr || q == nullptr || s == nullptr)
      return error(api, "RotateQuantize: input or output tensor has no data", kFail);
    PforCtx pctx{&api, ctx};
    e = lowbit::rotate_quantize(k->plan, static_cast<const float*>(x.data), static_cast<int8_t*>(q),
                                static_cast<float*>(s), rows, ort_parallel_for, &pctx);
    return e.empty() ? nullptr : error(api, e, kFail);
  } catch (const std::bad_alloc&) {
    return error(api, "RotateQuantize: out of memory", kFail);
  } catch (...) {
    return error(api, "RotateQuantize: compute failed", kFail);
  }
}

// Q = X's shape (int8), S = X.shape[:-1] + (1,) (float32); unknown rank: both stay unknown.
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
    d.rot.resize(nin > 1 ? nin - 1 : 0);
    for (size_t i = 0; i < nin && e.empty(); ++i)
      e = infer_input(api, ctx, i, false, i == 0 ? &d.x : &d.rot[i - 1], i == 0 ? &xsym : nullptr);
    if (e.empty()) e = lowbit::validate_rotate_quantize(d, false);
    if (!e.empty()) return error(api, e);
    if (!d.x.rank_known) return nullptr;
    if (OrtStatus* st = set_output(api, ctx, 0, kTypeInt8, d.x.dims, xsym, d.K)) return st;
    return set_output(api, ctx, 1, ks::kTypeFloat, d.x.dims, xsym, 1);
  } catch (...) {
    return error(api, "RotateQuantize: shape inference failed (out of memory?)", kFail);
  }
}

void destroy(void* k) { delete static_cast<Kernel*>(k); }
const char* get_name(const CustomOp*) { return kOpName; }
int input_type(const CustomOp*, size_t i) { return i == 0 ? ks::kTypeFloat : ks::kTypeUnknown; }
size_t input_count(const CustomOp*) { return 2; }
int input_char(const CustomOp*, size_t i) { return i == 0 ? kRequired : kVariadic; }
int var_in_min(const CustomOp*) { return 1; }
int output_type(const CustomOp*, size_t i) { return i == 0 ? kTypeInt8 : ks::kTypeFloat; }
size_t output_count(const CustomOp*) { return 2; }

// RotateQuantize: X, then variadic rotation inputs; outputs Q (int8), S (float32)
CustomOp make_op() {
  CustomOp op = base_op();
  op.GetName = get_name;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetInputCharacteristic = input_char;
  op.GetVariadicInputMinArity = var_in_min;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = infer_shape;
  return op;
}

const CustomOp g_op = make_op();

}  // namespace

const CustomOp* rotate_quantize_op() { return &g_op; }

}  // namespace ort
}  // namespace bfc
