// Parameters, the visitor that names them, and the flat arena that stores them.
//
// A module declares its parameters as `Param` members and lists them, with its child modules,
// in one `visit` method:
//
//   template <class V> void visit(V&& v) { v("weight", weight); v("bias", bias); }
//   template <class V> void visit(V&& v) { v("norm1", norm1); v("blocks", blocks); }
//
// `for_each_param(module, fn)` walks that tree and calls fn(dotted_name, param) with the official
// PyTorch state-dict names ("blocks.3.attn.qkv.weight"); std::vector children get indices.
// Everything built on parameters uses this one walk: the arena below, initialisation, optimiser
// groups, the teacher EMA, checkpoints, gradient clipping and (later) all-reduce.
//
// `ParameterStore` walks a module once, lays every trainable parameter out in ONE flat buffer
// (values) with a twin buffer for gradients, frozen tensors (fixed position tables, constants) in
// a third, and binds each Param's views into them. The optimiser step, the gradient norm and an
// all-reduce are then single passes over one buffer. Two modules of the same type and
// configuration get identical layouts, so student and teacher line up element for element.
//
// Mixed precision: a store of bf16 parameters also keeps a float master copy of the trainable
// values (master(), aligned with values()). Optimisers and the EMA update the master, and
// round_master_to_values() rounds it into the bf16 values that forward and backward read, so
// updates far below bf16's resolution (a 1e-4 learning rate, a 0.996 momentum) still
// accumulate. Float and double stores have no master: master() is empty. The gradients of bf16
// parameters are float (grad_t), as PyTorch's AMP keeps them: backward writes its products and
// column sums into them unrounded, so each accumulation (weight sharing, masking rounds,
// gradient accumulation) adds in float, and the clipping, the norm and the optimiser read
// what was computed.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moca/core/bf16.hpp"
#include "moca/core/check.hpp"
#include "moca/core/random.hpp"
#include "moca/core/tensor.hpp"
#include "moca/ops/elementwise.hpp"

namespace moca {

/// How a parameter is initialised (spec §1.6). Random kinds draw from a Philox stream derived
/// from the parameter's dotted name, so a value does not depend on what else the model holds.
struct Init {
  enum class Kind { Zeros, Ones, Constant, Normal, Uniform, XavierUniform, SinCos2d, External };
  Kind kind = Kind::Zeros;
  double a = 0;  ///< Constant: value; Normal: std; Uniform: bound (U(-a, a)); SinCos2d: grid side
  double b = 0;  ///< XavierUniform: fan_in (a) and fan_out (b); SinCos2d: 1 if a class-token row

  static Init zeros() { return {Kind::Zeros}; }
  static Init ones() { return {Kind::Ones}; }
  static Init constant(double v) { return {Kind::Constant, v}; }
  static Init normal(double std) { return {Kind::Normal, std}; }
  static Init uniform(double bound) { return {Kind::Uniform, bound}; }
  static Init xavier_uniform(double fan_in, double fan_out) {
    return {Kind::XavierUniform, fan_in, fan_out};
  }
  /// The fixed 2-D sin-cos position table of spec §1.2 for a grid × grid patch layout, with a
  /// leading all-zero class-token row when `cls_row`.
  static Init sincos_2d(std::int64_t grid, bool cls_row) {
    return {Kind::SinCos2d, static_cast<double>(grid), cls_row ? 1.0 : 0.0};
  }
  /// Filled by its owner after binding (e.g. loaded from a file); left at zero by initialise().
  static Init external() { return {Kind::External}; }
};

/// The type of a parameter's gradient: float for bf16 parameters, the parameter's own otherwise.
template <class T>
using grad_t = compute_t<T>;

/// One named tensor of a module: its shape, whether it trains, how it starts, and — once a
/// ParameterStore has bound it — views of its value and gradient in the arena.
template <class T, class D = Cpu>
struct Param {
  Shape shape{0};
  bool trainable = true;
  Init init;
  TensorView<T, D> value;  ///< bound by ParameterStore
  TensorView<grad_t<T>, D> grad;  ///< bound by ParameterStore; empty if frozen or no grads

  void declare(Shape s, Init how, bool is_trainable = true) {
    shape = s;
    init = how;
    trainable = is_trainable;
  }
  bool bound() const { return value.data() != nullptr || shape.numel() == 0; }
};

template <class X>
struct is_param : std::false_type {};
template <class T, class D>
struct is_param<Param<T, D>> : std::true_type {};

namespace detail {
template <class X>
struct is_vector : std::false_type {};
template <class X, class A>
struct is_vector<std::vector<X, A>> : std::true_type {};

template <class Fn>
struct ParamWalker {
  std::string prefix;
  Fn* fn;

  std::string join(std::string_view name) const {
    return prefix.empty() ? std::string(name) : prefix + "." + std::string(name);
  }
  template <class X>
  void operator()(std::string_view name, X& x) const {
    visit_one(join(name), x);
  }
  template <class X>
  void visit_one(const std::string& full, X& x) const {
    if constexpr (is_param<std::remove_const_t<X>>::value) {
      (*fn)(full, x);
    } else if constexpr (is_vector<std::remove_const_t<X>>::value) {
      for (std::size_t i = 0; i < x.size(); ++i) visit_one(full + "." + std::to_string(i), x[i]);
    } else {
      ParamWalker child{full, fn};
      x.visit(child);
    }
  }
};
}  // namespace detail

/// Calls fn(dotted_name, Param&) for every parameter of `module`, in declaration order.
template <class Module, class Fn>
void for_each_param(Module& module, Fn&& fn, std::string prefix = "") {
  detail::ParamWalker<std::remove_reference_t<Fn>> walker{std::move(prefix), &fn};
  module.visit(walker);
}

/// Writes the spec §1.2 sin-cos table for a grid × grid layout into `out` [(cls?1:0) + grid², dim]:
/// channels [0, dim/4) sin(col·ω), [dim/4, dim/2) cos(col·ω), then sin/cos of the row, with
/// ω_k = 1 / 10000^(k / (dim/4)) computed in float32 as in the reference; class row all zero.
template <class T>
void fill_sincos_2d(const TensorView<T, Cpu>& out, std::int64_t grid, bool cls_row) {
  const std::int64_t dim = out.shape().last();
  MOCA_CHECK(dim % 4 == 0, "sin-cos position table: width ", dim, " is not a multiple of 4");
  const std::int64_t rows = (cls_row ? 1 : 0) + grid * grid;
  MOCA_CHECK(out.shape().leading() == rows, "sin-cos position table: shape ", out.shape(),
             " does not hold ", rows, " rows for a ", grid, "×", grid, " grid");
  const std::int64_t F = dim / 4;
  T* p = out.data();
  for (std::int64_t j = 0; cls_row && j < dim; ++j) p[j] = T(0);
  for (std::int64_t patch = 0; patch < grid * grid; ++patch) {
    const double i = static_cast<double>(patch / grid), jj = static_cast<double>(patch % grid);
    T* row = p + ((cls_row ? 1 : 0) + patch) * dim;
    for (std::int64_t k = 0; k < F; ++k) {
      // float32 frequencies, float64 products, as numpy does in the reference implementation.
      const float omega = 1.0f / std::pow(10000.0f, static_cast<float>(k) / static_cast<float>(F));
      const double w = static_cast<double>(omega);
      row[k] = static_cast<T>(std::sin(jj * w));
      row[F + k] = static_cast<T>(std::cos(jj * w));
      row[2 * F + k] = static_cast<T>(std::sin(i * w));
      row[3 * F + k] = static_cast<T>(std::cos(i * w));
    }
  }
}

/// 64-bit FNV-1a of a name: the Philox stream of a parameter's initial values.
inline std::uint64_t name_stream(std::string_view name) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

/// Fills a host tensor according to `init`, drawing from stream name_stream(name).
template <class T>
void initialize_tensor(const TensorView<T, Cpu>& x, const Init& init, const Philox& rng,
                       std::string_view name) {
  const std::uint64_t stream = name_stream(name);
  switch (init.kind) {
    case Init::Kind::Zeros:
    case Init::Kind::External: ops::fill(x, T(0)); break;
    case Init::Kind::Ones: ops::fill(x, T(1)); break;
    case Init::Kind::Constant: ops::fill(x, static_cast<T>(init.a)); break;
    case Init::Kind::Normal: fill_normal(x, rng, stream, 0.0, init.a); break;
    case Init::Kind::Uniform: fill_uniform(x, rng, stream, -init.a, init.a); break;
    case Init::Kind::XavierUniform: {
      const double bound = std::sqrt(6.0 / (init.a + init.b));
      fill_uniform(x, rng, stream, -bound, bound);
      break;
    }
    case Init::Kind::SinCos2d:
      fill_sincos_2d(x, static_cast<std::int64_t>(init.a), init.b != 0.0);
      break;
  }
}

/// The flat arena of one model's parameters on device D.
template <class T, class D = Cpu>
class ParameterStore {
 public:
  /// Where one parameter lives.
  struct Entry {
    std::string name;
    Shape shape;
    bool trainable;
    Init init;
    std::int64_t offset;  ///< into values()/grads() if trainable, into frozen() otherwise
    std::int64_t numel() const { return shape.numel(); }
  };

  ParameterStore() = default;

  /// Lays out and binds every parameter of `module`. With `with_grads` false (a teacher, an
  /// inference model) no gradient buffer is allocated. Values start at zero: call initialize().
  template <class Module>
  explicit ParameterStore(Module& module, bool with_grads = true, std::string prefix = "") {
    std::int64_t n_train = 0, n_frozen = 0;
    for_each_param(
        module,
        [&](const std::string& name, Param<T, D>& p) {
          std::int64_t& counter = p.trainable ? n_train : n_frozen;
          entries_.push_back({name, p.shape, p.trainable, p.init, counter});
          counter += p.shape.numel();
        },
        prefix);
    values_ = Tensor<T, D>({n_train});
    if constexpr (kHasMaster) master_ = Tensor<Master, D>({n_train});
    if (with_grads) grads_ = Tensor<Grad, D>({n_train});
    frozen_ = Tensor<T, D>({n_frozen});
    std::size_t k = 0;
    for_each_param(
        module,
        [&](const std::string&, Param<T, D>& p) {
          const Entry& e = entries_[k++];
          const Tensor<T, D>& base = e.trainable ? values_ : frozen_;
          p.value = TensorView<T, D>(base.data() + e.offset, e.shape);
          p.grad = (e.trainable && with_grads)
                       ? TensorView<Grad, D>(grads_.data() + e.offset, e.shape)
                       : TensorView<Grad, D>();
        },
        prefix);
  }

  ParameterStore(ParameterStore&&) noexcept = default;
  ParameterStore& operator=(ParameterStore&&) noexcept = default;

  /// Sets every parameter to its declared initial value, reproducibly from `seed`. With a master
  /// copy, the master gets the float draws (the float model's values exactly) and the values
  /// their rounding.
  void initialize(std::uint64_t seed) {
    const Philox rng(seed);
    for (const Entry& e : entries_) {
      Tensor<Master, Cpu> host(e.shape);
      initialize_tensor(TensorView<Master, Cpu>(host), e.init, rng, e.name);
      if constexpr (kHasMaster) {
        if (e.trainable) {
          const TensorView<Master, D> m(master_.data() + e.offset, e.shape);
          copy(TensorView<Master, Cpu>(host), m);
          ops::convert(m, view(e));
          continue;
        }
        Tensor<T, Cpu> narrow(e.shape);
        ops::convert(TensorView<Master, Cpu>(host), TensorView<T, Cpu>(narrow));
        copy(TensorView<T, Cpu>(narrow), view(e));
      } else {
        copy(TensorView<T, Cpu>(host), view(e));
      }
    }
  }

  /// True where the store keeps a float master copy of bf16 values.
  static constexpr bool kHasMaster = !std::is_same_v<T, compute_t<T>>;
  using Master = compute_t<T>;
  /// The gradients' type (grad_t<T>).
  using Grad = grad_t<T>;

  /// The float master copy of all trainable values (empty without one).
  TensorView<Master, D> master() const { return master_; }
  /// values ← master rounded (after an optimiser or EMA step on the master).
  void round_master_to_values() {
    if constexpr (kHasMaster) ops::convert(TensorView<Master, D>(master_), TensorView<T, D>(values_));
  }
  /// master ← values (after the values were written directly, e.g. loaded).
  void values_to_master() {
    if constexpr (kHasMaster) ops::convert(TensorView<T, D>(values_), TensorView<Master, D>(master_));
  }

  const std::vector<Entry>& entries() const { return entries_; }
  /// The entry called `name`, or nullptr.
  const Entry* find(std::string_view name) const {
    for (const Entry& e : entries_)
      if (e.name == name) return &e;
    return nullptr;
  }
  /// The value of one entry, as a view of its shape.
  TensorView<T, D> view(const Entry& e) const {
    const Tensor<T, D>& base = e.trainable ? values_ : frozen_;
    return TensorView<T, D>(base.data() + e.offset, e.shape);
  }
  /// The gradient of one trainable entry (empty if frozen or no gradient buffer).
  TensorView<Grad, D> grad_view(const Entry& e) const {
    if (!e.trainable || grads_.empty()) return {};
    return TensorView<Grad, D>(grads_.data() + e.offset, e.shape);
  }

  /// All trainable values, flat, in declaration order.
  TensorView<T, D> values() const { return values_; }
  /// All gradients, flat, aligned with values().
  TensorView<Grad, D> grads() const { return grads_; }
  /// All frozen tensors, flat.
  TensorView<T, D> frozen() const { return frozen_; }

  std::int64_t num_trainable() const { return values_.numel(); }
  std::int64_t num_frozen() const { return frozen_.numel(); }
  bool has_grads() const { return !grads_.empty(); }

  void zero_grad() {
    if (has_grads()) ops::zero(grads_);
  }

 private:
  std::vector<Entry> entries_;
  Tensor<T, D> values_, frozen_;
  Tensor<Grad, D> grads_;
  Tensor<Master, D> master_;  // empty unless kHasMaster
};

}  // namespace moca
