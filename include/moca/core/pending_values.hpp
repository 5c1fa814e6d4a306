// Values that queued device work computes and the host reads later, all of them with one wait:
//
//   PendingValues<Cuda> values;
//   auto loss = kl.forward_backward(logits, targets, dlogits, 1.0, values);  // queued, a ticket
//   auto norm2 = ops::sum_squares(grads, values);                           // queued, a ticket
//   ...                                                                       // more work
//   values.read();                     // one copy to the host, one wait
//   double l = values[loss];
//
// A reduction that returns a double to the host has to wait for the device, which empties the
// device's queue: the work queued after it starts only as the host launches it again. A training
// step reads several such values (the losses, the gradient norm); collected here, it waits once.
//
// On the device a value is held as partial sums (written by the reduction's blocks, added on the
// host in block order, so the total is the same as the reduction's own host total, bit for bit)
// or as one captured element of a device tensor. Values the host already knows (every value on
// the CPU backend, which computes them at once) are stored as they are.
//
// clear() starts a new set and keeps the buffer: a set that needs no more than the last one
// allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/device.hpp"
#include "moca/core/memory.hpp"
#include "moca/core/tensor.hpp"

namespace moca {

template <class D>
class PendingValues {
 public:
  /// Names one value of the set; valid until clear().
  struct Ticket {
    std::size_t index = 0;
  };

  /// Forgets every value (the device buffer is kept for the next set).
  void clear() {
    entries_.clear();
    used_ = 0;
    read_ = false;
  }

  /// A value the host knows already: `value / divisor`.
  Ticket known(double value, double divisor = 1.0) {
    return push({Kind::Known, 0, 0, divisor, value, nullptr});
  }

  /// `count` partial sums that queued device work writes at the returned address (doubles, in
  /// this set's device buffer, valid until the next call on this set); the value is their sum,
  /// added in order on the host, over `divisor`.
  std::pair<Ticket, double*> partial_sums(std::int64_t count, double divisor = 1.0) {
    MOCA_CHECK(count > 0, "PendingValues: a sum of ", count, " partial sums");
    const std::int64_t at = reserve(count);
    const Ticket t = push({Kind::Partials, at, count, divisor, 0.0, nullptr});
    return {t, buffer_.data() + at};
  }

  /// The first element of device tensor x as it is when the work queued before this call has
  /// run, over `divisor`.
  template <class T>
  Ticket capture(const TensorView<T, D>& x, double divisor = 1.0) {
    static_assert(sizeof(T) <= sizeof(double) && std::is_trivially_copyable_v<T>);
    MOCA_CHECK(x.numel() >= 1, "PendingValues: capture of an empty tensor ", x.shape());
    if constexpr (std::is_same_v<D, Cpu>) {
      return known(static_cast<double>(x.data()[0]), divisor);
    } else {
      const std::int64_t at = reserve(1);
      Memory<D>::copy_within(buffer_.data() + at, x.data(), sizeof(T));
      return push({Kind::Captured, at, 1, divisor, 0.0, &as_double<T>});
    }
  }

  /// Waits once for the device work behind every value of the set and makes them readable. A
  /// set read already, or holding only known values, does not wait.
  void read() {
    if (read_) return;
    read_ = true;
    if (used_ == 0) return;
    host_.resize(static_cast<std::size_t>(used_));
    copy(TensorView<double, D>(buffer_.data(), Shape{used_}),
         TensorView<double, Cpu>(host_.data(), Shape{used_}));
  }

  /// The value of ticket t; read() first.
  double operator[](Ticket t) const {
    MOCA_CHECK(t.index < entries_.size(), "PendingValues: ticket ", t.index, " of a set of ",
               entries_.size(), " values");
    const Entry& e = entries_[t.index];
    if (e.kind == Kind::Known) return e.value / e.divisor;
    MOCA_CHECK(read_, "PendingValues: value ", t.index, " asked for before read()");
    const double* p = host_.data() + e.offset;
    if (e.kind == Kind::Captured) return e.convert(p) / e.divisor;
    double total = 0.0;
    for (std::int64_t i = 0; i < e.count; ++i) total += p[i];
    return total / e.divisor;
  }

  /// Number of values in the set.
  std::size_t size() const { return entries_.size(); }

 private:
  enum class Kind { Known, Partials, Captured };
  struct Entry {
    Kind kind;
    std::int64_t offset, count;
    double divisor, value;
    double (*convert)(const double*);
  };

  template <class T>
  static double as_double(const double* p) {
    T v{};
    std::memcpy(static_cast<void*>(&v), p, sizeof(T));  // T is trivially copyable
    return static_cast<double>(v);
  }

  Ticket push(const Entry& e) {
    entries_.push_back(e);
    read_ = false;
    return Ticket{entries_.size() - 1};
  }

  // Room for `count` doubles after the ones in use; a larger buffer takes over the values
  // written so far with a copy queued after the work that writes them.
  std::int64_t reserve(std::int64_t count) {
    const std::int64_t at = used_;
    if (at + count > buffer_.numel()) {
      std::int64_t capacity = buffer_.numel() > 0 ? buffer_.numel() : 64;
      while (capacity < at + count) capacity *= 2;
      Tensor<double, D> bigger({capacity});
      if (at > 0)
        copy(TensorView<double, D>(buffer_.data(), Shape{at}),
             TensorView<double, D>(bigger.data(), Shape{at}));
      buffer_ = std::move(bigger);
    }
    used_ = at + count;
    return at;
  }

  std::vector<Entry> entries_;
  Tensor<double, D> buffer_;
  std::vector<double> host_;
  std::int64_t used_ = 0;
  bool read_ = false;
};

}  // namespace moca
