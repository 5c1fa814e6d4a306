// Compiled with AVX-512 switched off (tests/CMakeLists.txt): the ymm build of the packed GEMM
// and of the attention head's register tiles.
#define MOCA_GEMM_TARGETS_DEFINE
#include "gemm_targets.hpp"

#ifdef __AVX512F__
#error "gemm_targets_ymm.cpp must be compiled without AVX-512"
#endif

bool moca::test::gemm_ymm(const GemmCall& call) { return run_packed_gemm(call); }
bool moca::test::head_ymm(const HeadCall& call) { return run_head(call); }
