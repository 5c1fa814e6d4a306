// The fused attention on the GPU: the block programs of flash_attention.hpp as three kernels
// (forward; backward dq pass, which also writes δ; backward dk/dv pass), one block of
// kFlashThreads threads (or the Context's choice of 256) per (tile, head, image).
//
// Tile products run on plain FMAs (SimtMma) for double and for float in fp32 mode, so results
// match the CPU to float rounding; in tf32 and bf16 modes float heads' products run on the
// tensor cores with TF32 operands from their fp32 tiles (WmmaTf32 below).
//
// bf16 heads of up to 64 features run on the register-fragment kernels of flash_mma.cuh (scores
// and accumulators in registers, mma.sync); other bf16 heads, or all of them when the Context
// asks for the block programs, run these on the tensor cores' bf16 products (WmmaBf16: m16n16k16,
// float accumulation, twice TF32's rate and half its operand bytes): q, k, v and do are copied into
// shared memory as they are, p and dS are rounded to bf16 copies for the products that read them,
// and the scores, softmax and accumulators are float (flash_attention.hpp). lse and δ are float;
// the op set hands them over as the bf16 buffer ops/attention.hpp sizes for them
// (attention_saved_shape: twice the elements), reinterpreted here.
#pragma once

#include <cuda_bf16.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "moca/backend/cuda/kernels/common.cuh"
#include "moca/backend/cuda/kernels/flash_attention.hpp"
#include "moca/backend/cuda/kernels/flash_mma.cuh"

namespace moca::cuda {
namespace kernels {

/// The flash programs' execution context on a CUDA block: a row group is a warp (blocks are
/// whole warps), reduced with shuffles.
struct BlockExec {
  __device__ int tid() const { return static_cast<int>(threadIdx.x); }
  __device__ int threads() const { return static_cast<int>(blockDim.x); }
  __device__ int group() const { return static_cast<int>(threadIdx.x) / 32; }
  __device__ int groups() const { return static_cast<int>(blockDim.x) / 32; }
  __device__ int lane() const { return static_cast<int>(threadIdx.x) % 32; }
  __device__ int lanes() const { return 32; }
  template <class T>
  __device__ T group_max(T v) const {
    return warp_reduce(v, MaxOp{});
  }
  template <class T>
  __device__ T group_sum(T v) const {
    return warp_reduce(v, SumOp{});
  }
  __device__ void group_sync() const { __syncwarp(); }
  __device__ void sync() const { __syncthreads(); }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
/// What the tensor-core fragment policies share: the fp32 accumulator of a 16×16 output
/// fragment (K deep), zeroed, multiplied into, and stored to an fp32 tile in shared memory.
template <int K>
struct WmmaFloatAcc {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, K, float>;
  static __device__ void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  template <class FA, class FB>
  static __device__ void mma(Acc& c, const FA& a, const FB& b) {
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  static __device__ void store(Acc& acc, float* c, int ldc, float alpha, bool accumulate) {
    if (accumulate) {
      // Both fragments have the same (unspecified) element mapping, so element-wise is safe.
      Acc old;
      nvcuda::wmma::load_matrix_sync(old, c, ldc, nvcuda::wmma::mem_row_major);
      for (int e = 0; e < acc.num_elements; ++e) acc.x[e] = old.x[e] + alpha * acc.x[e];
    } else {
      for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= alpha;
    }
    nvcuda::wmma::store_matrix_sync(c, acc, ldc, nvcuda::wmma::mem_row_major);
  }
};

// Element (i, k) of op(A) is A[i·lda + k], or A[k·lda + i] when A is stored transposed
// (col_major with the same stride); likewise (k, j) of op(B).
template <bool T>
using WmmaLayout = std::conditional_t<T, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;

/// The fragments of flash::BlockedMma for float heads: wmma m16n16k8 with TF32 operands and fp32
/// accumulation, loaded from the fp32 tiles in shared memory (flash::Geometry lays them out with
/// 32-byte aligned fragments and strides a multiple of 4, as wmma loads need). sm_80 and later.
struct WmmaTf32 : WmmaFloatAcc<8> {
  static constexpr int kK = 8;
  template <bool AT>
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8,
                                       nvcuda::wmma::precision::tf32, WmmaLayout<AT>>;
  template <bool BT>
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8,
                                       nvcuda::wmma::precision::tf32, WmmaLayout<BT>>;
  template <bool AT>
  static __device__ void load_a(AFrag<AT>& a, const float* A, int lda, int i0, int k) {
    nvcuda::wmma::load_matrix_sync(a, AT ? A + k * lda + i0 : A + i0 * lda + k, lda);
    for (int e = 0; e < a.num_elements; ++e) a.x[e] = nvcuda::wmma::__float_to_tf32(a.x[e]);
  }
  template <bool BT>
  static __device__ void load_b(BFrag<BT>& b, const float* B, int ldb, int k, int j0) {
    nvcuda::wmma::load_matrix_sync(b, BT ? B + j0 * ldb + k : B + k * ldb + j0, ldb);
    for (int e = 0; e < b.num_elements; ++e) b.x[e] = nvcuda::wmma::__float_to_tf32(b.x[e]);
  }
};

/// The fragments of flash::BlockedMma for bf16 heads: wmma m16n16k16 with bf16 operands, loaded
/// as they are from the bf16 tiles in shared memory (strides a multiple of 8 elements, 32-byte
/// aligned fragments), and fp32 accumulation. sm_80 and later.
struct WmmaBf16 : WmmaFloatAcc<16> {
  static constexpr int kK = 16;
  template <bool AT>
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16,
                                       WmmaLayout<AT>>;
  template <bool BT>
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                                       WmmaLayout<BT>>;
  static __device__ const __nv_bfloat16* raw(const bf16* p) {
    return reinterpret_cast<const __nv_bfloat16*>(p);
  }
  template <bool AT>
  static __device__ void load_a(AFrag<AT>& a, const bf16* A, int lda, int i0, int k) {
    nvcuda::wmma::load_matrix_sync(a, raw(AT ? A + k * lda + i0 : A + i0 * lda + k), lda);
  }
  template <bool BT>
  static __device__ void load_b(BFrag<BT>& b, const bf16* B, int ldb, int k, int j0) {
    nvcuda::wmma::load_matrix_sync(b, raw(BT ? B + j0 * ldb + k : B + k * ldb + j0), ldb);
  }
};
#endif

/// Tile products on the tensor cores (flash::BlockedMma): bf16 fragments for bf16 operands, TF32
/// ones for float; before sm_80, plain FMAs.
struct TensorCoreMma {
  template <bool AT, bool BT, class Exec, class O>
  static __device__ void product(const Exec& ex, int M, int N, int K, float alpha, const O* A,
                                 int lda, const O* B, int ldb, float* C, int ldc,
                                 bool accumulate) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using F = std::conditional_t<std::is_same_v<O, bf16>, WmmaBf16, WmmaTf32>;
    flash::BlockedMma<F>::template product<AT, BT>(ex, M, N, K, alpha, A, lda, B, ldb, C, ldc,
                                                   accumulate);
#else
    flash::SimtMma::product<AT, BT>(ex, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
#endif
  }
};

/// Threads per block of the flash kernels: four warps, unless Context::set_flash_threads asks for
/// eight (the programs run on any whole number of warps).
inline constexpr int kFlashThreads = 128;
/// Shared memory a flash block aims to stay under, so that two blocks fit one SM of an
/// H100/H200 (228 KB): the largest tile within it is chosen.
inline constexpr std::size_t kFlashSharedTarget = 100 * 1024;

template <class Mma, int Threads, class T, class A = flash::flash_acc_t<T>>
__global__ void __launch_bounds__(Threads)
    flash_forward_kernel(flash::Geometry g, std::int64_t H, std::int64_t S, A scale, const T* qkv,
                         A* lse, T* ctx) {
  extern __shared__ __align__(128) unsigned char flash_smem[];
  flash::forward_block<Mma>(BlockExec{}, g, flash_smem, H, S, scale, qkv, lse, ctx, blockIdx.z,
                            blockIdx.y, blockIdx.x);
}

template <class Mma, int Threads, class T, class A = flash::flash_acc_t<T>>
__global__ void __launch_bounds__(Threads)
    flash_dq_kernel(flash::Geometry g, std::int64_t H, std::int64_t S, A scale, const T* qkv,
                    const A* lse, const T* ctx, const T* dctx, A* delta, T* dqkv) {
  extern __shared__ __align__(128) unsigned char flash_smem[];
  flash::dq_block<Mma>(BlockExec{}, g, flash_smem, H, S, scale, qkv, lse, ctx, dctx, delta, dqkv,
                       blockIdx.z, blockIdx.y, blockIdx.x);
}

template <class Mma, int Threads, class T, class A = flash::flash_acc_t<T>>
__global__ void __launch_bounds__(Threads)
    flash_dkdv_kernel(flash::Geometry g, std::int64_t H, std::int64_t S, A scale, const T* qkv,
                      const A* lse, const T* dctx, const A* delta, T* dqkv) {
  extern __shared__ __align__(128) unsigned char flash_smem[];
  flash::dkdv_block<Mma>(BlockExec{}, g, flash_smem, H, S, scale, qkv, lse, dctx, delta, dqkv,
                         blockIdx.z, blockIdx.y, blockIdx.x);
}

/// The tile Context::set_flash_tile fixed, or else the largest tile whose shared memory stays
/// within kFlashSharedTarget (and the device's limit); the smallest tile if none does but it
/// fits the device.
template <class T>
flash::Geometry flash_geometry(flash::Program p, std::int64_t hd) {
  MOCA_CHECK(hd >= 1 && hd <= flash::kMaxHeadDim, "attention (CUDA): head width ", hd,
             " is outside the fused kernels' range 1 … ", flash::kMaxHeadDim);
  const std::size_t device_limit = Context::get().max_shared_per_block();
  if (const int fixed = Context::get().flash_tile()) {
    const flash::Geometry g = flash::make_geometry<T>(fixed, static_cast<int>(hd));
    MOCA_CHECK(flash::shared_bytes(p, g) <= device_limit, "attention (CUDA): tile ",
               fixed, " at head width ", hd, " needs ", flash::shared_bytes(p, g),
               " bytes of shared memory per block; this device allows ", device_limit);
    return g;
  }
  const std::size_t limit = device_limit < kFlashSharedTarget ? device_limit : kFlashSharedTarget;
  for (const int tile : flash::kTiles) {
    const flash::Geometry g = flash::make_geometry<T>(tile, static_cast<int>(hd));
    if (flash::shared_bytes(p, g) <= limit) return g;
  }
  const flash::Geometry g = flash::make_geometry<T>(16, static_cast<int>(hd));
  MOCA_CHECK(flash::shared_bytes(p, g) <= device_limit, "attention (CUDA): head width ",
             hd, " needs ", flash::shared_bytes(p, g),
             " bytes of shared memory per block; this device allows ", device_limit);
  return g;
}

/// Lets `kernel` launch with `bytes` of dynamic shared memory. Above 48 KB a kernel must opt in
/// with an attribute of the kernel; the attribute is raised only when a launch needs more than
/// it allows, so repeated launches (every block of every step) make no host call. The library
/// drives one device, whose kernels these are.
inline void allow_dynamic_shared(const void* kernel, std::size_t bytes) {
  static std::mutex mutex;
  static std::unordered_map<const void*, std::size_t> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  std::size_t& current = allowed[kernel];  // 0 until set: the first launch always sets it
  if (bytes <= current && current != 0) return;
  MOCA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
  current = bytes;
}

/// Launches kernel over (tiles, H, B) blocks of `threads` with the shared memory of program p.
template <class Kernel, class... Args>
void launch_flash(Kernel kernel, int threads, const char* name, flash::Program p,
                  const flash::Geometry& g, std::int64_t B, std::int64_t H,
                  std::int64_t S, Args... args) {
  MOCA_CHECK(H <= 65535 && B <= 65535, "attention (CUDA): ", B, " images × ", H,
             " heads exceed the grid's 65535 per dimension");
  MOCA_CHECK((S + g.tile - 1) / g.tile <= 0x7fffffff, "attention (CUDA): ", S,
             " tokens exceed the grid's tiles");
  const std::size_t bytes = flash::shared_bytes(p, g);
  allow_dynamic_shared(reinterpret_cast<const void*>(kernel), bytes);
  const dim3 grid(static_cast<unsigned>((S + g.tile - 1) / g.tile), static_cast<unsigned>(H),
                  static_cast<unsigned>(B));
  kernel<<<grid, static_cast<unsigned>(threads), bytes, stream()>>>(g, H, S, args...);
  check_launch(name);
}

/// Products on the tensor cores for bf16 storage, and for float in the tf32 and bf16 modes;
/// exact otherwise.
template <class T>
bool flash_on_tensor_cores() {
  if constexpr (std::is_same_v<T, bf16>) return true;
  return std::is_same_v<T, float> && Context::get().float_matmul() != FloatMatmul::Fp32;
}

template <class Mma, int Threads, class T, class A = flash::flash_acc_t<T>>
void flash_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, A scale,
                   const T* qkv, A* lse, T* ctx) {
  const flash::Geometry g = flash_geometry<T>(flash::Program::Forward, hd);
  launch_flash(flash_forward_kernel<Mma, Threads, T>, Threads, "flash_forward_kernel",
               flash::Program::Forward, g, B, H, S, scale, qkv, lse, ctx);
}

template <class Mma, int Threads, class T, class A = flash::flash_acc_t<T>>
void flash_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, A scale,
                    const T* qkv, const A* lse, const T* ctx, const T* dctx, A* delta, T* dqkv) {
  // Stream order puts the dq pass (which writes δ) before the dk/dv pass (which reads it).
  const flash::Geometry gq = flash_geometry<T>(flash::Program::Dq, hd);
  launch_flash(flash_dq_kernel<Mma, Threads, T>, Threads, "flash_dq_kernel", flash::Program::Dq,
               gq, B, H, S, scale, qkv, lse, ctx, dctx, delta, dqkv);
  const flash::Geometry gk = flash_geometry<T>(flash::Program::Dkdv, hd);
  launch_flash(flash_dkdv_kernel<Mma, Threads, T>, Threads, "flash_dkdv_kernel",
               flash::Program::Dkdv, gk, B, H, S, scale, qkv, lse, dctx, delta, dqkv);
}

/// Runs f.template operator()<Mma, Threads>() with the block size the context asks for.
template <class Mma, class F>
void with_flash_threads(F&& f) {
  if (Context::get().flash_threads() == 256)
    f.template operator()<Mma, 256>();
  else
    f.template operator()<Mma, kFlashThreads>();
}

/// The lse / δ buffer of a T head as its arithmetic type (see the top: for bf16 the op set sizes
/// it in bf16 elements, two per float), which must then be aligned as that type: a view starting
/// at an odd bf16 element would fault on the device.
template <class T>
const flash::flash_acc_t<T>* row_terms(const T* p) {
  using A = flash::flash_acc_t<T>;
  MOCA_CHECK(reinterpret_cast<std::uintptr_t>(p) % alignof(A) == 0,
             "attention (CUDA): the saved log-sum-exp / δ buffer must be aligned to ", alignof(A),
             " bytes (a view starting at an odd element?)");
  return reinterpret_cast<const A*>(p);
}
template <class T>
flash::flash_acc_t<T>* row_terms(T* p) {
  return const_cast<flash::flash_acc_t<T>*>(row_terms(static_cast<const T*>(p)));
}

/// Whether the register-fragment kernels were built for sm_80 or later (they trap otherwise),
/// asked of the device once: both the virtual architecture their code was compiled from (a
/// build for older cards runs on a newer one from its PTX) and the machine code's.
inline bool flash_mma_built() {
  static const bool built = [] {
    cudaFuncAttributes a{};
    MOCA_CUDA_CHECK(
        cudaFuncGetAttributes(&a, reinterpret_cast<const void*>(flash_mma::forward_kernel<1>)));
    return a.ptxVersion >= 80 && a.binaryVersion >= 80;
  }();
  return built;
}

/// Whether bf16 heads of width hd over these buffers run on the register-fragment kernels: the
/// Context's choice, a head width they take, 16-byte aligned buffers (their copies move 16
/// bytes), token counts within int, a positive scale (their softmax takes the maximum of the raw
/// scores), and a build for sm_80 or later.
inline bool flash_mma_applies(std::int64_t hd, std::int64_t S, float scale,
                              std::initializer_list<const void*> buffers) {
  const Context& c = Context::get();
  if (!c.flash_mma() || c.flash_tile() != 0 || c.flash_threads() != kFlashThreads) return false;
  if (hd % 8 != 0 || hd > flash_mma::kMaxHeadDim || S > 0x7fffffff || !(scale > 0)) return false;
  for (const void* p : buffers)
    if (!aligned16(p)) return false;
  return flash_mma_built();
}

/// Runs f.template operator()<NK>() for heads of width hd (NK steps of 16 features).
template <class F>
void with_feature_steps(std::int64_t hd, F&& f) {
  switch ((hd + 15) / 16) {
    case 1:
      return f.template operator()<1>();
    case 2:
      return f.template operator()<2>();
    case 3:
      return f.template operator()<3>();
    default:
      return f.template operator()<4>();
  }
}

/// Launches a register-fragment kernel over (64-row tiles, H, B) blocks of four warps.
template <class Kernel, class... Args>
void launch_flash_mma(Kernel kernel, const char* name, int bytes, std::int64_t B, std::int64_t H,
                      std::int64_t S, Args... args) {
  MOCA_CHECK(H <= 65535 && B <= 65535, "attention (CUDA): ", B, " images × ", H,
             " heads exceed the grid's 65535 per dimension");
  allow_dynamic_shared(reinterpret_cast<const void*>(kernel), static_cast<std::size_t>(bytes));
  const dim3 grid(static_cast<unsigned>((S + flash_mma::kRows - 1) / flash_mma::kRows),
                  static_cast<unsigned>(H), static_cast<unsigned>(B));
  kernel<<<grid, flash_mma::kThreads, static_cast<std::size_t>(bytes), stream()>>>(
      static_cast<int>(S), static_cast<int>(H), args...);
  check_launch(name);
  Context::get().count_flash_mma_launch();
}

inline void flash_mma_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd,
                              float scale, const bf16* qkv, float* lse, bf16* ctx) {
  with_feature_steps(hd, [&]<int NK>() {
    launch_flash_mma(flash_mma::forward_kernel<NK>, "flash_mma::forward_kernel",
                     flash_mma::kForwardBytes<NK>, B, H, S, static_cast<int>(hd), scale, qkv, lse,
                     ctx);
  });
}

inline void flash_mma_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd,
                               float scale, const bf16* qkv, const float* lse, const bf16* ctx,
                               const bf16* dctx, float* delta, bf16* dqkv) {
  // Stream order puts the dq pass (which writes δ) before the dk/dv pass (which reads it).
  with_feature_steps(hd, [&]<int NK>() {
    launch_flash_mma(flash_mma::dq_kernel<NK>, "flash_mma::dq_kernel", flash_mma::kDqBytes<NK>, B,
                     H, S, static_cast<int>(hd), scale, qkv, lse, ctx, dctx, delta, dqkv);
    launch_flash_mma(flash_mma::dkdv_kernel<NK>, "flash_mma::dkdv_kernel",
                     flash_mma::kDkdvBytes<NK>, B, H, S, static_cast<int>(hd), scale, qkv, lse,
                     dctx, static_cast<const float*>(delta), dqkv);
  });
}

}  // namespace kernels

template <class T>
void attention_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                       const T* qkv, T* lse, T* ctx) {
  if (B <= 0 || S <= 0) return;
  if constexpr (std::is_same_v<T, bf16>) {
    if (kernels::flash_mma_applies(hd, S, float(scale), {qkv, ctx}))
      return kernels::flash_mma_forward(B, H, S, hd, float(scale), qkv, kernels::row_terms(lse),
                                        ctx);
  }
  using A = flash::flash_acc_t<T>;
  auto run = [&]<class Mma, int Threads>() {
    kernels::flash_forward<Mma, Threads>(B, H, S, hd, A(scale), qkv, kernels::row_terms(lse),
                                         ctx);
  };
  if constexpr (!std::is_same_v<T, double>) {
    if (kernels::flash_on_tensor_cores<T>())
      return kernels::with_flash_threads<kernels::TensorCoreMma>(run);
  }
  kernels::with_flash_threads<flash::SimtMma>(run);
}

template <class T>
void attention_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                        const T* qkv, const T* lse, const T* ctx, const T* dctx, T* delta,
                        T* dqkv) {
  if (B <= 0 || S <= 0) return;
  if constexpr (std::is_same_v<T, bf16>) {
    if (kernels::flash_mma_applies(hd, S, float(scale), {qkv, ctx, dctx, dqkv}))
      return kernels::flash_mma_backward(B, H, S, hd, float(scale), qkv, kernels::row_terms(lse),
                                         ctx, dctx, kernels::row_terms(delta), dqkv);
  }
  using A = flash::flash_acc_t<T>;
  auto run = [&]<class Mma, int Threads>() {
    kernels::flash_backward<Mma, Threads>(B, H, S, hd, A(scale), qkv, kernels::row_terms(lse),
                                          ctx, dctx, kernels::row_terms(delta), dqkv);
  };
  if constexpr (!std::is_same_v<T, double>) {
    if (kernels::flash_on_tensor_cores<T>())
      return kernels::with_flash_threads<kernels::TensorCoreMma>(run);
  }
  kernels::with_flash_threads<flash::SimtMma>(run);
}

}  // namespace moca::cuda
