// The process-wide state of the CUDA backend: the device, the stream every op is queued on, the
// cuBLAS handle, and a small scratch buffer for reductions that return a value to the host.
//
//   if (!moca::cuda::available()) return run<Cpu>(cfg);   // never throws, even without a driver
//   auto& ctx = moca::cuda::Context::get();              // created on first use
//   ...                                                   // ops queue work on ctx.stream()
//   ctx.synchronize();                                    // wait for it (e.g. to time a step)
//
// Stream: by default the legacy default stream (stream 0). It orders itself with every other
// blocking stream, so code that mixes moca ops with its own CUDA calls needs no extra
// synchronisation. set_stream() moves all later work (kernels, cuBLAS, copies) to another stream;
// call it while no other thread is running ops. Copies to the host synchronise the stream, so host
// data is ready when moca::copy or Tensor::to returns; copies from the host are staged in pinned
// memory and queued like kernels (upload()), so the host's source may be reused at once and the
// device's queue is not emptied.
//
// Host waits: every place where the host waits for the device counts in host_waits() and
// host_wait_seconds(), so tests and benchmarks can say how often a training step empties the
// device's queue, and how much of the step's wall time is the host's own work.
//
// Device: the device current when the context is first created (device 0 unless the program
// called cudaSetDevice before its first CUDA op). One device per process for now.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <utility>

#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/host_waits.hpp"
#include "moca/backend/cuda/staging.hpp"
#include "moca/core/check.hpp"

namespace moca::cuda {

/// Number of CUDA devices this process can use: 0 when there is no GPU, no driver, or the driver
/// is too old for the runtime. Never throws.
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave the failure behind as the thread's last error
    return 0;
  }
  return n;
}

/// True when at least one CUDA device can be used. Never throws.
inline bool available() noexcept { return device_count() > 0; }

/// How float GEMMs compute. Double GEMMs always compute in fp64.
enum class FloatMatmul {
  Fp32,  ///< full fp32: results match the CPU backend
  Tf32,  ///< tensor cores, inputs rounded to TF32 (10-bit mantissa), fp32 accumulation
  /// Single GEMMs (the Linears) with inputs rounded to bf16 (8-bit mantissa) and fp32
  /// accumulation and output, as autocast does; batched GEMMs (attention) in TF32.
  Bf16,
};

/// "fp32", "tf32" or "bf16".
inline const char* to_string(FloatMatmul mode) noexcept {
  switch (mode) {
    case FloatMatmul::Tf32: return "tf32";
    case FloatMatmul::Bf16: return "bf16";
    default: return "fp32";
  }
}

/// The mode named `name` ("fp32", "tf32", "bf16"); throws moca::Error naming `what` otherwise.
inline FloatMatmul parse_float_matmul(const std::string& name, const char* what) {
  for (FloatMatmul m : {FloatMatmul::Fp32, FloatMatmul::Tf32, FloatMatmul::Bf16})
    if (name == to_string(m)) return m;
  MOCA_CHECK(false, what, " must be fp32, tf32 or bf16, got '", name, "'");
  return FloatMatmul::Fp32;
}

/// The backend's stream, cuBLAS handle and scratch memory (one per process).
class Context {
 public:
  /// The context, created on first use (thread-safe). Throws moca::Error when no device is
  /// available or the runtime cannot be initialised; the next call then tries again.
  static Context& get() {
    // Deliberately never destroyed: at exit the CUDA runtime may be unloaded before static
    // destructors run, and destroying the cuBLAS handle then fails or crashes.
    static Context* const instance = new Context();
    return *instance;
  }

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  /// The device the context was created on.
  int device() const noexcept { return device_; }

  /// The stream every op is queued on.
  cudaStream_t stream() const noexcept { return stream_.load(std::memory_order_acquire); }

  /// Queues all later work on `s` (which the caller owns and keeps alive). Not meant to be called
  /// while other threads are running ops.
  void set_stream(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mutex_);
    MOCA_CUBLAS_CHECK(cublasSetStream(cublas_, s));
    stream_.store(s, std::memory_order_release);
  }

  /// The cuBLAS handle, bound to stream(). Default math mode: float GEMMs compute in full fp32
  /// (no TF32), so results match the CPU backend; in every mode split-K partial sums are added in
  /// fp32, never in a bf16 output's precision (math_mode).
  cublasHandle_t cublas() const noexcept { return cublas_; }

  /// How float matrix products compute (see FloatMatmul); fp32 by default, as PyTorch's
  /// matmuls are. Not meant to be called while ops are running.
  void set_float_matmul(FloatMatmul mode) {
    std::lock_guard<std::mutex> lock(mutex_);
    MOCA_CUBLAS_CHECK(cublasSetMathMode(cublas_, math_mode(mode)));
    float_matmul_ = mode;
  }
  FloatMatmul float_matmul() const noexcept { return float_matmul_; }

  /// The fused attention's tile (query rows per block): 0, the default, lets each launch take
  /// the largest that fits its shared-memory target; 16, 32 or 64 fixes it (tests of every tile
  /// on the device, and timing one against another). Not meant to be called while ops are running.
  void set_flash_tile(int tile) {
    MOCA_CHECK(tile == 0 || tile == 16 || tile == 32 || tile == 64,
               "flash attention tile must be 0 (automatic), 16, 32 or 64, got ", tile);
    flash_tile_ = tile;
  }
  int flash_tile() const noexcept { return flash_tile_; }

  /// Threads per block of the fused attention: 128 (four warps, the default; 0 restores it) or
  /// 256 (eight warps on the same shared memory, more of them to hide its latency).
  void set_flash_threads(int threads) {
    MOCA_CHECK(threads == 0 || threads == 128 || threads == 256,
               "flash attention threads must be 0 (the default, 128), 128 or 256, got ", threads);
    flash_threads_ = threads == 0 ? 128 : threads;
  }
  int flash_threads() const noexcept { return flash_threads_; }

  /// Whether bf16 heads of up to 64 features (a multiple of 8) run on the register-fragment
  /// kernels (kernels/flash_mma.cuh), the default, or on the block programs that the float heads
  /// use (kernels/flash_attention.hpp). A fixed tile or eight warps (above) are settings of the
  /// block programs, so either one also selects them. Not meant to be called while ops are
  /// running.
  void set_flash_mma(bool on) noexcept { flash_mma_ = on; }
  bool flash_mma() const noexcept { return flash_mma_; }
  /// Launches of the register-fragment attention kernels so far (each pass counts one): which
  /// kernels a step ran, for tests and benchmarks.
  std::uint64_t flash_mma_launches() const noexcept {
    return flash_mma_launches_.load(std::memory_order_relaxed);
  }
  void count_flash_mma_launch() noexcept {
    flash_mma_launches_.fetch_add(1, std::memory_order_relaxed);
  }

  /// Whether column sums of rows that split into 16-byte chunks (bias and LayerNorm parameter
  /// gradients) run on the chunked kernels of kernels/column_sums.cuh, the default, or on the
  /// element-by-element ones every other matrix takes (to time one against the other). Not meant
  /// to be called while ops are running.
  void set_column_chunks(bool on) noexcept { column_chunks_ = on; }
  bool column_chunks() const noexcept { return column_chunks_; }

  /// Whether a bf16 Linear's bias gradient comes from its weight-gradient product (cuBLASLt's
  /// BGRADB epilogue sums the output gradient's rows as the product reads them) instead of a
  /// second pass over the output gradient (the column sums). Off by default: cuBLASLt's order of
  /// that sum is its own. Not meant to be called while ops are running.
  void set_fused_bias_grads(bool on) noexcept { fused_bias_grads_ = on; }
  /// Whether a Linear that ends a residual branch (a block's second MLP product) adds the
  /// residual as its product is stored, reading it as cuBLASLt's C operand (the default), or
  /// writes the branch and adds the residual in a second pass (to time one against the other).
  /// Not meant to be called while ops are running.
  void set_fused_residual(bool on) noexcept { fused_residual_ = on; }
  bool fused_residual() const noexcept { return fused_residual_; }
  bool fused_bias_grads() const noexcept { return fused_bias_grads_; }
  /// Bias gradients taken from a product's epilogue so far (cuBLASLt may decline a problem,
  /// which then takes the column sums): for tests and benchmarks.
  std::uint64_t fused_bias_grad_runs() const noexcept {
    return fused_bias_grad_runs_.load(std::memory_order_relaxed);
  }
  void count_fused_bias_grad() noexcept {
    fused_bias_grad_runs_.fetch_add(1, std::memory_order_relaxed);
  }

  /// How many of cuBLASLt's candidate algorithms a product's plan times on its first call,
  /// keeping the fastest (lt_matmul.hpp); 0 or 1, the default, takes the heuristic's first
  /// choice untimed, the same on every run. Tuning also sends bf16 products without a bias
  /// through cuBLASLt. Applies to problems planned after it is set; not meant to be called while
  /// ops are running.
  void set_gemm_tuning(int candidates) {
    MOCA_CHECK(candidates >= 0 && candidates <= 16,
               "GEMM tuning takes 0 to 16 candidate algorithms, got ", candidates);
    gemm_tuning_ = candidates;
  }
  int gemm_tuning() const noexcept { return gemm_tuning_; }

  /// The stream-ordered pool that device tensors come from (see memory.hpp), or nullptr on a
  /// device or platform without memory pools, where tensors use plain cudaMalloc.
  cudaMemPool_t memory_pool() const noexcept { return pool_; }

  /// Shared memory one block may use with the kernel's opt-in (cudaFuncSetAttribute), in bytes.
  std::size_t max_shared_per_block() const noexcept { return max_shared_per_block_; }

  /// Blocks until all work queued on stream() has finished; throws if any of it failed.
  void synchronize() { wait_for_stream(); }

  /// synchronize(), as the backend's own code calls it: a copy to the host, a value returned by
  /// a reduction.
  void wait_for_stream() {
    host_wait([&] { MOCA_CUDA_CHECK(cudaStreamSynchronize(stream())); });
  }

  /// Number of times the host has waited for the device so far (stream synchronisations, copies
  /// to the host, staging buffers still in use, timed candidates), and the seconds it spent in
  /// those waits: each one empties the device's queue until the host launches work again.
  std::uint64_t host_waits() const noexcept { return host_waits_.count(); }
  double host_wait_seconds() const noexcept { return host_waits_.seconds(); }
  /// Runs `blocking`, a call that blocks the host until the device has done something, counted
  /// and timed in host_waits() and host_wait_seconds().
  template <class F>
  void host_wait(F&& blocking) {
    host_waits_.wait(std::forward<F>(blocking));
  }

  /// Uploads larger than this (weights loaded at start, not a step's inputs) wait for the stream
  /// instead of taking a staging block: pinned memory is kept small.
  static constexpr std::size_t kMaxStagedUpload = std::size_t{64} << 20;

  /// Copies `bytes` of host memory to device memory `dst`, queued on stream() without waiting:
  /// the bytes go through a pinned staging block first (StagingBlocks: at most 256 MiB of
  /// blocks), so `src` may be reused when this returns. With staged uploads off, or above
  /// kMaxStagedUpload, the copy waits for the stream instead, as every host copy once did
  /// (set_staged_uploads, to time one against the other).
  void upload(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    if (!staged_uploads_ || bytes > kMaxStagedUpload) {
      MOCA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream()));
      wait_for_stream();
      return;
    }
    std::lock_guard<std::mutex> lock(staging_mutex_);
    StagingBlock<CudaStaging::Event>& block = staging_.acquire(bytes);
    std::memcpy(block.data, src, bytes);
    MOCA_CUDA_CHECK(cudaMemcpyAsync(dst, block.data, bytes, cudaMemcpyHostToDevice, stream()));
    staging_.queued(block);
  }
  void set_staged_uploads(bool on) noexcept { staged_uploads_ = on; }
  bool staged_uploads() const noexcept { return staged_uploads_; }
  /// The staging blocks' counters: blocks held, pinned allocations, waits for a block in use.
  StagingStats staging_stats() {
    std::lock_guard<std::mutex> lock(staging_mutex_);
    return staging_.stats();
  }

  /// A device buffer of at least `bytes` that kernels queued on stream() use to hand partial
  /// results to the next kernel (the column reductions). Stream order keeps successive users
  /// apart, so it needs no lock and no synchronisation, as long as every op is queued from one
  /// host thread. It only grows (cudaFree waits for the device first); the first training step
  /// sizes it.
  void* workspace(std::size_t bytes) {
    return grow(workspace_, workspace_bytes_, bytes, "the workspace");
  }

  /// The lock a user of scratch() holds until the stream has finished with the buffer.
  std::mutex& scratch_mutex() noexcept { return scratch_mutex_; }

  /// A device buffer of at least `bytes`, reused across calls (it only grows). The caller must
  /// hold scratch_mutex() and must synchronise the stream before releasing it.
  void* scratch(std::size_t bytes) { return grow(scratch_, scratch_bytes_, bytes, "the scratch"); }

  /// Waits for the stream, then hands the pool's cached (unused) blocks back to the driver.
  void trim_memory_pool() {
    if (pool_ == nullptr) return;
    wait_for_stream();
    MOCA_CUDA_CHECK(cudaMemPoolTrimTo(pool_, 0));
  }

  /// cudaMalloc for the backend's own long-lived buffers (`what` names one in errors). The pool
  /// keeps every block tensors free, so when the device seems full it is trimmed and the
  /// allocation tried again, as tensor allocations do.
  void* device_malloc(std::size_t bytes, const char* what) {
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err == cudaErrorMemoryAllocation && pool_ != nullptr) {
      (void)cudaGetLastError();
      trim_memory_pool();
      err = cudaMalloc(&p, bytes);
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      ::moca::detail::throw_check_failure(
          __FILE__, __LINE__, "cudaMalloc", "CUDA backend: ", "allocating ", bytes, " bytes for ",
          what, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
    }
    return p;
  }

 private:
  // Replaces `buffer` (`size` bytes) by one of `bytes` when it is smaller; never shrinks.
  void* grow(void*& buffer, std::size_t& size, std::size_t bytes, const char* what) {
    if (bytes > size) {
      if (buffer != nullptr) MOCA_CUDA_CHECK(cudaFree(buffer));
      buffer = nullptr;
      size = 0;
      buffer = device_malloc(bytes, what);
      size = bytes;
    }
    return buffer;
  }

  Context() {
    MOCA_CHECK(device_count() > 0,
               "CUDA backend: no CUDA device is available (no GPU, or no usable driver); check "
               "moca::cuda::available() before using Cuda tensors");
    MOCA_CUDA_CHECK(cudaGetDevice(&device_));
    int shared = 0;
    MOCA_CUDA_CHECK(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    max_shared_per_block_ = static_cast<std::size_t>(shared);
    MOCA_CUBLAS_CHECK(cublasCreate(&cublas_));
    const cublasStatus_t status = cublasSetStream(cublas_, stream_.load());
    if (status != CUBLAS_STATUS_SUCCESS) {
      (void)cublasDestroy(cublas_);
      MOCA_CUBLAS_CHECK(status);
    }
    try {
      MOCA_CUBLAS_CHECK(cublasSetMathMode(cublas_, math_mode(float_matmul_)));
      pool_ = create_memory_pool(device_);
    } catch (...) {
      (void)cublasDestroy(cublas_);
      throw;
    }
  }

  // The cuBLAS math mode of a float-matmul mode. Reduced-precision reductions are disallowed:
  // with bf16 outputs cuBLAS may otherwise add split-K partial sums in bf16, rounding a product
  // several times where one fp32 accumulation rounds it once.
  static cublasMath_t math_mode(FloatMatmul mode) {
    const int base = mode == FloatMatmul::Fp32 ? CUBLAS_DEFAULT_MATH : CUBLAS_TF32_TENSOR_OP_MATH;
    return static_cast<cublasMath_t>(base | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  }

  // A pool of this device's memory that keeps what is freed (release threshold: unlimited), so
  // freeing and allocating again costs no call into the driver's page mapping and no device-wide
  // synchronisation, unlike cudaFree. nullptr where memory pools are not supported.
  static cudaMemPool_t create_memory_pool(int device) {
    int supported = 0;
    if (cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    if (supported == 0) return nullptr;
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    MOCA_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
    MOCA_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return pool;
  }

  int device_ = 0;
  std::size_t max_shared_per_block_ = 0;
  cudaMemPool_t pool_ = nullptr;
  std::atomic<cudaStream_t> stream_{nullptr};  // nullptr: the legacy default stream
  cublasHandle_t cublas_ = nullptr;
  std::mutex mutex_;
  std::mutex scratch_mutex_;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
  FloatMatmul float_matmul_ = FloatMatmul::Fp32;
  int flash_tile_ = 0;
  int flash_threads_ = 128;
  bool flash_mma_ = true;
  int gemm_tuning_ = 0;
  bool column_chunks_ = true;
  bool fused_bias_grads_ = false;
  bool fused_residual_ = true;
  std::atomic<std::uint64_t> flash_mma_launches_{0};
  HostWaitCounter host_waits_;
  std::atomic<std::uint64_t> fused_bias_grad_runs_{0};
  bool staged_uploads_ = true;
  std::mutex staging_mutex_;
  StagingBlocks<CudaStaging> staging_{CudaStaging{&stream_, &host_waits_}};
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
};

/// Shorthands for Context::get().stream() and Context::get().synchronize().
inline cudaStream_t stream() { return Context::get().stream(); }
inline void synchronize() { Context::get().synchronize(); }

}  // namespace moca::cuda
