// Matrix products with a fused epilogue, on cuBLASLt: a Linear's bias is added as the product is
// stored, instead of in a second pass over the output.
//
//   LtMatmul::get().run(problem, alpha, A, B, beta, C, bias)   // false: no algorithm, compose
//
// cuBLASLt separates the description of a product (a descriptor, one layout per operand, and an
// algorithm chosen by its heuristic) from its execution. Choosing costs far more than running, so
// the plan of each problem seen (types, transposes, sizes, leading dimensions, alignments,
// epilogue) is kept and later calls with the same problem only run it. A training step repeats
// a few dozen problems, so the plans are built during the first step.
//
// The plan's algorithm is the heuristic's first choice, unless Context::gemm_tuning() asks for
// more: then up to that many of the heuristic's candidates are timed on the problem's own
// operands when it is first planned (the output going to a scratch buffer, so C is neither
// changed nor accumulated twice) and the fastest is kept. A tuned choice can differ from one
// process to the next with the timings, and with it the rounding of the products; untuned plans
// are the same on every run.
//
// Operands are column-major here, as cuBLASLt sees them; backend.hpp maps row-major products
// onto them exactly as for cuBLAS.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/context.hpp"

namespace moca::cuda {

/// One column-major product D[m, n] = alpha · op_a(A) · op_b(B) + beta · C (C and D of one type
/// and layout, at one address or two), with an optional epilogue.
struct LtProblem {
  cudaDataType_t in_type;      ///< of A and B
  cudaDataType_t out_type;     ///< of C, D and the bias
  cublasComputeType_t compute;
  cudaDataType_t scale_type;   ///< of alpha and beta
  cublasOperation_t op_a, op_b;
  std::int64_t m, n, k, lda, ldb, ldc;
  std::uint32_t align_a, align_b, align_c;  ///< of the pointers (C's: the lesser of C's and D's),
                                            ///< in bytes (a power of two ≤ 256)
  cublasLtEpilogue_t epilogue;              ///< CUBLASLT_EPILOGUE_DEFAULT, _BIAS or _BGRADB

  auto operator<=>(const LtProblem&) const = default;
};

/// The largest power of two ≤ 256 that divides the address (256 for nullptr).
inline std::uint32_t pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

/// The cuBLASLt handle, its workspace and the plans; one per process, created on first use and
/// never destroyed (like Context: the runtime may be gone before static destructors run).
class LtMatmul {
 public:
  static LtMatmul& get() {
    static LtMatmul* const instance = new LtMatmul();
    return *instance;
  }

  LtMatmul(const LtMatmul&) = delete;
  LtMatmul& operator=(const LtMatmul&) = delete;

  /// Queues the product on the backend's stream. `bias` ([m], out_type) is read with the BIAS
  /// epilogue; with BGRADB it is written: [n], the sums of op_b(B) over k (a Linear's bias
  /// gradient, from the pass over its output gradient that the weight gradient makes). Returns
  /// false, having queued nothing, when cuBLASLt offers no algorithm for the problem or declines
  /// to run the one it offered (the caller then composes the product from other calls).
  /// `D`, when given, receives the result instead of C, which is then only read (beta · C: a
  /// residual added as the product is stored).
  bool run(const LtProblem& p, const void* alpha, const void* A, const void* B, const void* beta,
           void* C, const void* bias = nullptr, void* D = nullptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    const Operands operands{alpha, A, B, beta, C, bias};
    Plan& plan = plan_for(p, operands);
    if (!plan.found) return false;
    const cublasStatus_t status = enqueue(plan, p, operands, plan.algo, D != nullptr ? D : C);
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) {
      plan.found = false;  // not asked again for this problem
      return false;
    }
    MOCA_CUBLAS_CHECK(status);
    return true;
  }

  /// Number of problems planned so far (for tests: a repeated problem adds none).
  std::size_t plans() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return plans_.size();
  }

  /// Problems whose plan was tuned (Context::gemm_tuning), and of those, the ones where a
  /// candidate other than the heuristic's first was the fastest.
  std::size_t tuned_plans() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return tuned_;
  }
  std::size_t retuned_plans() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return retuned_;
  }

 private:
  // cuBLAS's recommendation for Hopper; kernels that need more are not offered.
  static constexpr std::size_t kWorkspaceBytes = std::size_t{32} << 20;
  // The most candidates a tuned plan times, and the timed runs of each.
  static constexpr int kMaxCandidates = 16;
  static constexpr int kTimedRuns = 3;

  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool found = false;

    Plan() = default;
    Plan(const Plan&) = delete;
    Plan& operator=(const Plan&) = delete;
    ~Plan() {
      if (c != nullptr) (void)cublasLtMatrixLayoutDestroy(c);
      if (b != nullptr) (void)cublasLtMatrixLayoutDestroy(b);
      if (a != nullptr) (void)cublasLtMatrixLayoutDestroy(a);
      if (desc != nullptr) (void)cublasLtMatmulDescDestroy(desc);
    }
  };

  // What one call multiplies (the plan is built from the problem, tuned on these).
  struct Operands {
    const void *alpha, *A, *B, *beta;
    void* C;
    const void* bias;
  };

  // Epilogues that read or write the vector at CUBLASLT_MATMUL_DESC_BIAS_POINTER.
  static bool uses_bias(cublasLtEpilogue_t e) {
    return e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_BGRADB;
  }

  // Queues D = alpha · op(A) · op(B) + beta · C with `algo`, D at `D` (C itself, or a scratch
  // buffer while tuning); returns cuBLASLt's status.
  cublasStatus_t enqueue(Plan& plan, const LtProblem& p, const Operands& o,
                         const cublasLtMatmulAlgo_t& algo, void* D) {
    if (uses_bias(p.epilogue)) {
      MOCA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                       &o.bias, sizeof(o.bias)));
    }
    return cublasLtMatmul(handle_, plan.desc, o.alpha, o.A, plan.a, o.B, plan.b, o.beta, o.C,
                          plan.c, D, plan.c, &algo, workspace_, kWorkspaceBytes,
                          Context::get().stream());
  }

  // Owns a preference descriptor for the length of one heuristic query.
  struct Preference {
    cublasLtMatmulPreference_t pref = nullptr;
    Preference() { MOCA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref)); }
    ~Preference() { (void)cublasLtMatmulPreferenceDestroy(pref); }
    Preference(const Preference&) = delete;
    Preference& operator=(const Preference&) = delete;
    template <class V>
    void set(cublasLtMatmulPreferenceAttributes_t attr, V value) {
      MOCA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
    }
  };

  LtMatmul() {
    Context::get();  // a clear error when there is no device
    MOCA_CUBLAS_CHECK(cublasLtCreate(&handle_));
    try {
      workspace_ = Context::get().device_malloc(kWorkspaceBytes, "cuBLASLt's workspace");
    } catch (...) {
      (void)cublasLtDestroy(handle_);
      throw;
    }
  }

  // Column-major layout of a stored operand: op == N stores [rows, cols], op == T [cols, rows].
  static cublasLtMatrixLayout_t layout(cudaDataType_t type, cublasOperation_t op,
                                       std::int64_t rows, std::int64_t cols, std::int64_t ld) {
    cublasLtMatrixLayout_t l = nullptr;
    const bool t = op != CUBLAS_OP_N;
    MOCA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, static_cast<std::uint64_t>(t ? cols : rows),
                                                 static_cast<std::uint64_t>(t ? rows : cols), ld));
    return l;
  }

  Plan& plan_for(const LtProblem& p, const Operands& o) {
    if (auto it = plans_.find(p); it != plans_.end()) return it->second;
    const auto it = plans_.try_emplace(p).first;
    try {
      build(p, o, it->second);
    } catch (...) {
      plans_.erase(it);  // a plan that failed to build is not kept: the next call tries again
      throw;
    }
    return it->second;
  }

  void build(const LtProblem& p, const Operands& o, Plan& plan) {
    MOCA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, p.compute, p.scale_type));
    MOCA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                     &p.op_a, sizeof(p.op_a)));
    MOCA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                     &p.op_b, sizeof(p.op_b)));
    MOCA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                     &p.epilogue, sizeof(p.epilogue)));
    if (uses_bias(p.epilogue)) {
      MOCA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
          plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &p.out_type, sizeof(p.out_type)));
    }
    plan.a = layout(p.in_type, p.op_a, p.m, p.k, p.lda);
    plan.b = layout(p.in_type, p.op_b, p.k, p.n, p.ldb);
    plan.c = layout(p.out_type, CUBLAS_OP_N, p.m, p.n, p.ldc);

    Preference pref;
    pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<std::uint64_t>(kWorkspaceBytes));
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.align_a);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.align_b);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.align_c);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.align_c);
    // Split-K partial sums in fp32 only: the in-place and output-type schemes add them in the
    // output's type, which for bf16 outputs rounds a product several times.
    if (p.out_type != CUDA_R_32F && p.out_type != CUDA_R_64F) {
      pref.set(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
               static_cast<std::uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));
    }
    const int wanted = std::clamp(Context::get().gemm_tuning(), 1, kMaxCandidates);
    std::array<cublasLtMatmulHeuristicResult_t, kMaxCandidates> results{};
    int count = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle_, plan.desc, plan.a, plan.b, plan.c, plan.c,
                                       pref.pref, wanted, results.data(), &count);
    // NOT_SUPPORTED: no algorithm for this problem, which the caller handles; anything else is
    // an error.
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) MOCA_CUBLAS_CHECK(status);
    plan.found =
        status == CUBLAS_STATUS_SUCCESS && count > 0 && results[0].state == CUBLAS_STATUS_SUCCESS;
    if (!plan.found) return;
    plan.algo = results[0].algo;
    if (count > 1) tune(p, o, plan, results.data(), count);
  }

  // Times the candidates (the heuristic's order) on the call's operands and keeps the fastest:
  // the median of kTimedRuns runs after one to warm up, each writing a scratch copy of D.
  void tune(const LtProblem& p, const Operands& o, Plan& plan,
            const cublasLtMatmulHeuristicResult_t* results, int count) {
    Context& ctx = Context::get();
    const std::size_t element = p.out_type == CUDA_R_64F ? 8 : p.out_type == CUDA_R_32F ? 4 : 2;
    const std::size_t bytes =
        element * static_cast<std::size_t>(p.ldc) * static_cast<std::size_t>(p.n);
    ctx.synchronize();  // the operands are ready, and the timings are the candidates' own
    void* scratch = ctx.device_malloc(bytes, "a product's tuning output");
    cudaEvent_t start = nullptr, stop = nullptr;
    int best = 0;
    float best_ms = 0;
    bool timed = false;
    try {
      MOCA_CUDA_CHECK(cudaEventCreate(&start));
      MOCA_CUDA_CHECK(cudaEventCreate(&stop));
      for (int i = 0; i < count; ++i) {
        if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
        std::array<float, kTimedRuns> ms{};
        bool ran = true;
        for (int run = 0; run <= kTimedRuns && ran; ++run) {
          MOCA_CUDA_CHECK(cudaEventRecord(start, ctx.stream()));
          // A candidate the library declines to run is skipped, not an error.
          ran = enqueue(plan, p, o, results[i].algo, scratch) == CUBLAS_STATUS_SUCCESS;
          MOCA_CUDA_CHECK(cudaEventRecord(stop, ctx.stream()));
          ctx.host_wait([&] { MOCA_CUDA_CHECK(cudaEventSynchronize(stop)); });
          if (run > 0) MOCA_CUDA_CHECK(cudaEventElapsedTime(&ms[run - 1], start, stop));
        }
        if (!ran) continue;
        std::sort(ms.begin(), ms.end());
        const float median = ms[kTimedRuns / 2];
        if (!timed || median < best_ms) {
          best = i;
          best_ms = median;
          timed = true;
        }
      }
    } catch (...) {
      if (start != nullptr) (void)cudaEventDestroy(start);
      if (stop != nullptr) (void)cudaEventDestroy(stop);
      (void)cudaFree(scratch);
      throw;
    }
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
    MOCA_CUDA_CHECK(cudaFree(scratch));  // waits for the device
    plan.algo = results[best].algo;
    ++tuned_;
    if (best != 0) ++retuned_;
  }

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  mutable std::mutex mutex_;
  std::map<LtProblem, Plan> plans_;
  std::size_t tuned_ = 0, retuned_ = 0;
};

}  // namespace moca::cuda
