// Helpers shared by the layer kernels (portable and AVX2) and the chain executor: the
// run-time -> compile-time dispatch of tile parameters and the int8 column scale.
//
// Internal linkage on purpose: ks_layers_avx2.cc is compiled with -mavx2 -mfma, and an
// inline function with external linkage could be merged by the linker into the
// AVX2-compiled copy and run on a CPU without AVX2.
#pragma once

#include <cstdint>
#include <type_traits>

namespace bfc {
namespace ks {
namespace {

template <int V>
using Int = std::integral_constant<int, V>;

// f(Int<MR>{}) for the register-tile row count MR = Factor::mr in 1..6.
template <class F>
inline void with_mr(int mr, F&& f) {
  switch (mr) {
    case 1: f(Int<1>{}); break;
    case 2: f(Int<2>{}); break;
    case 3: f(Int<3>{}); break;
    case 4: f(Int<4>{}); break;
    case 5: f(Int<5>{}); break;
    default: f(Int<6>{}); break;
  }
}

// f(Int<NB>{}) for the batch tile width NB in {8, 16} (tile_width()).
template <class F>
inline void with_nb(int nb, F&& f) {
  if (nb == 8) f(Int<8>{});
  else f(Int<16>{});
}

// f(Int<MRV>{}) for the VNNI / bf16 register-tile rows Factor::mrv in {4, 8, 12, 16}
// (ks_layers_avx512.cc, ks_layers_avx512bf16.cc; chosen by choose_mrv at packing time).
template <class F>
inline void with_mrv(int mrv, F&& f) {
  switch (mrv) {
    case 4: f(Int<4>{}); break;
    case 8: f(Int<8>{}); break;
    case 12: f(Int<12>{}); break;
    default: f(Int<16>{}); break;
  }
}

// The VNNI / bf16 tile rows for c outputs: 16 unless 12, 8 or 4 pads c less (first such wins).
inline int choose_mrv(int64_t c) {
  int mrv = 16;
  int64_t best = (c + 15) / 16 * 16 - c;
  for (int m : {12, 8, 4}) {
    const int64_t waste = (c + m - 1) / m * m - c;
    if (waste < best) best = waste, mrv = m;
  }
  return mrv;
}

// Symmetric int8 quantization of one batch column with max |h| = amax (spec in bfc/ops.py):
// q = rint(clip(h * inv, -127, 127)) with inv = 127/amax (0 when amax == 0), and the
// column's dequantization scale colscale = amax/127.
inline void int8_column_scale(float amax, float* colscale, float* inv) {
  *colscale = amax / 127.f;
  *inv = amax > 0.f ? 127.f / amax : 0.f;
}

}  // namespace
}  // namespace ks
}  // namespace bfc
