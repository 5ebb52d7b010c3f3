// Shared adapter code of the ai.bfc ops (op_common.h) and the library's entry points:
// RegisterCustomOps (the one domain object with every op) and BfcKsIsa.
#include "op_common.h"

#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(_WIN32)
#define BFC_EXPORT __declspec(dllexport)
#else
#define BFC_EXPORT __attribute__((visibility("default")))
#endif

namespace bfc {
namespace ort {

const char* const kDomain = "ai.bfc";
const OrtApi* g_api = nullptr;

namespace {
std::atomic<uint64_t> g_unknown_dims{0};

std::string not_int_list(const char* op, const char* name, size_t floats) {
  return std::string(op) + ": attribute '" + name + "' must be an int64 list, got " + std::to_string(floats) +
         " floats";
}
}  // namespace

OrtStatus* error(const Api& api, const std::string& msg, int code) { return api.CreateStatus(code, msg.c_str()); }

std::string consume(const Api& api, OrtStatus* st) {
  std::string m = api.GetErrorMessage(st) ? api.GetErrorMessage(st) : "";
  api.ReleaseStatus(st);
  return m;
}

bool absent_attr(const std::string& m) {
  return m.find("No attribute") != std::string::npos || m.find("not found") != std::string::npos ||
         m.find("does not exist") != std::string::npos;
}

std::string describe(const Api& api, const OrtTensorTypeAndShapeInfo* info, ks::TensorDesc* t,
                     std::vector<std::string>* sym) {
  size_t n = 0;
  if (OrtStatus* st = api.GetTensorElementType(info, &t->dtype)) return consume(api, st);
  if (OrtStatus* st = api.GetDimensionsCount(info, &n)) return consume(api, st);
  t->dims.assign(n, 0);
  if (n > 0)
    if (OrtStatus* st = api.GetDimensions(info, t->dims.data(), n)) return consume(api, st);
  if (sym != nullptr) {
    std::vector<const char*> names(n, nullptr);
    if (n > 0)
      if (OrtStatus* st = api.GetSymbolicDimensions(info, names.data(), n)) return consume(api, st);
    sym->assign(n, "");
    for (size_t i = 0; i < n; ++i)
      if (names[i] != nullptr) (*sym)[i] = names[i];
  }
  t->present = t->rank_known = true;
  return "";
}

std::string describe_value(const Api& api, const OrtValue* v, ks::TensorDesc* t) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api.GetTensorTypeAndShape(v, &info)) return consume(api, st);
  std::string err = describe(api, info, t);
  api.ReleaseTensorTypeAndShapeInfo(info);
  void* data = nullptr;
  if (err.empty())
    if (OrtStatus* st = api.GetTensorMutableData(const_cast<OrtValue*>(v), &data)) err = consume(api, st);
  t->data = data;
  return err;
}

std::string kernel_int_list(const Api& api, const OrtKernelInfo* info, const char* op, const char* name,
                            std::vector<int64_t>* out, bool* present) {
  size_t size = 0;
  *present = false;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    const std::string m = consume(api, st);
    if (m.find("No attribute") != std::string::npos || m.find("not found") != std::string::npos) return "";
    return std::string(op) + ": attribute '" + name + "' must be an int64 list: " + m;
  }
  if (size == 0) {  // onnxruntime reports a float list as an empty int list
    size_t fsize = 0;
    if (OrtStatus* st = api.KernelInfoGetAttributeArray_float(info, name, nullptr, &fsize)) consume(api, st);
    else if (fsize > 0) return not_int_list(op, name, fsize);
  }
  out->assign(size, 0);
  if (size > 0)
    if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, out->data(), &size))
      return std::string(op) + ": cannot read attribute '" + name + "': " + consume(api, st);
  out->resize(size);
  *present = true;
  return "";
}

std::string infer_int_list(const Api& api, const OrtShapeInferContext* ctx, const char* op, const char* name,
                           std::vector<int64_t>* out, bool* present) {
  *present = false;
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    consume(api, st);  // "Attribute does not exist."
    return "";
  }
  out->assign(1, 0);
  size_t bytes = 0;
  if (OrtStatus* st = api.ReadOpAttr(attr, kOpAttrInts, out->data(), sizeof(int64_t), &bytes)) {
    const std::string m = consume(api, st);
    if (bytes <= sizeof(int64_t)) return std::string(op) + ": attribute '" + name + "' must be an int64 list: " + m;
    out->assign(bytes / sizeof(int64_t), 0);
    if (OrtStatus* st2 = api.ReadOpAttr(attr, kOpAttrInts, out->data(), bytes, &bytes))
      return std::string(op) + ": cannot read attribute '" + name + "': " + consume(api, st2);
  }
  out->resize(bytes / sizeof(int64_t));
  if (out->empty()) {  // a float list reads as an empty int list
    float f = 0.f;
    size_t fbytes = 0;
    OrtStatus* st = api.ReadOpAttr(attr, kOpAttrFloats, &f, sizeof(float), &fbytes);
    if (st) consume(api, st);
    if (fbytes > 0) return not_int_list(op, name, fbytes / sizeof(float));
  }
  *present = true;
  return "";
}

std::string kernel_int(const Api& api, const OrtKernelInfo* info, const char* op, const char* name, int64_t* out,
                       bool* present) {
  *present = false;
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, out)) {
    const std::string m = consume(api, st);
    return absent_attr(m) ? "" : std::string(op) + ": attribute '" + name + "' must be an int64: " + m;
  }
  *present = true;
  return "";
}

std::string infer_int(const Api& api, const OrtShapeInferContext* ctx, const char* op, const char* name,
                      int64_t* out, bool* present) {
  *present = false;
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    consume(api, st);
    return "";
  }
  size_t bytes = 0;
  if (OrtStatus* st = api.ReadOpAttr(attr, kOpAttrInt, out, sizeof(int64_t), &bytes))
    return std::string(op) + ": attribute '" + name + "' must be an int64: " + consume(api, st);
  *present = true;
  return "";
}

std::string constant_input(const Api& api, const OrtKernelInfo* info, const char* op, size_t i, ks::TensorDesc* t) {
  int is_const = 0;
  const OrtValue* v = nullptr;
  if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, i, &is_const, &v)) consume(api, st);
  t->present = true;
  if (!is_const || v == nullptr) return "";
  std::string e = describe_value(api, v, t);
  return e.empty() ? e : std::string(op) + ": input " + std::to_string(i) + ": " + e;
}

std::string infer_input(const Api& api, OrtShapeInferContext* ctx, size_t i, bool optional, ks::TensorDesc* t,
                        std::vector<std::string>* sym) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, i, &info)) return consume(api, st);
  std::string e = describe(api, info, t, sym);
  t->rank_known = !t->dims.empty();
  if (optional) t->present = t->dtype != ks::kTypeUnknown;  // an absent optional input has no type
  return e;
}

bool ort_parallel_for(void* c, void (*fn)(void*, size_t), size_t n, void* user) {
  PforCtx* p = static_cast<PforCtx*>(c);
  OrtStatus* st = p->api->KernelContext_ParallelFor(p->ctx, fn, n, 0, user);
  if (st == nullptr) return true;
  p->api->ReleaseStatus(st);
  return false;
}

OrtStatus* set_output(const Api& api, OrtShapeInferContext* ctx, size_t index, int dtype,
                      const std::vector<int64_t>& xd, const std::vector<std::string>& xsym, int64_t last) {
  std::vector<int64_t> yd = xd;
  std::vector<std::string> ysym = xsym;
  ysym.resize(yd.size());
  for (size_t i = 0; i + 1 < yd.size(); ++i)
    if (yd[i] < 0 && ysym[i].empty()) ysym[i] = "bfc_unk_" + std::to_string(++g_unknown_dims);
  if (last < 0) {
    yd.pop_back();
    ysym.pop_back();
  } else {
    yd.back() = last;
    ysym.back().clear();
  }
  std::vector<const char*> names;
  for (const std::string& s : ysym) names.push_back(s.c_str());
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&out)) return st;
  OrtStatus* st = api.SetTensorElementType(out, dtype);
  if (!st) st = api.SetDimensions(out, yd.data(), yd.size());
  if (!st) st = api.SetSymbolicDimensions(out, names.data(), names.size());
  if (!st) st = api.ShapeInferContext_SetOutputTypeShape(ctx, index, out);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return st;
}

namespace {
const char* get_ep(const CustomOp*) { return "CPUExecutionProvider"; }
int input_type(const CustomOp*, size_t i) { return i < 2 ? ks::kTypeFloat : ks::kTypeUnknown; }
size_t input_count(const CustomOp*) { return 3; }
int output_type(const CustomOp*, size_t) { return ks::kTypeFloat; }
size_t output_count(const CustomOp*) { return 1; }
int input_char(const CustomOp*, size_t i) { return i == 0 ? kRequired : i == 1 ? kOptional : kVariadic; }
int output_char(const CustomOp*, size_t) { return kRequired; }
int input_mem(const CustomOp*, size_t) { return 0; }
int var_in_min(const CustomOp*) { return 2; }
int var_in_homog(const CustomOp*) { return 0; }
int var_out_min(const CustomOp*) { return 1; }
int var_out_homog(const CustomOp*) { return 1; }
int start_version(const CustomOp*) { return 1; }
int end_version(const CustomOp*) { return 1; }
}  // namespace

CustomOp base_op() {
  CustomOp op;
  std::memset(&op, 0, sizeof(op));
  // version 17: ORT calls the V2 callbacks (they return statuses) and InferOutputShapeFn;
  // the legacy CreateKernel / KernelCompute stay NULL (never called when the V2 ones exist).
  // GetMayInplace / GetAliasMap stay NULL: ORT reads them only for version >= 18.
  op.version = 17;
  op.GetExecutionProviderType = get_ep;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.GetInputCharacteristic = input_char;
  op.GetOutputCharacteristic = output_char;
  op.GetInputMemoryType = input_mem;
  op.GetVariadicInputMinArity = var_in_min;
  op.GetVariadicInputHomogeneity = var_in_homog;
  op.GetVariadicOutputMinArity = var_out_min;
  op.GetVariadicOutputHomogeneity = var_out_homog;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

}  // namespace ort
}  // namespace bfc

extern "C" BFC_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const void* api_base) {
  using namespace bfc::ort;
  const ApiBase* base = static_cast<const ApiBase*>(api_base);
  if (base == nullptr || base->GetApi == nullptr) return nullptr;  // cannot even report
  const OrtApi* ort_api = base->GetApi(kApiVersion);
  if (ort_api == nullptr) {
    const OrtApi* v1 = base->GetApi(1);
    if (v1 == nullptr) return nullptr;
    std::string msg = std::string("bfc custom ops need onnxruntime >= 1.17 (C API version 17); this runtime is ") +
                      (base->GetVersionString ? base->GetVersionString() : "older");
    return Api::load(v1).CreateStatus(kFail, msg.c_str());
  }
  g_api = ort_api;
  const Api api = Api::load(ort_api);
  // One domain object for the process: ORT keeps a pointer to it in every session.
  static std::mutex mu;
  static OrtCustomOpDomain* domain = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (domain == nullptr) {
    if (OrtStatus* st = api.CreateCustomOpDomain(kDomain, &domain)) return st;
    for (const CustomOp* o : {ks_matmul_op(), lowbit_matmul_op(), rotate_quantize_op()})
      if (OrtStatus* st = api.CustomOpDomain_Add(domain, o)) {
        domain = nullptr;  // leaked on this error path only; registration failed anyway
        return st;
      }
  }
  return api.AddCustomOpDomain(options, domain);
}

// The kernel ISA a KSMatMul node created now would run: BFC_KS_ISA (auto / portable / avx2 /
// avx512) resolved against this build and CPU; "" with an invalid or unsupported request.
// For reports and tests (ctypes), not used by onnxruntime.
extern "C" BFC_EXPORT const char* BfcKsIsa(void) {
  std::string err;
  const int isa = bfc::ks::resolve_isa(std::getenv("BFC_KS_ISA"), &err);
  return isa < 0 ? "" : bfc::ks::isa_name(isa);
}
