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
// Kernel layout (one for every ISA, built once at kernel creation from the ONNX codes stream,
// whose format does not change): the codes are re-packed at their own width and streamed once.
//   - inputs: each group is padded to a multiple of ks inputs (ks = 8, 32, 16 for b = 4, 3, 2; the
//     padded activations are 0), Kp padded inputs; gstart[gi] the padded offset of group gi;
//   - outputs: blocks of 16 (Np = 16 nblk, padded codes 0, padded scales 0), panels of up to
//     kPanel = 4 blocks (nvp blocks in panel pn);
//   - a chunk of one block is ks inputs x 16 outputs in cb bytes (64, 192, 64), made of ks/4
//     "vectors" e_j (j = 0 .. ks/4-1): 16 outputs x 4 inputs, byte n*4 + t = u[k0 + 4j + t, n],
//     the vpdpbusd layout (u8 weights x s8 activation quads broadcast per row).  Line bytes
//     (one 64-byte line per 4 / 2 bits, three for 3 bits), at byte i = n*4 + t:
//       b = 4: line[i] = e0 | e1 << 4
//       b = 2: line[i] = e0 | e1 << 2 | e2 << 4 | e3 << 6
//       b = 3: L0[i] = e0 | e1 << 3 | (e6 & 3) << 6, L1[i] = e2 | e3 << 3 | (e7 & 3) << 6,
//              L2[i] = e4 | e5 << 3 | (e6 >> 2) << 6 | (e7 >> 2) << 7
//     so masking a line in place gives e_j * 2^sh_j as u8 (sh = 0,4 | 0,2,4,6 | 0,3,0,3,0,3,4,5 with
//     e6, e7 one shift + or away): the AVX-512 kernel accumulates one int32 register per shift
//     class and shifts the exact class sums right once per group;
//   - stream order: panel pn (stride panel_bytes), group gi, then chunk c, block v (v inner):
//     the chunk at group_base + (c*nvp + v)*cb, then the group's scales of the panel's nvp*16
//     outputs (AVX-512: float16 when every scale is exactly a float16, else float32), padded to 64 bytes:
//       group_base(pn, gi) = pn*panel_bytes + nvp*(gstart[gi]/ks)*cb + gi*scale_bytes(nvp).
//   The whole weight is one sequential stream for a GEMV (all rows of a call at a time per panel).
// sum_k u q = sum_k (u - z) q + z sum_k q: the row's group sums gsum[r, gi] of q give the
// correction.  AVX2: vpmaddubsw (u <= 15, |q| <= 127: no s16 saturation) + vpmaddwd.
#pragma once

#include <algorithm>
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
  bool has_prequantized = false;
  int64_t prequantized = 0;            // 1: X is int8 q with row scales x_scale (RotateQuantize's outputs)
  ks::TensorDesc x, bias, codes, scales;
  ks::TensorDesc x_scale;              // prequantized: input 4, float32 X.shape[:-1] + (1,)
  // messages: the op named and the input number of the first rotation input (RotateQuantize: 1)
  const char* op_name = "LowBitMatMul";
  size_t rot_first = 4;
  // rot_patterns: values_l, scale_l per rotation factor.  rot_angles = 1 (K = m 2^k, m odd; see
  // bfc/lowbit/rotation.py): block (1, 2^k, m, m) = factor 0's values, then angles_l of shape
  // (m 2^(l-1), 2^(k-l)) for l = 1..k; stage l is the KS factor (m 2^(l-1), 2, 2, 2^(k-l)) with
  // blocks [[cos t, sin t], [sin t, -cos t]] (cos, sin in double, rounded to float32 once).
  std::vector<ks::TensorDesc> rot;
};

constexpr int64_t kMaxGroup = int64_t(1) << 20;   // |isum| <= group * 127 * 15 < 2^31
constexpr int64_t kRowWiseRows = 2;                 // rotation row by row up to this many rows
constexpr int64_t kGemvRows = 8;                    // GEMV path (weights streamed once) up to this many rows

constexpr int kPanel = 4;                           // 16-output blocks per panel
constexpr int64_t kSegChunks = 4096;                // chunks per in-place int32 segment (no overflow)

struct Plan {
  int64_t K = 0, N = 0, bits = 0, group = 0, ngroups = 0;
  int64_t Kp = 0;                   // padded inputs
  int64_t ks = 0, cb = 0;           // inputs per chunk, bytes per chunk of one block
  int64_t nblk = 0, Np = 0, npanel = 0;
  bool sc16 = false;                // scales stored as float16 (exact; AVX-512 only), else float32
  int64_t panel_bytes = 0;          // bytes of a full panel (kPanel blocks)
  std::vector<int64_t> gstart;      // padded input offset of group gi (size ngroups + 1)
  std::vector<int32_t> kmap;        // padded position of input k (size K)
  // the stream (see above): 64-byte aligned; 2 MiB aligned and advised for transparent huge
  // pages on Linux from 2 MiB on (a GEMV streams it once per call: fewer TLB misses)
  std::unique_ptr<uint8_t[]> w_mem;   // owns the allocation; w points inside it
  const uint8_t* w = nullptr;
  size_t w_bytes = 0;                 // bytes of the stream
  int zero = 0;                     // z = 2^(b-1)
  bool rotate = false;
  bool prequantized = false;        // X is int8 q + row scales (run_quantized)
  ks::Plan rot;                     // the rotation chain (rotate only)
  size_t rot_inputs = 0;            // node inputs after scales
  // small batches (rows <= kRowWiseRows): the rotation applied row by row from transposed float
  // values rt[l][((i*b + j)*c + k)*d + l'] = V[i, l', j, k] * scale (a tile of 8 batch columns
  // would compute 8x the work for one row); empty when a factor is not float
  std::vector<std::vector<float>> rt;
  int isa = 0;                      // 0 portable, 1 avx2, 2 avx512 (VNNI)
  const uint8_t* wp() const { return w; }
  mutable std::mutex scratch_mu;    // guards scratch (concurrent runs use a private buffer)
  mutable ks::ScratchBuf scratch;
};

// Layout arithmetic (internal linkage: used from TUs compiled with different ISA flags).
namespace {
inline int panel_blocks(const Plan& p, int64_t pn) { return int(std::min<int64_t>(kPanel, p.nblk - pn * kPanel)); }
inline int64_t scale_bytes(const Plan& p, int nvp) { return (int64_t(nvp) * 16 * (p.sc16 ? 2 : 4) + 63) / 64 * 64; }
inline const uint8_t* group_base(const Plan& p, int64_t pn, int nvp, int64_t gi) {
  return p.wp() + pn * p.panel_bytes + nvp * (p.gstart[size_t(gi)] / p.ks) * p.cb + gi * scale_bytes(p, nvp);
}
inline int64_t group_chunks(const Plan& p, int64_t gi) { return (p.gstart[size_t(gi + 1)] - p.gstart[size_t(gi)]) / p.ks; }
}  // namespace

// Checks attributes and every known type/shape (need_constants: kernel creation, codes/scales/
// rotation factors must carry data).  Returns "" or a message naming the input.
std::string validate(const Desc& d, bool need_constants);
std::string build_plan(const Desc& d, const char* isa_override, Plan* out);
// number of rotation inputs the attributes of d call for (0 in the prequantized form)
size_t rotation_inputs(const Desc& d);
// rows of x: validated X, bias (and x_scale in the prequantized form) of one run
std::string validate_run(const Plan& p, size_t num_inputs, const ks::TensorDesc& x, const ks::TensorDesc& bias,
                         const ks::TensorDesc& x_scale, int64_t* rows);
std::string run(const Plan& p, const float* x, const float* bias, float* y, int64_t rows, ks::ParallelFor pfor,
                void* pfor_ctx);
// The prequantized form: q (rows x K int8) and cs (rows) as quantize_rows computes them from x Q
// (RotateQuantize), then the same GEMM: y = run(x) bit for bit when q, cs come from the same x.
std::string run_quantized(const Plan& p, const int8_t* q, const float* cs, const float* bias, float* y,
                          int64_t rows, ks::ParallelFor pfor, void* pfor_ctx);

// ---- RotateQuantize (ai.bfc): the rotation and row quantization of LowBitMatMul, alone ----------
//   xr = x Q;  cs[r] = amax_r / 127;  q[r, k] = rint(clip(xr[r, k] * 127/amax_r, -127, 127))
// d: K, the rotation attributes and inputs (rot_first = 1), X.  The plan is a LowBitMatMul plan
// with one group of K unpadded inputs (Kp = K) and no weights.
std::string validate_rotate_quantize(const Desc& d, bool need_constants);
std::string build_rotate_quantize(const Desc& d, const char* isa_override, Plan* out);
std::string validate_rotate_quantize_run(const Plan& p, size_t num_inputs, const ks::TensorDesc& x, int64_t* rows);
std::string rotate_quantize(const Plan& p, const float* x, int8_t* q, float* cs, int64_t rows, ks::ParallelFor pfor,
                            void* pfor_ctx);

// ---- per-ISA GEMM on prepared activations -------------------------------------------------
// q: rows x Kp int8 (row-major, padded 0), gsum: rows x ngroups, cs: rows.  Computes the output
// panels [pn0, pn1) of rows [r0, r1) into y (row stride N).  Rows [r0, r1) of at most
// kGemvRows rows stream the panel's weights once for all rows (the decoder GEMV).
struct Act {
  const int8_t* q;
  const int32_t* gsum;
  const float* cs;
};
using GemmFn = void (*)(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1,
                        int64_t pn0, int64_t pn1);
void gemm_portable(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
                   int64_t pn1);
#if defined(BFC_HAVE_AVX2)
void gemm_avx2(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
               int64_t pn1);
#endif
#if defined(BFC_HAVE_AVX512)
void gemm_avx512(const Plan& p, const Act& a, const float* bias, float* y, int64_t r0, int64_t r1, int64_t pn0,
                 int64_t pn1);
void quantize_avx512(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs);
#endif
// code u[k, n] of padded input kp (kmap) and output n < Np from the stream (tests, portable path)
int code_at_packed(const Plan& p, int64_t kp, int64_t n);
float scale_at_packed(const Plan& p, int64_t gi, int64_t n);
// per-row quantization of xr rows [r0, r1) (K floats each) into q (Kp), gsum, cs (portable; exact)
void quantize_rows(const Plan& p, const float* xr, int64_t r0, int64_t r1, int8_t* q, int32_t* gsum, float* cs);

}  // namespace lowbit
}  // namespace bfc
