# The ai.bfc custom-op library (included by CMakeLists.txt when a C++ compiler exists).
# Not linked against onnxruntime: the API table is handed over at registration time.
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_CXX_EXTENSIONS OFF)
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release)
endif()

set(BFC_ORT_INCLUDE_DIR "" CACHE PATH "optional: directory with onnxruntime_c_api.h, to static-check the slot table")
option(BFC_BUILD_TESTS "build the native kernel tests (bfc_ks_tests, run by ctest)" OFF)

# ORT-free kernels (validation, prepacking, chain executor, per-ISA layers): a static
# library shared by the custom-op module and the native tests.
add_library(bfc_ks_kernels STATIC
  "${CMAKE_CURRENT_LIST_DIR}/kernels/ks_validate.cc"
  "${CMAKE_CURRENT_LIST_DIR}/kernels/ks_chain.cc"
  "${CMAKE_CURRENT_LIST_DIR}/kernels/ks_layers_portable.cc"
  "${CMAKE_CURRENT_LIST_DIR}/kernels/lowbit.cc")
set_target_properties(bfc_ks_kernels PROPERTIES
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON
  POSITION_INDEPENDENT_CODE ON)

# AVX2/FMA kernels: a separate translation unit with its own flags, chosen at run time.
string(TOLOWER "${CMAKE_SYSTEM_PROCESSOR}" _bfc_proc)
if(_bfc_proc MATCHES "^(x86_64|amd64|x64|i[3-6]86)$" AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_sources(bfc_ks_kernels PRIVATE "${CMAKE_CURRENT_LIST_DIR}/kernels/ks_layers_avx2.cc"
    "${CMAKE_CURRENT_LIST_DIR}/kernels/lowbit_avx2.cc")
  set_source_files_properties("${CMAKE_CURRENT_LIST_DIR}/kernels/ks_layers_avx2.cc"
    "${CMAKE_CURRENT_LIST_DIR}/kernels/lowbit_avx2.cc"
    PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma")
  target_compile_definitions(bfc_ks_kernels PUBLIC BFC_HAVE_AVX2=1)
  # AVX-512 VNNI int8 kernels: only this file gets the AVX-512 flags; dispatched by cpuid.
  include(CheckCXXCompilerFlag)
  check_cxx_compiler_flag("-mavx512f -mavx512bw -mavx512vl -mavx512vnni" BFC_CXX_HAS_AVX512VNNI)
  if(BFC_CXX_HAS_AVX512VNNI)
    target_sources(bfc_ks_kernels PRIVATE "${CMAKE_CURRENT_LIST_DIR}/kernels/ks_layers_avx512.cc"
      "${CMAKE_CURRENT_LIST_DIR}/kernels/lowbit_avx512.cc")
    set_source_files_properties("${CMAKE_CURRENT_LIST_DIR}/kernels/ks_layers_avx512.cc"
      "${CMAKE_CURRENT_LIST_DIR}/kernels/lowbit_avx512.cc"
      PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni")
    target_compile_definitions(bfc_ks_kernels PUBLIC BFC_HAVE_AVX512=1)
    # fp8 factors by AVX512_BF16 dot products (BFC_KS_ISA=avx512bf16, the default where the CPU has it)
    check_cxx_compiler_flag("-mavx512f -mavx512bw -mavx512vl -mavx512bf16" BFC_CXX_HAS_AVX512BF16)
    if(BFC_CXX_HAS_AVX512BF16)
      target_sources(bfc_ks_kernels PRIVATE "${CMAKE_CURRENT_LIST_DIR}/kernels/ks_layers_avx512bf16.cc")
      set_source_files_properties("${CMAKE_CURRENT_LIST_DIR}/kernels/ks_layers_avx512bf16.cc"
        PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512bf16")
      target_compile_definitions(bfc_ks_kernels PUBLIC BFC_HAVE_AVX512BF16=1)
    endif()
  endif()
endif()

# one file per op (ort/*_op.cc) and the shared adapter code and registration (ort/op_common.cc)
add_library(bfc_ops MODULE
  "${CMAKE_CURRENT_LIST_DIR}/ort/op_common.cc"
  "${CMAKE_CURRENT_LIST_DIR}/ort/ks_matmul_op.cc"
  "${CMAKE_CURRENT_LIST_DIR}/ort/lowbit_matmul_op.cc"
  "${CMAKE_CURRENT_LIST_DIR}/ort/rotate_quantize_op.cc")
target_link_libraries(bfc_ops PRIVATE bfc_ks_kernels)
set_target_properties(bfc_ops PROPERTIES
  PREFIX "lib"
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON
  POSITION_INDEPENDENT_CODE ON)
if(BFC_ORT_INCLUDE_DIR)
  target_include_directories(bfc_ops PRIVATE "${BFC_ORT_INCLUDE_DIR}")
  target_compile_definitions(bfc_ops PRIVATE BFC_ORT_INCLUDE_DIR_SET=1)
endif()

foreach(_t bfc_ks_kernels bfc_ops)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    # -ffp-contract=off: no FMA contraction, so float epilogues round as the numpy references
    target_compile_options(${_t} PRIVATE -O3 -Wall -Wextra -fno-math-errno -ffp-contract=off)
  elseif(MSVC)
    target_compile_options(${_t} PRIVATE /O2 /W3)
  endif()
endforeach()
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang" AND NOT APPLE)
  target_link_options(bfc_ops PRIVATE -Wl,--no-undefined)
endif()

install(TARGETS bfc_ops LIBRARY DESTINATION bfc RUNTIME DESTINATION bfc)

# Native tests of the ORT-free kernels (not part of the wheel):
#   cmake -S runtime_ops -B build/native-tests -DBFC_BUILD_TESTS=ON
#   cmake --build build/native-tests -j2 && ctest --test-dir build/native-tests --output-on-failure
if(BFC_BUILD_TESTS)
  enable_testing()
  add_executable(bfc_ks_tests "${CMAKE_CURRENT_LIST_DIR}/tests/test_ks_kernels.cc")
  target_link_libraries(bfc_ks_tests PRIVATE bfc_ks_kernels)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(bfc_ks_tests PRIVATE -O2 -Wall -Wextra)
  endif()
  add_test(NAME bfc_ks_kernels COMMAND bfc_ks_tests)
endif()
