// Shared ONNX Runtime adapter code of the ai.bfc ops: reading attributes, constant inputs and
// type/shape infos into the ORT-free descriptors of kernels/ (ks::TensorDesc), the per-run row
// loop (compute_rows), the parallel-for bridge, the output shape of shape inference and the
// OrtCustomOp table every op starts from.  Each op lives in its own file (ks_matmul_op.cc,
// lowbit_matmul_op.cc, rotate_quantize_op.cc) and hands its OrtCustomOp to the registration in
// op_common.cc.  Nothing throws across the C boundary: every failure is an OrtStatus.
#pragma once

#include <atomic>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "../kernels/ks_chain.h"
#include "ort_abi.h"

namespace bfc {
namespace ort {

extern const char* const kDomain;  // "ai.bfc"
extern const OrtApi* g_api;        // set once in RegisterCustomOps (shape inference has no api argument)

OrtStatus* error(const Api& api, const std::string& msg, int code = kInvalidArgument);
// Takes ownership of an ORT status: returns its message and releases it.
std::string consume(const Api& api, OrtStatus* st);
// true when an attribute-read message says the attribute is absent
bool absent_attr(const std::string& m);

// Element type and dims of a type/shape info; symbolic names too when sym != null.
std::string describe(const Api& api, const OrtTensorTypeAndShapeInfo* info, ks::TensorDesc* t,
                     std::vector<std::string>* sym = nullptr);
// Type, shape and data of a tensor value.
std::string describe_value(const Api& api, const OrtValue* v, ks::TensorDesc* t);

// Attribute readers; *present = false when the attribute is absent.  `op` prefixes messages.
std::string kernel_int_list(const Api& api, const OrtKernelInfo* info, const char* op, const char* name,
                            std::vector<int64_t>* out, bool* present);
std::string infer_int_list(const Api& api, const OrtShapeInferContext* ctx, const char* op, const char* name,
                           std::vector<int64_t>* out, bool* present);
std::string kernel_int(const Api& api, const OrtKernelInfo* info, const char* op, const char* name, int64_t* out,
                       bool* present);
std::string infer_int(const Api& api, const OrtShapeInferContext* ctx, const char* op, const char* name,
                      int64_t* out, bool* present);

// A constant input's descriptor at kernel creation; a missing or computed input stays present
// without data.
std::string constant_input(const Api& api, const OrtKernelInfo* info, const char* op, size_t i, ks::TensorDesc* t);

// Reads input i of a shape-inference context into t (symbolic names of dims into sym when given).
// An absent optional input has no type: t->present is false then (optional inputs only).
std::string infer_input(const Api& api, OrtShapeInferContext* ctx, size_t i, bool optional, ks::TensorDesc* t,
                        std::vector<std::string>* sym = nullptr);

// ks::ParallelFor over onnxruntime's thread pool
struct PforCtx {
  const Api* api;
  const OrtKernelContext* ctx;
};
bool ort_parallel_for(void* c, void (*fn)(void*, size_t), size_t n, void* user);

// Output `index` of shape inference: type `dtype`, shape xd with the last dim replaced by last
// (last < 0: dropped).  Leading dims keep their symbolic names; an unknown unnamed one gets a
// fresh name (a nameless -1 would be a concrete negative size to the next op's inference).
OrtStatus* set_output(const Api& api, OrtShapeInferContext* ctx, size_t index, int dtype,
                      const std::vector<int64_t>& xd, const std::vector<std::string>& xsym, int64_t last);

// Reads the run's inputs 0 and 1 (X and the optional bias), validates them with ``validate``,
// allocates Y = X's shape with the last dim N (float32) and runs ``run`` over the rows; every
// failure is an ORT error status naming ``op``.
template <class Validate, class Run>
OrtStatus* compute_rows(const Api& api, OrtKernelContext* ctx, const std::string& op, int64_t N, Validate validate,
                        Run run) {
  try {
    size_t nin = 0;
    if (OrtStatus* st = api.KernelContext_GetInputCount(ctx, &nin)) return st;
    ks::TensorDesc x, bias;
    std::string e;
    for (size_t i = 0; i < 2 && i < nin && e.empty(); ++i) {
      const OrtValue* v = nullptr;
      if (OrtStatus* st = api.KernelContext_GetInput(ctx, i, &v)) return st;
      if (v != nullptr) e = describe_value(api, v, i == 0 ? &x : &bias);
    }
    int64_t rows = 0;
    if (e.empty()) e = validate(nin, x, bias, &rows);
    if (!e.empty()) return error(api, e);
    std::vector<int64_t> yd = x.dims;
    yd.back() = N;
    OrtValue* yv = nullptr;
    if (OrtStatus* st = api.KernelContext_GetOutput(ctx, 0, yd.data(), yd.size(), &yv)) return st;
    if (rows == 0) return nullptr;
    void* y = nullptr;
    if (yv == nullptr) return error(api, op + ": onnxruntime returned no output tensor", kFail);
    if (OrtStatus* st = api.GetTensorMutableData(yv, &y)) return st;
    if (x.data == nullptr || y == nullptr) return error(api, op + ": input or output tensor has no data", kFail);
    PforCtx pctx{&api, ctx};
    e = run(x, static_cast<const float*>(bias.data), static_cast<float*>(y), rows, &pctx);
    return e.empty() ? nullptr : error(api, e, kFail);
  } catch (const std::bad_alloc&) {
    return error(api, op + ": out of memory", kFail);
  } catch (...) {
    return error(api, op + ": compute failed", kFail);
  }
}

// The OrtCustomOp fields every ai.bfc op shares (version 17, CPU, X float + optional bias +
// variadic constants, one float output, opset 1); each op sets its name and kernel callbacks.
CustomOp base_op();

// The ops of the domain (one per file), registered by RegisterCustomOps.
const CustomOp* ks_matmul_op();
const CustomOp* lowbit_matmul_op();
const CustomOp* rotate_quantize_op();

}  // namespace ort
}  // namespace bfc
