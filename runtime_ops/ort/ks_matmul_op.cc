// ONNX Runtime adapter for ai.bfc::KSMatMul (opset 1): validates the node, reads the
// constant factor initializers once at kernel creation, prepacks them (kernels/), and
// runs batch tiles on ORT's intra-op pool.  Every failure is returned as an ORT status
// naming the op, the input and the shapes; nothing throws across the C boundary.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "../kernels/ks_chain.h"
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

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

// Type and shape of a tensor value; returns "" or an error message.
std::string type_shape(const Api& api, const OrtValue* v, int* type, std::vector<int64_t>* dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api.GetTensorTypeAndShape(v, &info)) return consume(api, st);
  std::string err;
  size_t n = 0;
  if (OrtStatus* st = api.GetTensorElementType(info, type)) err = consume(api, st);
  else if (OrtStatus* st2 = api.GetDimensionsCount(info, &n)) err = consume(api, st2);
  else {
    dims->assign(n, 0);
    if (OrtStatus* st3 = api.GetDimensions(info, dims->data(), n)) err = consume(api, st3);
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  return err;
}

// Reads an int64 list attribute.  present=false when the attribute is absent.
std::string int_list(const Api& api, const OrtKernelInfo* info, const char* name, std::vector<int64_t>* out,
                     bool* present) {
  size_t size = 0;
  *present = false;
  if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    const std::string m = consume(api, st);
    if (m.find("No attribute") != std::string::npos || m.find("not found") != std::string::npos) return "";  // absent
    return std::string("KSMatMul: attribute '") + name + "' must be an int64 list: " + m;
  }
  if (size == 0) {
    // onnxruntime reports a float list as an empty int list: reject it explicitly
    size_t fsize = 0;
    OrtStatus* st = api.KernelInfoGetAttributeArray_float(info, name, nullptr, &fsize);
    if (st) consume(api, st);
    else if (fsize > 0)
      return std::string("KSMatMul: attribute '") + name + "' must be an int64 list, got " + std::to_string(fsize) +
             " floats";
  }
  out->assign(size, 0);
  if (size > 0) {
    if (OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, out->data(), &size)) {
      return std::string("KSMatMul: cannot read attribute '") + name + "': " + consume(api, st);
    }
    out->resize(size);
  }
  *present = true;
  return "";
}

OrtStatus* create_kernel(const CustomOp*, const OrtApi* ort_api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  Api api = Api::load(ort_api);
  try {
    std::vector<int64_t> patterns, in_perm, out_perm;
    bool present = false;
    std::string e = int_list(api, info, "patterns", &patterns, &present);
    if (!e.empty()) return error(api, e);
    if (!present)
      return error(api, "KSMatMul: attribute 'patterns' (int64 list, (a, b, c, d) per factor) is required");
    if ((e = int_list(api, info, "in_perm", &in_perm, &present)) != "") return error(api, e);
    if ((e = int_list(api, info, "out_perm", &out_perm, &present)) != "") return error(api, e);
    if (patterns.empty() || patterns.size() % 4 != 0) {
      return error(api, "KSMatMul: attribute 'patterns' must hold 4 positive integers (a, b, c, d) per factor, got " +
                            std::to_string(patterns.size()) + " values");
    }
    const size_t L = patterns.size() / 4;
    std::vector<ks::FactorInput> inputs(L);
    for (size_t l = 0; l < L; ++l) {
      ks::FactorInput& fi = inputs[l];
      fi.a = patterns[4 * l], fi.b = patterns[4 * l + 1], fi.c = patterns[4 * l + 2], fi.d = patterns[4 * l + 3];
      for (int part = 0; part < 2; ++part) {
        const size_t idx = 2 + 2 * l + size_t(part);
        const std::string nm = std::string(part ? "scale_" : "values_") + std::to_string(l) + " (input " +
                               std::to_string(idx) + ")";
        int is_const = 0;
        const OrtValue* v = nullptr;
        if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, idx, &is_const, &v)) {
          return error(api, "KSMatMul: cannot read " + nm + ": " + consume(api, st));
        }
        if (!is_const || v == nullptr) {
          return error(api, "KSMatMul: " + nm + " must be a constant initializer (the node has " +
                                std::to_string(L) + " factors per 'patterns', so it needs " +
                                std::to_string(2 + 2 * L) + " inputs: X, bias, then values_l, scale_l per factor)");
        }
        int type = 0;
        std::vector<int64_t> dims;
        if ((e = type_shape(api, v, &type, &dims)) != "") return error(api, "KSMatMul: " + nm + ": " + e);
        void* data = nullptr;
        if (OrtStatus* st = api.GetTensorMutableData(const_cast<OrtValue*>(v), &data)) {
          return error(api, "KSMatMul: cannot read data of " + nm + ": " + consume(api, st));
        }
        if (part == 0) fi.values_dtype = type, fi.values_shape = dims, fi.values = data;
        else fi.scale_dtype = type, fi.scale_shape = dims, fi.scale = static_cast<const float*>(data);
      }
    }
    std::unique_ptr<Kernel> k(new Kernel());
    k->api = api;
    e = ks::build_plan(patterns, inputs, in_perm, out_perm, std::getenv("BFC_KS_ISA"), &k->plan);
    if (!e.empty()) return error(api, e);
    {  // an extra constant input means 'patterns' and the inputs disagree (a non-constant one is caught at run time)
      int is_const = 0;
      const OrtValue* v = nullptr;
      OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 2 + 2 * L, &is_const, &v);
      if (st) consume(api, st);
      else if (is_const && v)
        return error(api, "KSMatMul: 'patterns' describes " + std::to_string(L) + " factors, so the node needs " +
                              std::to_string(2 + 2 * L) + " inputs (X, bias, then values_l, scale_l per factor), but it has more");
    }
    // A constant bias is validated here; a computed bias is checked at run time.
    {
      int is_const = 0;
      const OrtValue* v = nullptr;
      OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 1, &is_const, &v);
      if (st) consume(api, st);
      else if (is_const && v) {
        int type = 0;
        std::vector<int64_t> dims;
        if ((e = type_shape(api, v, &type, &dims)) != "") return error(api, "KSMatMul: bias (input 1): " + e);
        const int64_t N = k->plan.N;
        if (dims.size() != 1 || dims[0] != N)
          return error(api, "KSMatMul: bias (input 1) has shape " + shape_str(dims) + " but the chain has N = " +
                                std::to_string(N) + " outputs; it must have shape (" + std::to_string(N) + ",)");
      }
    }
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

OrtStatus* compute(void* kp, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kp);
  if (k == nullptr) return nullptr;
  const Api& api = k->api;
  try {
    const ks::Plan& plan = k->plan;
    const size_t L = plan.factors.size();
    size_t nin = 0;
    if (OrtStatus* st = api.KernelContext_GetInputCount(ctx, &nin)) return st;
    if (nin != 2 + 2 * L) {
      return error(api, "KSMatMul: 'patterns' describes " + std::to_string(L) + " factors, so the node needs " +
                            std::to_string(2 + 2 * L) + " inputs (X, bias, values_l, scale_l per factor), got " +
                            std::to_string(nin));
    }
    const OrtValue* xv = nullptr;
    if (OrtStatus* st = api.KernelContext_GetInput(ctx, 0, &xv)) return st;
    if (xv == nullptr) return error(api, "KSMatMul: input X (input 0) is missing");
    int type = 0;
    std::vector<int64_t> xd;
    std::string e = type_shape(api, xv, &type, &xd);
    if (!e.empty()) return error(api, "KSMatMul: X (input 0): " + e);
    if (type != kTypeFloat) return error(api, "KSMatMul: X (input 0) must be float32, got element type " + std::to_string(type));
    if (xd.empty() || xd.back() != plan.M) {
      return error(api, "KSMatMul: X (input 0) has shape " + shape_str(xd) + " but the chain expects a last dimension of M = " +
                            std::to_string(plan.M));
    }
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < xd.size(); ++i) {
      if (xd[i] < 0) return error(api, "KSMatMul: X (input 0) has negative dimension in shape " + shape_str(xd));
      rows = (xd[i] != 0 && rows > (int64_t(1) << 40) / xd[i]) ? -1 : rows * xd[i];
      if (rows < 0) return error(api, "KSMatMul: X (input 0) shape " + shape_str(xd) + " is too large");
    }
    const OrtValue* bv = nullptr;
    if (OrtStatus* st = api.KernelContext_GetInput(ctx, 1, &bv)) return st;
    const float* bias = nullptr;
    if (bv != nullptr) {
      std::vector<int64_t> bd;
      if ((e = type_shape(api, bv, &type, &bd)) != "") return error(api, "KSMatMul: bias (input 1): " + e);
      if (type != kTypeFloat || bd.size() != 1 || bd[0] != plan.N) {
        return error(api, "KSMatMul: bias (input 1) has shape " + shape_str(bd) + " and element type " + std::to_string(type) +
                              "; it must be float32 of shape (" + std::to_string(plan.N) + ",)");
      }
      void* p = nullptr;
      if (OrtStatus* st = api.GetTensorMutableData(const_cast<OrtValue*>(bv), &p)) return st;
      bias = static_cast<const float*>(p);
    }
    std::vector<int64_t> yd = xd;
    yd.back() = plan.N;
    OrtValue* yv = nullptr;
    if (OrtStatus* st = api.KernelContext_GetOutput(ctx, 0, yd.data(), yd.size(), &yv)) return st;
    if (rows == 0) return nullptr;
    void* xp = nullptr;
    void* yp = nullptr;
    if (OrtStatus* st = api.GetTensorMutableData(const_cast<OrtValue*>(xv), &xp)) return st;
    if (OrtStatus* st = api.GetTensorMutableData(yv, &yp)) return st;
    PforCtx pctx{&api, ctx};
    e = ks::run_chain(plan, static_cast<const float*>(xp), bias, static_cast<float*>(yp), rows, ort_parallel_for, &pctx);
    if (!e.empty()) return error(api, e, kFail);
    return nullptr;
  } catch (const std::bad_alloc&) {
    return error(api, "KSMatMul: out of memory", kFail);
  } catch (...) {
    return error(api, "KSMatMul: compute failed", kFail);
  }
}

// ---- OrtCustomOp callbacks ------------------------------------------------------------
void* legacy_create(const CustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  void* k = nullptr;
  OrtStatus* st = create_kernel(op, api, info, &k);
  if (st) Api::load(api).ReleaseStatus(st);
  return k;
}
void legacy_compute(void* k, OrtKernelContext* ctx) {
  if (!k) return;
  if (OrtStatus* st = compute(k, ctx)) static_cast<Kernel*>(k)->api.ReleaseStatus(st);
}
void destroy(void* k) { delete static_cast<Kernel*>(k); }
const char* get_name(const CustomOp*) { return kOpName; }
const char* get_ep(const CustomOp*) { return "CPUExecutionProvider"; }
int input_type(const CustomOp*, size_t i) { return i < 2 ? kTypeFloat : kTypeUndefined; }
size_t input_count(const CustomOp*) { return 3; }
int output_type(const CustomOp*, size_t) { return kTypeFloat; }
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

const OrtApi* g_api = nullptr;  // set once in RegisterCustomOps

// Output shape = X.shape[:-1] + (N,), N = a*c*d of the last factor's values (a, d, b, c).
// Leaves the shape unknown when the inputs do not allow it; the kernel reports errors.
OrtStatus* infer_shape(const CustomOp*, OrtShapeInferContext* ctx) {
  if (g_api == nullptr) return nullptr;
  const Api api = Api::load(g_api);
  size_t n = 0;
  if (OrtStatus* st = api.ShapeInferContext_GetInputCount(ctx, &n)) return st;
  if (n < 4) return nullptr;
  // dims and symbolic names of input i (names point into the context's info)
  auto dims_of = [&](size_t i, std::vector<int64_t>* d, std::vector<const char*>* sym, bool* ok) -> OrtStatus* {
    *ok = false;
    OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context: not released
    if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, i, &info)) return st;
    size_t r = 0;
    if (OrtStatus* st = api.GetDimensionsCount(info, &r)) return st;
    d->assign(r, -1);
    sym->assign(r, nullptr);
    if (r == 0) return nullptr;
    if (OrtStatus* st = api.GetDimensions(info, d->data(), r)) return st;
    if (OrtStatus* st = api.GetSymbolicDimensions(info, sym->data(), r)) return st;
    *ok = true;
    return nullptr;
  };
  std::vector<int64_t> xd, vd;
  std::vector<const char*> xs, vs;
  bool okx = false, okv = false;
  if (OrtStatus* st = dims_of(0, &xd, &xs, &okx)) return st;
  if (OrtStatus* st = dims_of(n - 2, &vd, &vs, &okv)) return st;
  if (!okx || !okv || vd.size() != 4) return nullptr;
  const bool known = vd[0] > 0 && vd[1] > 0 && vd[3] > 0 && vd[0] < (1 << 30) && vd[1] < (1 << 30) && vd[3] < (1 << 30);
  xd.back() = known ? vd[0] * vd[1] * vd[3] : -1;
  xs.back() = "";
  for (auto& p : xs)
    if (p == nullptr) p = "";
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&out)) return st;
  OrtStatus* st = api.SetTensorElementType(out, kTypeFloat);
  if (!st) st = api.SetDimensions(out, xd.data(), xd.size());
  if (!st) st = api.SetSymbolicDimensions(out, xs.data(), xs.size());
  if (!st) st = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return st;
}

CustomOp make_op() {
  CustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = 17;
  op.CreateKernel = legacy_create;
  op.GetName = get_name;
  op.GetExecutionProviderType = get_ep;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = legacy_compute;
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
  // GetMayInplace / GetAliasMap stay NULL: ORT reads them only for version >= 18.
  return op;
}

CustomOp g_op = make_op();

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
    if (OrtStatus* st = api.CustomOpDomain_Add(domain, &g_op)) {
      domain = nullptr;  // leaked on this error path only; registration failed anyway
      return st;
    }
  }
  return api.AddCustomOpDomain(options, domain);
}
