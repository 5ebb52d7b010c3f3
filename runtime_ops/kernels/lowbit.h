// Rotated low-bit matmul (ai.bfc::LowBitMatMul): y = quant(x Q) deq(codes, group scales) + bias.
// Plain C++17, no ONNX Runtime types.  Spec and numpy reference: bfc/ops.py
// (lowbit_matmul_reference).
//
//   xr = x Q                       Q: a KS chain K -> K (the butterfly rotation), float32
//                                  factors evaluated by the KS chain executor (run_chain);
//                                  no rotation when the node has no rot_patterns
//   q[r, k] = rint(clip(xr[r, k] * 127/amax_r, -127, 127))    per row, as KSMatMul's int8
//   cs[r] = amax_r / 127
//   W[k, n] = s[g(k), n] * (u[k, n] - z),  u the b-bit code, z = 2^(b-1), g(k) = k / group
//   isum[r, gi, n] = sum_{k in group gi} q[r, k] * (u[k, n] - z)          exact (int32)
//   acc = 0; for gi in order: acc = acc + float(isum) * s[gi, n]          float32, two roundings
//   y[r, n] = acc * cs[r] (+ bias[n])                                     float32
//
// Kernel layout (one for every ISA, built at kernel creation): codes of every width live
// as nibbles (b = 2, 3 use the same 4-bit storage; only z differs).  Each group is padded
// to a multiple of 8 inputs (padded activations are 0), giving Kp padded inputs; outputs
// are padded to Np = 16 * nblk.  Block nb of 16 outputs, quad pair p (padded inputs
// 8p .. 8p+7):  w[(nb*P + p)*64 + n*4 + t] = u[8p + t, 16nb + n] | u[8p + 4 + t, 16nb + n] << 4
// so one 64-byte line unpacks (& 0x0f, >> 4 & 0x0f) into two u8 vectors of 16 outputs x 4
// inputs: the vpdpbusd layout (u8 weights x s8 activation quads broadcast per row).
// sum_k u q = sum_k (u - z) q + z sum_k q: the row's group sums gsum[r, gi] of q give the
// correction.  AVX2: vpmaddubsw (u <= 15, |q| <= 127: no s16 saturation) + vpmaddwd.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ks_chain.h"

namespace bfc {
namespace lowbit {

struct Desc {                 // what the adapter knows about a LowBitMatMul node
  bool has_k = false, has_n = false, has_bits = false, has_group = false;
  int64_t K = 0, N = 0, bits = 0, group = 0;
  bool has_rot = false;
  std::vector<int64_t> rot_patterns;   // empty / absent: no rotation (unless rot_angles)
  bool has_angles = false;
  int64_t rot_angles = 0;              // 1: the butterfly rotation as its stored parameters (below)
  ks::TensorDesc x, bias, codes, scales;
  // rot_patterns: values_l, scale_l per rotation factor.  rot_angles = 1 (K = m 2^k, m odd; see
  // bfc/lowbit/rotation.py): block (1, 2^k, m, m) = factor 0's values, then angles_l of shape
  // (m 2^(l-1), 2^(k-l)) for l = 1..k; stage l is the KS factor (m 2^(l-1), 2, 2, 2^(k-l)) with
  // blocks [[cos t, sin t], [sin t, -cos t]] (cos, sin in double, rounded to float32 once).
  std::vector<ks::TensorDesc> rot;
};

constexpr int64_t kMaxGroup = int64_t(1) << 20;   // |isum| <= group * 127 * 15 < 2^31
constexpr int64_t kRowWiseRows = 2;                 // rotation row by row up to this many rows

struct Plan {
  int64_t K = 0, N = 0, bits = 0, group = 0, ngroups = 0;
  int64_t Kp = 0, P = 0, nblk = 0, Np = 0;   // padded inputs, quad pairs, 16-output blocks
  std::vector<int64_t> gstart;      // padded input offset of group gi (size ngroups + 1)
  std::vector<int32_t> kmap;        // padded position of input k (size K)
  std::vector<uint8_t> w;           // nibble-packed codes (see above), 64-byte aligned copy
  std::vector<float> sc;            // sc[gi * Np + n], 0 for padded outputs
  int zero = 0;                     // z = 2^(b-1)
  bool rotate = false;
  ks::Plan rot;                     // the rotation chain (rotate only)
  size_t rot_inputs = 0;            // node inputs after scales
  // small batches (rows <= kRowWiseRows): the rotation applied row by row from transposed float
  // values rt[l][((i*b + j)*c + k)*d + l'] = V[i, l', j, k] * scale (a tile of 8 batch columns
  // would compute 8x the work for one row); empty when a factor is not float
  std::vector<std::vector<float>> rt;
  int isa = 0;                      // 0 portable, 1 avx2, 2 avx512 (VNNI)
  const uint8_t* wp() const;        // 64-byte aligned start of w
  size_t w_off = 0;
  mutable std::mutex scratch_mu;    // guards scratch (concurrent runs use a private buffer)
  mutable ks::ScratchBuf scratch;
};

// Checks attributes and every known type/shape (need_constants: kernel creation, codes/scales/
// rotation factors must carry data).  Returns "" or a message naming the input.
std::string validate(const Desc& d, bool need_constants);
std::string build_plan(const Desc& d, const char* isa_override, Plan* out);
// rows of x: validated X and bias of one run
std::string validate_run(const Plan& p, size_t num_inputs, const ks::TensorDesc& x, const ks::TensorDesc& bias,
                         int64_t* rows);
std::string run(const Plan& p, const float* x, const float* bias, float* y, int64_t rows, ks::ParallelFor pfor,
                void* pfor_ctx);

// ---- per-ISA GEMM on prepared activations -------------------------------------------------
// q: rows x Kp int8 (row-major, padded 0), gsum: rows x ngroups, cs: rows.  Computes output
// blocks [nb0, nb1) of rows [r0, r1) into y (row stride N).
struct Act {
  const int8_t* q;
  const int32_t* gsum;
  const float* cs;
};
using GemmFn = void (*)(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1,
                        int64_t nb0, int64_t nb1);
void gemm_portable(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t nb0,
                   int64_t nb1);
#if defined(BFC_HAVE_AVX2)
void gemm_avx2(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t nb0,
               int64_t nb1);
#endif
#if defined(BFC_HAVE_AVX512)
void gemm_avx512(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t nb0,
                 int64_t nb1);
void quantize_avx512(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs);
#endif
// per-row quantization of xr rows [r0, r1) (K floats each) into q (Kp), gsum, cs (portable; exact)
void quantize_rows(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs);

}  // namespace lowbit
}  // namespace bfc
