// TensorView<T, D> and Tensor<T, D>: contiguous, row-major arrays of rank 0..4 on device D.
//
//   Tensor<float> x({128, 65, 192});        // owning, zero-filled, 64-byte aligned, on the CPU
//   TensorView<float> first = x.rows(0, 8);  // non-owning: the first 8 rows (dimension 0)
//   auto m = x.matrix();                     // the same data as [128*65, 192]
//   Tensor<float> y = x.clone();             // copies are explicit; tensors are move-only
//
// A TensorView is a pointer plus a shape, cheap to copy, and — like std::span — shallow-const: a
// const view still gives write access to its elements. Every op takes views, and a Tensor *is* a
// view of its own storage (it derives from TensorView), so an op accepts either. A view must not
// outlive the tensor or arena it points into.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "moca/core/check.hpp"
#include "moca/core/device.hpp"
#include "moca/core/memory.hpp"
#include "moca/core/profiler.hpp"
#include "moca/core/shape.hpp"

namespace moca {

template <class T, class D = Cpu>
class TensorView {
 public:
  using value_type = T;
  using device_type = D;

  TensorView() = default;
  TensorView(T* data, Shape shape) : data_(data), shape_(shape) {
    MOCA_CHECK(data_ != nullptr || shape_.numel() == 0, "TensorView: null data for shape ",
               shape_);
  }

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  std::int64_t size(int dim) const { return shape_[dim]; }
  std::int64_t numel() const { return shape_.numel(); }
  bool empty() const { return numel() == 0; }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * sizeof(T); }

  /// Rows [begin, end) of dimension 0, as a view of the same rank.
  TensorView rows(std::int64_t begin, std::int64_t end) const {
    MOCA_CHECK(rank() >= 1, "rows: a scalar has no rows");
    MOCA_CHECK(0 <= begin && begin <= end && end <= shape_[0], "rows: range [", begin, ", ", end,
               ") out of range for shape ", shape_);
    const std::int64_t stride = shape_[0] == 0 ? 0 : numel() / shape_[0];
    return TensorView(data_ + begin * stride, shape_.with_first(end - begin));
  }

  /// Row i of dimension 0, as a view of rank - 1.
  TensorView row(std::int64_t i) const {
    MOCA_CHECK(rank() >= 1, "row: a scalar has no rows");
    MOCA_CHECK(0 <= i && i < shape_[0], "row: index ", i, " out of range for shape ", shape_);
    Shape s;
    switch (rank()) {
      case 1: s = Shape{}; break;
      case 2: s = Shape{shape_[1]}; break;
      case 3: s = Shape{shape_[1], shape_[2]}; break;
      default: s = Shape{shape_[1], shape_[2], shape_[3]}; break;
    }
    return TensorView(data_ + i * s.numel(), s);
  }

  /// The same elements with another shape of the same size.
  TensorView reshape(Shape s) const {
    MOCA_CHECK(s.numel() == numel(), "reshape: cannot view ", shape_, " (", numel(),
               " elements) as ", s, " (", s.numel(), " elements)");
    return TensorView(data_, s);
  }
  /// The matrix view [product of leading dimensions, last dimension].
  TensorView matrix() const { return TensorView(data_, Shape{shape_.leading(), shape_.last()}); }
  /// The flat view [numel].
  TensorView flat() const { return TensorView(data_, Shape{numel()}); }

  /// Element access on the host. Bounds are checked in debug builds.
  template <class... I>
  T& operator()(I... idx) const
    requires std::same_as<D, Cpu>
  {
    static_assert(sizeof...(I) <= Shape::kMaxRank, "TOO_MANY_INDICES_FOR_A_TENSOR");
    MOCA_DCHECK(static_cast<int>(sizeof...(I)) == rank(), "tensor of shape ", shape_,
                " indexed with ", sizeof...(I), " indices");
    const std::int64_t ids[] = {static_cast<std::int64_t>(idx)..., 0};
    std::int64_t offset = 0;
    for (int d = 0; d < static_cast<int>(sizeof...(I)); ++d) {
      MOCA_DCHECK(ids[d] >= 0 && ids[d] < shape_[d], "index ", ids[d], " out of range in dim ",
                  d, " of ", shape_);
      offset = offset * shape_[d] + ids[d];
    }
    return data_[offset];
  }

  T* begin() const requires std::same_as<D, Cpu> { return data_; }
  T* end() const requires std::same_as<D, Cpu> { return data_ + numel(); }

 protected:
  T* data_ = nullptr;
  Shape shape_{0};  // an empty view holds no element
};

/// A device whose Memory queues copies from the host without waiting (Memory<Cuda>::upload).
template <class D>
concept QueuedUploads = requires(void* dst, const void* src, std::size_t n) {
  Memory<D>::upload(dst, src, n);
};

/// Copies src into dst (same number of elements; any pair of devices). A copy to the host has
/// finished when it returns. A copy from the host may reuse its source when it returns; on a
/// device with QueuedUploads it is queued with that device's work, like a copy within a device.
template <class T, class Dd, class Ds>
void copy(const TensorView<T, Ds>& src, const TensorView<T, Dd>& dst) {
  MOCA_CHECK(src.numel() == dst.numel(), "copy: source ", src.shape(), " and destination ",
             dst.shape(), " differ in size");
  if constexpr (std::is_same_v<Dd, Cpu> && std::is_same_v<Ds, Cpu>) {
    profiler::count_bytes(2.0 * static_cast<double>(src.bytes()));
    Memory<Cpu>::copy(dst.data(), src.data(), src.bytes());
  } else if constexpr (std::is_same_v<Dd, Ds>) {
    // Within one device: ordered with its kernels, and like them not waited for.
    profiler::count_bytes(2.0 * static_cast<double>(src.bytes()));
    Memory<Dd>::copy_within(dst.data(), src.data(), src.bytes());
  } else if constexpr (std::is_same_v<Ds, Cpu> && QueuedUploads<Dd>) {
    Memory<Dd>::upload(dst.data(), src.data(), src.bytes());
  } else {
    // The non-host side's Memory copies in any direction (unified addressing).
    using Device = std::conditional_t<std::is_same_v<Dd, Cpu>, Ds, Dd>;
    Memory<Device>::copy(dst.data(), src.data(), src.bytes());
  }
}

/// An owning tensor: allocates (zero-filled), frees, moves; never copies implicitly.
template <class T, class D = Cpu>
class Tensor : public TensorView<T, D> {
  static_assert(std::is_trivially_copyable_v<T>, "TENSOR_ELEMENTS_MUST_BE_TRIVIALLY_COPYABLE");
  using View = TensorView<T, D>;

 public:
  Tensor() = default;
  explicit Tensor(Shape shape) { allocate(shape); }
  Tensor(std::initializer_list<std::int64_t> dims) : Tensor(Shape(dims)) {}

  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  Tensor(Tensor&& other) noexcept { steal(other); }
  Tensor& operator=(Tensor&& other) noexcept {
    if (this != &other) {
      release();
      steal(other);
    }
    return *this;
  }
  ~Tensor() { release(); }

  /// A deep copy on the same device.
  Tensor clone() const {
    Tensor t(this->shape_);
    copy(static_cast<const View&>(*this), static_cast<const View&>(t));
    return t;
  }

  /// A deep copy on device D2.
  template <class D2>
  Tensor<T, D2> to() const {
    Tensor<T, D2> t(this->shape_);
    copy(static_cast<const View&>(*this), static_cast<const TensorView<T, D2>&>(t));
    return t;
  }

  /// Gives the tensor a new shape. Memory is reused when it is large enough, so a buffer sized
  /// once for the largest case serves every smaller one without allocating. Contents are
  /// unspecified afterwards unless the storage was (re)allocated, in which case they are zero.
  void resize(Shape shape) {
    if (shape.numel() <= capacity_) {
      this->shape_ = shape;
      return;
    }
    release();
    allocate(shape);
  }

  /// Number of elements the storage can hold without reallocating.
  std::int64_t capacity() const { return capacity_; }

 private:
  void allocate(Shape shape) {
    const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * sizeof(T);
    this->data_ = static_cast<T*>(Memory<D>::allocate(bytes));
    Memory<D>::zero(this->data_, bytes);
    this->shape_ = shape;
    capacity_ = shape.numel();
  }
  void release() noexcept {
    Memory<D>::deallocate(this->data_, static_cast<std::size_t>(capacity_) * sizeof(T));
    this->data_ = nullptr;
    this->shape_ = Shape{0};
    capacity_ = 0;
  }
  void steal(Tensor& other) noexcept {
    this->data_ = std::exchange(other.data_, nullptr);
    this->shape_ = std::exchange(other.shape_, Shape{0});
    capacity_ = std::exchange(other.capacity_, 0);
  }

  std::int64_t capacity_ = 0;
};

}  // namespace moca
