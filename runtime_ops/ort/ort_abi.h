// The parts of ONNX Runtime's C ABI this library uses, declared without ORT's headers.
//
// ORT's C API is an append-only table of function pointers (OrtApi); the numbers
// below are zero-based slot indices in that table (byte offset = index * sizeof(void*)),
// checked against the API version 29 header and the onnxruntime 1.31.1 wheel.  Every
// slot listed here is used by the ops in ort/ (op_common.cc) and exercised by tests/test_runtime_*.py
// through a real session.  If you have ORT's headers, build with
// -DBFC_ORT_INCLUDE_DIR=<dir> to check every index against offsetof(OrtApi, name).
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {
struct OrtStatus;
struct OrtApi;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtShapeInferContext;
struct OrtOpAttr;
}

namespace bfc {
namespace ort {

// Lowest API version whose functions are used (KernelContext_ParallelFor and the
// shape-inference context arrived in version 17, i.e. onnxruntime 1.17).
constexpr uint32_t kApiVersion = 17;

// Enums (C int): error codes, input/output characteristics, OrtOpAttrType.  Element types
// are ONNX's TensorProto numbers (ks::kTypeFloat, ... in kernels/ks_validate.h).
enum : int { kOk = 0, kFail = 1, kInvalidArgument = 2 };
enum : int { kOpAttrInt = 1, kOpAttrInts = 2, kOpAttrFloats = 4 };
enum : int { kRequired = 0, kOptional = 1, kVariadic = 2 };

// X(slot, name, return type, (argument list))
#define BFC_ORT_SLOTS(X)                                                                              \
  X(0, CreateStatus, OrtStatus*, (int code, const char* msg))                                         \
  X(2, GetErrorMessage, const char*, (const OrtStatus* status))                                       \
  X(26, CreateCustomOpDomain, OrtStatus*, (const char* domain, OrtCustomOpDomain** out))               \
  X(27, CustomOpDomain_Add, OrtStatus*, (OrtCustomOpDomain * domain, const void* op))                 \
  X(28, AddCustomOpDomain, OrtStatus*, (OrtSessionOptions * options, OrtCustomOpDomain* domain))      \
  X(51, GetTensorMutableData, OrtStatus*, (OrtValue * value, void** out))                             \
  X(57, CreateTensorTypeAndShapeInfo, OrtStatus*, (OrtTensorTypeAndShapeInfo * *out))                 \
  X(58, SetTensorElementType, OrtStatus*, (OrtTensorTypeAndShapeInfo * info, int type))               \
  X(59, SetDimensions, OrtStatus*, (OrtTensorTypeAndShapeInfo * info, const int64_t* dims, size_t n)) \
  X(60, GetTensorElementType, OrtStatus*, (const OrtTensorTypeAndShapeInfo* info, int* out))          \
  X(61, GetDimensionsCount, OrtStatus*, (const OrtTensorTypeAndShapeInfo* info, size_t* out))         \
  X(62, GetDimensions, OrtStatus*, (const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t n))  \
  X(63, GetSymbolicDimensions, OrtStatus*,                                                            \
    (const OrtTensorTypeAndShapeInfo* info, const char** dim_params, size_t n))                       \
  X(65, GetTensorTypeAndShape, OrtStatus*, (const OrtValue* value, OrtTensorTypeAndShapeInfo** out))  \
  X(86, KernelInfoGetAttribute_int64, OrtStatus*, (const OrtKernelInfo* info, const char* name, int64_t* out)) \
  X(88, KernelContext_GetInputCount, OrtStatus*, (const OrtKernelContext* ctx, size_t* out))          \
  X(90, KernelContext_GetInput, OrtStatus*, (const OrtKernelContext* ctx, size_t i, const OrtValue** out)) \
  X(91, KernelContext_GetOutput, OrtStatus*,                                                          \
    (OrtKernelContext * ctx, size_t i, const int64_t* dims, size_t n, OrtValue** out))                \
  X(93, ReleaseStatus, void, (OrtStatus * status))                                                    \
  X(99, ReleaseTensorTypeAndShapeInfo, void, (OrtTensorTypeAndShapeInfo * info))                     \
  X(162, KernelInfoGetAttributeArray_float, OrtStatus*,                                               \
    (const OrtKernelInfo* info, const char* name, float* out, size_t* size))                          \
  X(163, KernelInfoGetAttributeArray_int64, OrtStatus*,                                               \
    (const OrtKernelInfo* info, const char* name, int64_t* out, size_t* size))                        \
  X(249, KernelInfoGetConstantInput_tensor, OrtStatus*,                                               \
    (const OrtKernelInfo* info, size_t i, int* is_constant, const OrtValue** out))                    \
  X(267, ShapeInferContext_GetInputCount, OrtStatus*, (const OrtShapeInferContext* ctx, size_t* out)) \
  X(268, ShapeInferContext_GetInputTypeShape, OrtStatus*,                                             \
    (const OrtShapeInferContext* ctx, size_t i, OrtTensorTypeAndShapeInfo** out))                     \
  X(269, ShapeInferContext_GetAttribute, OrtStatus*,                                                 \
    (const OrtShapeInferContext* ctx, const char* name, const OrtOpAttr** out))                       \
  X(270, ShapeInferContext_SetOutputTypeShape, OrtStatus*,                                            \
    (const OrtShapeInferContext* ctx, size_t i, const OrtTensorTypeAndShapeInfo* info))               \
  X(271, SetSymbolicDimensions, OrtStatus*, (OrtTensorTypeAndShapeInfo * info, const char** dim_params, size_t n)) \
  X(272, ReadOpAttr, OrtStatus*, (const OrtOpAttr* attr, int type, void* data, size_t len, size_t* out)) \
  X(274, KernelContext_ParallelFor, OrtStatus*,                                                       \
    (const OrtKernelContext* ctx, void (*fn)(void* user, size_t i), size_t total, size_t num_batch, void* user))

// Typed view of the slots: Api::load(api) copies the pointers out of the table.
struct Api {
#define BFC_ORT_MEMBER(slot, name, ret, args) ret(*name) args = nullptr;
  BFC_ORT_SLOTS(BFC_ORT_MEMBER)
#undef BFC_ORT_MEMBER
  static Api load(const OrtApi* api) {
    Api a;
    void* const* table = reinterpret_cast<void* const*>(api);
#define BFC_ORT_LOAD(slot, name, ret, args) a.name = reinterpret_cast<ret(*) args>(table[slot]);
    BFC_ORT_SLOTS(BFC_ORT_LOAD)
#undef BFC_ORT_LOAD
    return a;
  }
};

#ifdef BFC_ORT_INCLUDE_DIR_SET
}  // namespace ort
}  // namespace bfc
#include <onnxruntime_c_api.h>
namespace bfc {
namespace ort {
#define BFC_ORT_CHECK(slot, name, ret, args) \
  static_assert(offsetof(::OrtApi, name) / sizeof(void*) == slot, "ORT slot mismatch: " #name);
BFC_ORT_SLOTS(BFC_ORT_CHECK)
#undef BFC_ORT_CHECK
#endif

// OrtApiBase: two function pointers.
struct ApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// OrtCustomOp, x86-64 layout: uint32_t version at offset 0, then 25 function pointers
// from offset 8 (sizeof 208).  Field order is the ABI; do not reorder.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const CustomOp* op);
  const char* (*GetExecutionProviderType)(const CustomOp* op);
  int (*GetInputType)(const CustomOp* op, size_t i);
  size_t (*GetInputTypeCount)(const CustomOp* op);
  int (*GetOutputType)(const CustomOp* op, size_t i);
  size_t (*GetOutputTypeCount)(const CustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* ctx);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const CustomOp* op, size_t i);
  int (*GetOutputCharacteristic)(const CustomOp* op, size_t i);
  int (*GetInputMemoryType)(const CustomOp* op, size_t i);
  int (*GetVariadicInputMinArity)(const CustomOp* op);
  int (*GetVariadicInputHomogeneity)(const CustomOp* op);
  int (*GetVariadicOutputMinArity)(const CustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const CustomOp* op);
  OrtStatus* (*CreateKernelV2)(const CustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* ctx);
  OrtStatus* (*InferOutputShapeFn)(const CustomOp* op, OrtShapeInferContext* ctx);
  int (*GetStartVersion)(const CustomOp* op);
  int (*GetEndVersion)(const CustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};
static_assert(sizeof(void*) != 8 || sizeof(CustomOp) == 208, "OrtCustomOp layout");

}  // namespace ort
}  // namespace bfc
