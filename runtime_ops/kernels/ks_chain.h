// Kronecker-sparse chain kernels: plain C++17, no ONNX Runtime types.
//
// A chain computes y = (x[:, in_perm] @ K_1 @ ... @ K_L)[:, out_perm] + bias for a
// batch of rows x (rows x M, row-major).  Factor l has KS pattern (a, b, c, d) and
// canonical values V[i, l, j, k] (shape (a, d, b, c)) with
//     K[i*b*d + j*d + l, i*c*d + k*d + l] = V[i, l, j, k] * scale[i, l, 0|k].
//
// Execution model: the batch is cut into tiles of NB = 8 or 16 rows.  A tile is
// transposed once into a feature-major buffer buf[feature][NB] (8x8 register
// transposes; in_perm is folded into the destination rows), every factor then maps
// buf -> buf with output-stationary register tiles (MR output features x NB batch
// columns, the reduction over the b inputs of one (i, l) block).  Buffers are stored
// block-major for the factor that reads them (row (i*d + l)*b + j holds feature
// i*b*d + j*d + l), so a block's inputs are contiguous; each factor's epilogue writes
// its outputs straight into the next factor's order (out_row).  The last buffer is
// transposed back row-major (out_perm folded into the source rows) with the bias added; on
// AVX-512 a last VNNI int8 factor with d == 1 and no out_perm transposes its register tiles
// into y itself (Plan::direct_out).
//
// Schedule: the batch runs in panels of tiles whose activation buffers fit in L2 (a
// panel goes through the whole chain before the next starts).  Within a panel, factors
// with big blocks run factor by factor, weights in cache-sized
// chunks of blocks applied to every tile (each weight read once per call).  A tail of
// small-block factors (b, c <= 4, e.g. butterflies) whose a_l divide each other splits
// into independent groups of features; each (tile, group) runs the whole tail in L1
// ("depth first", like a cache-blocked FFT) instead of one pass over the buffers per factor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ks_validate.h"

namespace bfc {
namespace ks {

enum class Path : int { F32 = 0, FP8 = 1, I8 = 2 };

// One factor, prepacked for the register tiles.
struct Factor {
  int64_t a = 0, b = 0, c = 0, d = 0;
  Path path = Path::F32;
  int mr = 1;        // output rows per register tile
  int64_t nkt = 0;   // k tiles per (i, l) block: ceil(c / mr)
  int64_t bp = 0;    // ceil(b / 2): int8 input pairs
  // F32: wf[((i*d + l)*nkt + kt)*b*mr + j*mr + r]  (dequantized, scale folded in)
  std::vector<float> wf;
  // FP8: wf holds the exactly decoded bytes (scale not folded: applied in the epilogue).
  // Small I8 factors (AVX2): wf also holds the int8 values as floats; with |q| <= 127,
  // |w| <= 128 and b <= 1024 every partial sum is an integer below 2^24, so float32
  // FMA accumulation is exactly the int32 accumulation of the spec.
  bool small = false;  // b <= 4 and c <= 4 (mr == c, nkt == 1): unrolled small-block kernels
  // I8: wq[((i*d + l)*nkt + kt)*bp*mr*2 + jp*mr*2 + r*2 + t] = V[i, l, 2*jp + t, kt*mr + r]
  std::vector<int16_t> wq;
  // FP8 / I8 epilogue scale: sc[((i*d + l)*nkt + kt)*mr + r]
  std::vector<float> sc;
  // I8 on AVX-512 VNNI (Plan::isa == 2, big blocks only; see ks_layers_avx512.cc): register
  // tiles of mrv in {4, 8, 12, 16} outputs, inputs in groups of 4 (b4 = ceil(b / 4)):
  // wv[((tile*b4 + j4)*mrv + r)*4 + t] = V[i, l, 4*j4 + t, kt*mrv + r] (0 past b), tile =
  // (i*d + l)*nktv + kt; corr[tile*mrv + r] = -128 * sum_j V[i, l, j, k] (minus the u8 offset:
  // the accumulators' start); scv[tile*mrv + r] the epilogue scale.
  int mrv = 0;
  int64_t nktv = 0, b4 = 0;
  std::vector<int8_t> wv;
  std::vector<int32_t> corr;
  std::vector<float> scv;
  // FP8 on AVX512_BF16 (Plan::isa == 3, big blocks only; ks_layers_avx512bf16.cc): the same
  // mrv / nktv tiles, pairs of bf16 weights (exact decode) per output:
  // wb[(tile*bp + jp)*mrv + r] = bf16(V[i,l,2jp,k]) | bf16(V[i,l,2jp+1,k]) << 16; scale in scv
  std::vector<uint32_t> wb;
  // Storage row of output feature o = i*c*d + k*d + l in the next buffer: the next
  // factor's block-major row ((i'*d' + l')*b' + j'), or o itself after the last factor.
  std::vector<int32_t> out_row;

  int64_t in_dim() const { return a * b * d; }
  int64_t out_dim() const { return a * c * d; }
};

// Uninitialized, 64-byte aligned, grow-only scratch memory.
struct ScratchBuf {
  std::unique_ptr<float[]> mem;
  size_t size = 0;
  float* get(size_t floats) {
    if (floats + 16 > size) {
      mem.reset(new float[floats + 16]);
      size = floats + 16;
    }
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(mem.get()) + 63) & ~uintptr_t(63));
  }
};

struct Plan {
  int64_t M = 0, N = 0;
  std::vector<Factor> factors;
  int64_t max_dim = 0;            // largest feature dimension along the chain
  int64_t max_pairs = 0;          // largest int8 pair-row count
  std::vector<int32_t> gather_row;   // storage row of X column s (in_perm folded in)
  std::vector<int32_t> scatter_row;  // final-buffer row of Y column o (out_perm folded in)
  size_t df_start = 0;            // first factor of the depth-first small-block tail (L = none)
  int64_t df_group_rows = 0;      // largest per-group activation (features) inside that tail
  int isa = 0;                    // 0 portable, 1 avx2, 2 avx512 (VNNI int8 + AVX2 for the rest),
                                  // 3 avx512bf16 (2 + fp8 factors by AVX512_BF16 dot products)
  // the first factor is a VNNI int8 factor whose storage rows come in aligned quads of
  // consecutive X columns (b % 4 == 0, M % 16 == 0): LayerTable::gather_q writes its u8
  // quads straight from x (no float buffer, no separate quantization pass)
  // 0: no; 1: X columns 4g..4g+3 are storage rows R..R+3 (quad line R/4); 2: 16-line groups
  // whose byte t comes from 16 consecutive X columns gq_src[4*g + t] (lines gq_lines[16*g + k]),
  // e.g. Monarch's first factor (1, b, c, d): column j*d + l is row l*b + j
  int gather_q = 0;
  std::vector<int32_t> gq_lines, gq_src;
  // the last factor is a VNNI int8 factor with d == 1, c % 16 == 0, 16-output tiles and no
  // out_perm: on AVX-512 with 16-row tiles it writes y itself (LayerTable::i8y), no scatter pass
  // (measured: 12-output tiles with masked stores were no faster than the scatter)
  bool direct_out = false;
  mutable std::mutex scratch_mu;  // guards scratch (concurrent runs fall back to a private buffer)
  mutable ScratchBuf scratch;
};

// Validates the node (validate_node, with its constant values and scales) and prepacks
// the factors.  Returns "" on success, otherwise a message naming the input and shapes.
std::string build_plan(const NodeDesc& node, const char* isa_override, Plan* out);

// Tile width for a batch of `rows` rows.
int tile_width(int64_t rows);
inline int64_t num_tiles(int64_t rows, int nb) { return (rows + nb - 1) / nb; }

// Parallel-for provided by the caller (ORT's intra-op pool): runs fn(user, i) for i in
// [0, n); returns false on failure.
using ParallelFor = bool (*)(void* ctx, void (*fn)(void* user, size_t i), size_t n, void* user);

// y (rows x N) from x (rows x M); bias may be null.  Batch panels go through the whole
// chain (see the schedule above), items spread over pfor (null = serial).  Scratch is
// reused across calls (Plan::scratch).  Returns "" or an error message.
std::string run_chain(const Plan& plan, const float* x, const float* bias, float* y, int64_t rows,
                      ParallelFor pfor, void* pfor_ctx);

// IEEE binary16 -> float32, exact (also used for the low-bit op's fp16 group scales)
float half_to_float(uint16_t h);

const char* isa_name(int isa);
bool cpu_has_avx2();
bool cpu_has_avx512vnni();  // AVX-512 F/BW/VL + VNNI (and AVX2/FMA for the shared kernels)
bool cpu_has_avx512bf16();  // the above + AVX512_BF16
// the ISA build_plan picks for BFC_KS_ISA = isa_override (null/"auto": the best this CPU runs)
int resolve_isa(const char* isa_override, std::string* err);

// ---- per-ISA layer kernels (portable, AVX2; AVX-512 VNNI replaces the int8 big-block ones) ----------------------
struct LayerTable {
  // f32 / fp8 / i8 compute the (i, l) blocks blk in [blk0, blk1), blk = i*d + l, of one tile
  void (*f32)(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1);
  void (*fp8)(const Factor& f, const float* in, float* out, int nb, int64_t blk0, int64_t blk1);
  // quantizes in (feature-major) into pair rows q and per-column scales colscale
  void (*quant)(const Factor& f, const float* in, int16_t* q, float* colscale, int nb);
  void (*i8)(const Factor& f, const int16_t* q, const float* colscale, float* out, int nb, int64_t blk0,
             int64_t blk1);
  // small int8 factors (may be null): per-column amax -> colscale = amax/127, inv = 127/amax
  // (0 if amax == 0), then blocks quantized on the fly in float (exact, see Factor::wf)
  void (*amax)(const float* in, int64_t nrows, float* colscale, float* inv, int nb);
  void (*i8f)(const Factor& f, const float* in, const float* inv, const float* colscale, float* out, int nb,
              int64_t blk0, int64_t blk1);
  // butterfly pair (may be null): f = (a, 2, 2, d) then g = (2a, 2, 2, d/2), g not int8,
  // fused in registers (4 inputs -> 4 outputs per unit) for f's block rows i in [i0, i1);
  // f int8 uses inv / colscale like i8f.  Same roundings as two separate passes.
  void (*pair)(const Factor& f, const Factor& g, const float* in, const float* inv, const float* colscale, float* out,
               int nb, int64_t i0, int64_t i1, float* colmax);
  // small-block factor of any path (may be null; int8 quantized on the fly as i8f).
  // colmax (pair and small; may be null): updated with max |output| per batch column, so
  // a following int8 factor needs no amax pass over the buffer.
  void (*small)(const Factor& f, const float* in, const float* inv, const float* colscale, float* out, int nb,
                int64_t blk0, int64_t blk1, float* colmax);
  // columns [c0, c1) of x rows [r0, r0 + nv) (row-major, M columns) -> tile buffer
  // (buffer columns >= nv zeroed); c0 is a multiple of 8
  void (*gather)(const Plan& p, const float* x, int64_t r0, int64_t nv, int nb, int64_t c0, int64_t c1, float* buf);
  // tile buffer -> columns [c0, c1) of y rows [r0, r0 + nv) (+ bias); c0 is a multiple of 8
  void (*scatter)(const Plan& p, const float* buf, const float* bias, float* y, int64_t r0, int64_t nv, int nb,
                  int64_t c0, int64_t c1);
  // ---- fused int8 passes (AVX-512 only, null elsewhere; same bits as the unfused passes) ----
  // x rows [r0, r0 + nv) (all M columns, nb == 16, Plan::gather_q) -> factor f's u8 quads and
  // column scales: per-row amax read from x, gather + quantization in one pass
  void (*gather_q)(const Plan& p, const Factor& f, const float* x, int64_t r0, int64_t nv, int16_t* q,
                   float* colscale);
  // quant with the per-column amax given (nb floats), no amax pass over the buffer
  void (*quant_am)(const Factor& f, const float* in, const float* amax, int16_t* q, float* colscale, int nb);
  // i8 that also writes max |output| per batch column of blocks [blk0, blk1) to colmax (nb floats)
  void (*i8m)(const Factor& f, const int16_t* q, const float* colscale, float* out, int nb, int64_t blk0,
              int64_t blk1, float* colmax);
  // the last factor straight into y (Plan::direct_out, nb == 16): blocks [blk0, blk1) of one tile
  // whose nv rows start at y (row stride ldy), bias (may be null) added; no scatter pass
  void (*i8y)(const Factor& f, const int16_t* q, const float* colscale, const float* bias, float* y, int64_t ldy,
              int64_t nv, int64_t blk0, int64_t blk1);
};
const LayerTable& portable_table();
#if defined(BFC_HAVE_AVX2)
const LayerTable& avx2_table();
#endif
#if defined(BFC_HAVE_AVX512)
const LayerTable& avx512_table();
#endif
#if defined(BFC_HAVE_AVX512BF16)
const LayerTable& avx512bf16_table();
#endif

}  // namespace ks
}  // namespace bfc
