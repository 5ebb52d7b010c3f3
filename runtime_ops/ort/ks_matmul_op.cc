// ONNX Runtime adapter for ai.bfc::KSMatMul (opset 1).  Thin: it describes what ORT knows
// about the node as a ks::NodeDesc (attributes, input types and shapes, constant data),
// lets kernels/ validate it (ks::validate_node, ks::build_plan, ks::validate_run), calls
// the kernel and returns every message as an OrtStatus.  Nothing throws across the C
// boundary and nothing aborts: shape inference, kernel creation and compute all validate.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "../kernels/ks_chain.h"
#include "../kernels/lowbit.h"
#include "ort_abi.h"

#if defined(_WIN32)
#define BFC_EXPORT __declspec(dllexport)
#else
#define BFC_EXPORT __attribute__((visibility("default")))
#endif

namespace bfc {
namespace ort {
namespace {

const char* const kDomain = "ai.bfc";
const char* const kOpName = "KSMatMul";

struct Kernel {
  Api api;
  ks::Plan plan;
  ks::ChainDims dims;
};

OrtStatus* error(const Api& api, const std::string& msg, int code = kInvalidArgument) {
  return api.CreateStatus(code, msg.c_str());
}

// Takes ownership of an ORT status: returns its message and releases it.
std::string consume(const Api& api, OrtStatus* st) {
  std::string m = api.GetErrorMessage(st) ? api.GetErrorMessage(st) : "";
  api.ReleaseStatus(st);
  return m;
}

// Element type and dims of a type/shape info; symbolic names too when sym != null.
std::string describe(const Api& api, const OrtTensorTypeAndShapeInfo* info, ks::TensorDesc* t,
                     std::vector<std::string>* sym = nullptr) {
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

// Type, shape and data of a tensor value.
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

std::string not_int_list(const char* name, size_t floats) {
  return std::string("KSMatMul: attribute '") + name + "' must be an int64 list, got " + std::to_string(floats) +
         " floats";
}

// Reads an int64 list attribute at kernel creation; *present = false when it is absent.
std::string kernel_int_list(const Api& api, const OrtKernelInfo* info, const char* name, std::vector<int64_t>* out,
                            bool* present) {
  size_t size = 0;
  *present = false;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    const std::string m = consume(api, st);
    if (m.find("No attribute") != std::string::npos || m.find("not found") != std::string::npos) return "";
    return std::string("KSMatMul: attribute '") + name + "' must be an int64 list: " + m;
  }
  if (size == 0) {  // onnxruntime reports a float list as an empty int list
    size_t fsize = 0;
    if (OrtStatus* st = api.KernelInfoGetAttributeArray_float(info, name, nullptr, &fsize)) consume(api, st);
    else if (fsize > 0) return not_int_list(name, fsize);
  }
  out->assign(size, 0);
  if (size > 0)
    if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, out->data(), &size))
      return std::string("KSMatMul: cannot read attribute '") + name + "': " + consume(api, st);
  out->resize(size);
  *present = true;
  return "";
}

// Same, in shape inference (ReadOpAttr reports the byte size it needs).
std::string infer_int_list(const Api& api, const OrtShapeInferContext* ctx, const char* name,
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
    if (bytes <= sizeof(int64_t)) return std::string("KSMatMul: attribute '") + name + "' must be an int64 list: " + m;
    out->assign(bytes / sizeof(int64_t), 0);
    if (OrtStatus* st2 = api.ReadOpAttr(attr, kOpAttrInts, out->data(), bytes, &bytes))
      return std::string("KSMatMul: cannot read attribute '") + name + "': " + consume(api, st2);
  }
  out->resize(bytes / sizeof(int64_t));
  if (out->empty()) {  // a float list reads as an empty int list
    float f = 0.f;
    size_t fbytes = 0;
    OrtStatus* st = api.ReadOpAttr(attr, kOpAttrFloats, &f, sizeof(float), &fbytes);
    if (st) consume(api, st);
    if (fbytes > 0) return not_int_list(name, fbytes / sizeof(float));
  }
  *present = true;
  return "";
}

// ---- kernel creation: attributes and constant inputs -> NodeDesc -> build_plan ---------
// A constant input's descriptor; a missing or computed input stays present without data.
std::string constant_input(const Api& api, const OrtKernelInfo* info, size_t i, ks::TensorDesc* t) {
  int is_const = 0;
  const OrtValue* v = nullptr;
  if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, i, &is_const, &v)) consume(api, st);
  t->present = true;
  if (!is_const || v == nullptr) return "";
  std::string e = describe_value(api, v, t);
  return e.empty() ? e : "KSMatMul: input " + std::to_string(i) + ": " + e;
}

OrtStatus* create_kernel(const CustomOp*, const OrtApi* ort_api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  const Api api = Api::load(ort_api);
  try {
    ks::NodeDesc n;
    bool unused = false;
    std::string e = kernel_int_list(api, info, "patterns", &n.patterns, &n.has_patterns);
    if (e.empty()) e = kernel_int_list(api, info, "in_perm", &n.in_perm, &unused);
    if (e.empty()) e = kernel_int_list(api, info, "out_perm", &n.out_perm, &unused);
    // factor inputs 2 .. 2L+1, plus input 2L+2 when it is a constant (too many inputs);
    // a non-constant bias is checked at run time
    const size_t L = n.patterns.size() / 4;
    n.factors.resize(2 * L + 1);
    for (size_t i = 0; e.empty() && i < n.factors.size(); ++i) e = constant_input(api, info, 2 + i, &n.factors[i]);
    if (e.empty() && n.factors.back().data == nullptr) n.factors.pop_back();
    if (e.empty()) e = constant_input(api, info, 1, &n.bias);
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
struct PforCtx {
  const Api* api;
  const OrtKernelContext* ctx;
};

bool ort_parallel_for(void* c, void (*fn)(void*, size_t), size_t n, void* user) {
  PforCtx* p = static_cast<PforCtx*>(c);
  OrtStatus* st = p->api->KernelContext_ParallelFor(p->ctx, fn, n, 0, user);
  if (st == nullptr) return true;
  p->api->ReleaseStatus(st);
  return false;
}

// What both ops do per run: read X (and the optional bias), validate them with ``validate``,
// allocate Y = X's shape with the last dim N, and run ``run`` over the rows; every failure is an
// ORT error status naming ``op``.
template <class Validate, class Run>
OrtStatus* compute_rows(const Api& api, OrtKernelContext* ctx, const std::string& op, int64_t N,
                        Validate validate, Run run) {
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
    e = run(static_cast<const float*>(x.data), static_cast<const float*>(bias.data), static_cast<float*>(y), rows,
            &pctx);
    return e.empty() ? nullptr : error(api, e, kFail);
  } catch (const std::bad_alloc&) {
    return error(api, op + ": out of memory", kFail);
  } catch (...) {
    return error(api, op + ": compute failed", kFail);
  }
}

OrtStatus* compute(void* kp, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kp);
  if (k == nullptr) return nullptr;  // unreachable: CreateKernelV2 failed and ORT stopped
  return compute_rows(
      k->api, ctx, "KSMatMul", k->dims.N,
      [k](size_t nin, const ks::TensorDesc& x, const ks::TensorDesc& b, int64_t* rows) {
        return ks::validate_run(k->dims, nin, x, b, rows);
      },
      [k](const float* x, const float* b, float* y, int64_t rows, PforCtx* p) {
        return ks::run_chain(k->plan, x, b, y, rows, ort_parallel_for, p);
      });
}

// ---- shape inference ------------------------------------------------------------------
const OrtApi* g_api = nullptr;  // set once in RegisterCustomOps
std::atomic<uint64_t> g_unknown_dims{0};

// Y = X.shape[:-1] + (N,) as output 0 (see infer_shape for the naming of unknown dims).
OrtStatus* set_output(const Api& api, OrtShapeInferContext* ctx, const std::vector<int64_t>& xd,
                      const std::vector<std::string>& xsym, int64_t N) {
  std::vector<int64_t> yd = xd;
  std::vector<std::string> ysym = xsym;
  ysym.resize(yd.size());
  for (size_t i = 0; i + 1 < yd.size(); ++i)
    if (yd[i] < 0 && ysym[i].empty()) ysym[i] = "bfc_unk_" + std::to_string(++g_unknown_dims);
  yd.back() = N;
  ysym.back().clear();
  std::vector<const char*> names;
  for (const std::string& s : ysym) names.push_back(s.c_str());
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&out)) return st;
  OrtStatus* st = api.SetTensorElementType(out, ks::kTypeFloat);
  if (!st) st = api.SetDimensions(out, yd.data(), yd.size());
  if (!st) st = api.SetSymbolicDimensions(out, names.data(), names.size());
  if (!st) st = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return st;
}

// Y = X.shape[:-1] + (N,).  A leading dim of X is copied as its value or its symbolic name.
// An unknown, unnamed dim gets a fresh name: onnxruntime turns a dim without a name into
// dim_value = the integer given (-1 would be a concrete, negative size to every following
// op's shape inference: ONNX Slice then calls std::clamp(x, 0, -2) and aborts the process).
// Rank 0 means "unknown rank" here (a scalar X is rejected at run time): Y stays unknown.
// An invalid node leaves Y unknown and returns the message; onnxruntime <= 1.32 ignores
// that status (kernel creation reports the same validation error).
OrtStatus* infer_shape(const CustomOp*, OrtShapeInferContext* ctx) {
  if (g_api == nullptr) return nullptr;
  const Api api = Api::load(g_api);
  try {
    ks::NodeDesc n;
    bool unused = false;
    std::string e = infer_int_list(api, ctx, "patterns", &n.patterns, &n.has_patterns);
    if (e.empty()) e = infer_int_list(api, ctx, "in_perm", &n.in_perm, &unused);
    if (e.empty()) e = infer_int_list(api, ctx, "out_perm", &n.out_perm, &unused);
    size_t nin = 0;
    if (OrtStatus* st = api.ShapeInferContext_GetInputCount(ctx, &nin)) return st;
    std::vector<std::string> xsym;
    n.factors.resize(nin > 2 ? nin - 2 : 0);
    for (size_t i = 0; i < nin && e.empty(); ++i) {
      OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
      if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, i, &info)) return st;
      ks::TensorDesc& t = i == 0 ? n.x : i == 1 ? n.bias : n.factors[i - 2];
      e = describe(api, info, &t, i == 0 ? &xsym : nullptr);
      t.rank_known = !t.dims.empty();
      if (i == 1) t.present = t.dtype != ks::kTypeUnknown;  // an absent optional input has no type
    }
    ks::ChainDims dims;
    if (e.empty()) e = ks::validate_node(n, false, &dims);
    if (!e.empty()) return error(api, e);
    if (!n.x.rank_known) return nullptr;
    return set_output(api, ctx, n.x.dims, xsym, dims.N);
  } catch (...) {
    return error(api, "KSMatMul: shape inference failed (out of memory?)", kFail);
  }
}


// ---- ai.bfc::LowBitMatMul (kernels/lowbit.h; spec in bfc/ops.py) -----------------------
const char* const kLowBitName = "LowBitMatMul";

struct LowBitKernel {
  Api api;
  lowbit::Plan plan;
};

bool absent_attr(const std::string& m) {
  return m.find("No attribute") != std::string::npos || m.find("not found") != std::string::npos ||
         m.find("does not exist") != std::string::npos;
}

std::string kernel_int(const Api& api, const OrtKernelInfo* info, const char* name, int64_t* out, bool* present) {
  *present = false;
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, out)) {
    const std::string m = consume(api, st);
    return absent_attr(m) ? "" : std::string("LowBitMatMul: attribute '") + name + "' must be an int64: " + m;
  }
  *present = true;
  return "";
}

std::string infer_int(const Api& api, const OrtShapeInferContext* ctx, const char* name, int64_t* out,
                      bool* present) {
  *present = false;
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    consume(api, st);
    return "";
  }
  size_t bytes = 0;
  if (OrtStatus* st = api.ReadOpAttr(attr, kOpAttrInt, out, sizeof(int64_t), &bytes))
    return std::string("LowBitMatMul: attribute '") + name + "' must be an int64: " + consume(api, st);
  *present = true;
  return "";
}

template <class IntFn, class ListFn>
std::string lowbit_attrs(lowbit::Desc* d, IntFn&& get_int, ListFn&& get_list) {
  std::string e = get_int("K", &d->K, &d->has_k);
  if (e.empty()) e = get_int("N", &d->N, &d->has_n);
  if (e.empty()) e = get_int("bits", &d->bits, &d->has_bits);
  if (e.empty()) e = get_int("group_size", &d->group, &d->has_group);
  if (e.empty()) e = get_list("rot_patterns", &d->rot_patterns, &d->has_rot);
  if (e.empty()) e = get_int("rot_angles", &d->rot_angles, &d->has_angles);
  if (e.empty() && d->has_rot && d->rot_patterns.size() % 4 != 0)
    e = "LowBitMatMul: attribute 'rot_patterns' must hold 4 integers (a, b, c, d) per rotation factor, got " +
        std::to_string(d->rot_patterns.size());
  return e;
}

OrtStatus* lowbit_create(const CustomOp*, const OrtApi* ort_api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  const Api api = Api::load(ort_api);
  try {
    lowbit::Desc d;
    std::string e = lowbit_attrs(
        &d, [&](const char* n, int64_t* v, bool* p) { return kernel_int(api, info, n, v, p); },
        [&](const char* n, std::vector<int64_t>* v, bool* p) { return kernel_int_list(api, info, n, v, p); });
    size_t nrot = 2 * (d.rot_patterns.size() / 4);
    if (d.rot_angles == 1) {  // block + one angle tensor per butterfly stage (K = m 2^k)
      nrot = 1;
      for (int64_t K = d.K; K > 0 && K % 2 == 0; K /= 2) ++nrot;
    }
    if (e.empty()) e = constant_input(api, info, 2, &d.codes);
    if (e.empty()) e = constant_input(api, info, 3, &d.scales);
    d.rot.resize(nrot);
    for (size_t i = 0; e.empty() && i < nrot; ++i) e = constant_input(api, info, 4 + i, &d.rot[i]);
    if (e.empty()) e = constant_input(api, info, 1, &d.bias);
    if (d.bias.data == nullptr) d.bias = ks::TensorDesc();
    std::unique_ptr<LowBitKernel> k(new LowBitKernel());
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

OrtStatus* lowbit_compute(void* kp, OrtKernelContext* ctx) {
  LowBitKernel* k = static_cast<LowBitKernel*>(kp);
  if (k == nullptr) return nullptr;
  return compute_rows(
      k->api, ctx, "LowBitMatMul", k->plan.N,
      [k](size_t nin, const ks::TensorDesc& x, const ks::TensorDesc& b, int64_t* rows) {
        return lowbit::validate_run(k->plan, nin, x, b, rows);
      },
      [k](const float* x, const float* b, float* y, int64_t rows, PforCtx* p) {
        return lowbit::run(k->plan, x, b, y, rows, ort_parallel_for, p);
      });
}

OrtStatus* lowbit_infer(const CustomOp*, OrtShapeInferContext* ctx) {
  if (g_api == nullptr) return nullptr;
  const Api api = Api::load(g_api);
  try {
    lowbit::Desc d;
    std::string e = lowbit_attrs(
        &d, [&](const char* n, int64_t* v, bool* p) { return infer_int(api, ctx, n, v, p); },
        [&](const char* n, std::vector<int64_t>* v, bool* p) { return infer_int_list(api, ctx, n, v, p); });
    size_t nin = 0;
    if (OrtStatus* st = api.ShapeInferContext_GetInputCount(ctx, &nin)) return st;
    std::vector<std::string> xsym;
    d.rot.resize(nin > 4 ? nin - 4 : 0);
    for (size_t i = 0; i < nin && e.empty(); ++i) {
      OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
      if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, i, &info)) return st;
      ks::TensorDesc& t = i == 0 ? d.x : i == 1 ? d.bias : i == 2 ? d.codes : i == 3 ? d.scales : d.rot[i - 4];
      e = describe(api, info, &t, i == 0 ? &xsym : nullptr);
      t.rank_known = !t.dims.empty();
      if (i == 1) t.present = t.dtype != ks::kTypeUnknown;
    }
    if (e.empty() && nin < 4) e = "LowBitMatMul: the node needs X, bias, codes and scales (4 inputs at least)";
    if (e.empty()) e = lowbit::validate(d, false);
    if (!e.empty()) return error(api, e);
    if (!d.x.rank_known) return nullptr;
    return set_output(api, ctx, d.x.dims, xsym, d.N);
  } catch (...) {
    return error(api, "LowBitMatMul: shape inference failed (out of memory?)", kFail);
  }
}

void lowbit_destroy(void* k) { delete static_cast<LowBitKernel*>(k); }
const char* lowbit_get_name(const CustomOp*) { return kLowBitName; }

// ---- OrtCustomOp callbacks ------------------------------------------------------------
void destroy(void* k) { delete static_cast<Kernel*>(k); }
const char* get_name(const CustomOp*) { return kOpName; }
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

CustomOp make_op() {
  CustomOp op;
  std::memset(&op, 0, sizeof(op));
  // version 17: ORT calls the V2 callbacks (they return statuses) and InferOutputShapeFn;
  // the legacy CreateKernel / KernelCompute stay NULL (never called when the V2 ones exist).
  // GetMayInplace / GetAliasMap stay NULL: ORT reads them only for version >= 18.
  op.version = 17;
  op.GetName = get_name;
  op.GetExecutionProviderType = get_ep;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = input_char;
  op.GetOutputCharacteristic = output_char;
  op.GetInputMemoryType = input_mem;
  op.GetVariadicInputMinArity = var_in_min;
  op.GetVariadicInputHomogeneity = var_in_homog;
  op.GetVariadicOutputMinArity = var_out_min;
  op.GetVariadicOutputHomogeneity = var_out_homog;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = infer_shape;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

CustomOp g_op = make_op();

// LowBitMatMul: X, bias (optional), then variadic codes, scales, rotation values_l, scale_l
CustomOp make_lowbit_op() {
  CustomOp op = make_op();
  op.GetName = lowbit_get_name;
  op.KernelDestroy = lowbit_destroy;
  op.CreateKernelV2 = lowbit_create;
  op.KernelComputeV2 = lowbit_compute;
  op.InferOutputShapeFn = lowbit_infer;
  return op;
}

CustomOp g_lowbit_op = make_lowbit_op();

}  // namespace
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
    for (const CustomOp* o : {&g_op, &g_lowbit_op})
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
