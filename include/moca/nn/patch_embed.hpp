// Patch embedding: a Conv2d with kernel = stride = patch, computed as one GEMM over patches
// flattened in (channel, ky, kx) order, so the PyTorch weight [D, C, p, p] is used as it is
// (timm's PatchEmbed, state-dict names proj.weight / proj.bias; spec §1.1).
#pragma once

#include <cmath>
#include <cstdint>

#include "moca/core/profiler.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops.hpp"

namespace moca {

template <class T, class D = Cpu>
class PatchEmbed {
 public:
  /// The convolution's parameters, visited as "proj.weight" [D, C, p, p] and "proj.bias" [D].
  struct Conv {
    Param<T, D> weight, bias;
    template <class V>
    void visit(V&& v) {
      v("weight", weight);
      v("bias", bias);
    }
  } proj;

  PatchEmbed() = default;
  PatchEmbed(std::int64_t in_chans, std::int64_t patch, std::int64_t dim)
      : in_chans_(in_chans), patch_(patch), dim_(dim) {
    const auto fan_in = static_cast<double>(in_chans * patch * patch);
    // Spec §1.6: Xavier-uniform on the [D, C·p·p] view; the bias keeps PyTorch's default conv
    // init U(±1/sqrt(fan_in)), not zero.
    proj.weight.declare({dim, in_chans, patch, patch},
                        Init::xavier_uniform(fan_in, static_cast<double>(dim)));
    proj.bias.declare({dim}, Init::uniform(1.0 / std::sqrt(fan_in)));
  }

  template <class V>
  void visit(V&& v) {
    v("proj", proj);
  }

  std::int64_t patch() const { return patch_; }
  std::int64_t features() const { return in_chans_ * patch_ * patch_; }

  /// images [N, C, H, W] → tokens [N, (H/p)(W/p), dim]
  void forward(const TensorView<T, D>& images, const TensorView<T, D>& tokens) {
    MOCA_PROFILE_SCOPE("patch_embed");
    MOCA_CHECK(images.rank() == 4 && images.size(1) == in_chans_, "patch embedding: expected [N, ",
               in_chans_, ", H, W] images, got ", images.shape());
    const std::int64_t L = (images.size(2) / patch_) * (images.size(3) / patch_);
    patches_.resize({images.size(0), L, features()});
    ops::patchify(images, patch_, TensorView<T, D>(patches_));
    ops::gemm_bias(TensorView<T, D>(patches_), Trans::N, weight_matrix(proj.weight.value),
                   Trans::T, proj.bias.value, tokens);
  }

  /// Accumulates the parameter gradients; writes d_images unless it is an empty view.
  void backward(const TensorView<T, D>& dtokens, const TensorView<T, D>& d_images) {
    MOCA_PROFILE_SCOPE("patch_embed");
    if (!proj.weight.grad.empty())
      ops::gemm(dtokens, Trans::T, TensorView<T, D>(patches_), Trans::N,
                weight_matrix(proj.weight.grad), 1, 1);
    if (!proj.bias.grad.empty()) ops::sum(dtokens.matrix(), 0, proj.bias.grad, 1, 1);
    if (!d_images.empty()) {
      dpatches_.resize(patches_.shape());
      ops::gemm(dtokens, Trans::N, weight_matrix(proj.weight.value), Trans::N,
                TensorView<T, D>(dpatches_));
      ops::unpatchify(TensorView<T, D>(dpatches_), patch_, d_images);
    }
  }

 private:
  template <class E>
  TensorView<E, D> weight_matrix(const TensorView<E, D>& w) const {
    return w.reshape({dim_, features()});
  }

  std::int64_t in_chans_ = 0, patch_ = 0, dim_ = 0;
  Tensor<T, D> patches_, dpatches_;
};

}  // namespace moca
