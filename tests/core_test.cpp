// Tensor, Shape, errors, memory counters and the Philox generator.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <moca/core/profiler.hpp>
#include <moca/core/random.hpp>
#include <moca/moca.hpp>
#include <string>
#include <vector>

using namespace moca;

TEST_CASE("Shape: numel, leading, equality and printing") {
  Shape s{2, 3, 4};
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 24);
  CHECK(s.leading() == 6);
  CHECK(s.last() == 4);
  CHECK(s == Shape{2, 3, 4});
  CHECK_FALSE(s == Shape{2, 12});
  CHECK(s.str() == "[2, 3, 4]");
  CHECK(Shape{}.numel() == 1);
  CHECK_THROWS_AS(Shape({1, 2, 3, 4, 5}), Error);
  CHECK_THROWS_AS(Shape({2, -1}), Error);
}

TEST_CASE("Tensor: zero-filled, aligned, move-only, explicit clone") {
  Tensor<float> t({3, 5});
  CHECK(t.numel() == 15);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
  for (float v : t) CHECK(v == 0.0f);
  t(1, 2) = 7.0f;
  Tensor<float> c = t.clone();
  CHECK(c(1, 2) == 7.0f);
  CHECK(c.data() != t.data());
  Tensor<float> m = std::move(t);
  CHECK(m(1, 2) == 7.0f);
  CHECK(t.empty());  // NOLINT(bugprone-use-after-move): moved-from tensors are empty
  CHECK(t.data() == nullptr);
  static_assert(!std::is_copy_constructible_v<Tensor<float>>);
  static_assert(std::is_nothrow_move_constructible_v<Tensor<float>>);
}

TEST_CASE("TensorView: rows, row, reshape and matrix share storage") {
  Tensor<double> t({4, 2, 3});
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<double>(i);
  auto r = t.rows(1, 3);
  CHECK(r.shape() == Shape{2, 2, 3});
  CHECK(r.data() == t.data() + 6);
  CHECK(r(0, 0, 0) == 6.0);
  auto one = t.row(3);
  CHECK(one.shape() == Shape{2, 3});
  CHECK(one(1, 2) == 23.0);
  CHECK(t.matrix().shape() == Shape{8, 3});
  CHECK(t.reshape({6, 4})(5, 3) == 23.0);
  CHECK_THROWS_AS(t.rows(3, 5), Error);
  CHECK_THROWS_AS(t.row(4), Error);
  CHECK_THROWS_AS(t.reshape({5, 5}), Error);
}

TEST_CASE("Tensor::resize reuses storage when it fits") {
  Tensor<float> t({10, 10});
  float* p = t.data();
  const auto before = memory_stats<Cpu>().allocations;
  t.resize({5, 7});
  CHECK(t.data() == p);
  CHECK(t.shape() == Shape{5, 7});
  t.resize({10, 10});
  CHECK(t.data() == p);
  CHECK(memory_stats<Cpu>().allocations == before);
  t.resize({11, 10});
  CHECK(t.capacity() == 110);
  CHECK(memory_stats<Cpu>().allocations == before + 1);
}

TEST_CASE("Memory counters track bytes in use and the peak") {
  const auto base = memory_stats<Cpu>();
  reset_peak_memory<Cpu>();
  {
    Tensor<float> a({1000});
    CHECK(memory_stats<Cpu>().bytes_in_use == base.bytes_in_use + 4000);
  }
  const auto after = memory_stats<Cpu>();
  CHECK(after.bytes_in_use == base.bytes_in_use);
  CHECK(after.peak_bytes >= base.bytes_in_use + 4000);
  CHECK(after.allocations == base.allocations + 1);
}

TEST_CASE("Shape errors name both shapes") {
  Tensor<float> a({3, 4}), b({5, 6}), c({3, 6});
  try {
    ops::gemm(a, Trans::N, b, Trans::N, c);
    FAIL("gemm accepted incompatible shapes");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("[3, 4]") != std::string::npos);
    CHECK(msg.find("[5, 6]") != std::string::npos);
    CHECK(msg.find("gemm") != std::string::npos);
  }
  Tensor<float> x({2, 3}), y({3, 2});
  try {
    ops::softmax(x, y);
    FAIL("softmax accepted different shapes");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("[2, 3]") != std::string::npos);
    CHECK(msg.find("[3, 2]") != std::string::npos);
  }
}

TEST_CASE("Philox-4x32-10 matches the Random123 known-answer vectors") {
  // Counter = (index lo, index hi, stream lo, stream hi), key = seed (lo, hi).
  const auto zero = Philox(0).block(0, 0);
  CHECK(zero == Philox::Block{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  const auto ones = Philox(~0ull).block(~0ull, ~0ull);
  CHECK(ones == Philox::Block{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  const auto pi = Philox(0x299f31d0a4093822ull).block(0x0370734413198a2eull, 0x85a308d3243f6a88ull);
  CHECK(pi == Philox::Block{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
}

TEST_CASE("Philox draws depend only on (seed, stream, index)") {
  const Philox a(42), b(42), c(43);
  CHECK(a.uniform(3, 1000) == b.uniform(3, 1000));
  CHECK(a.uniform(3, 1000) != c.uniform(3, 1000));
  CHECK(a.uniform(3, 1000) != a.uniform(4, 1000));
  // Moments of the distributions are right.
  double s = 0, s2 = 0, n1 = 0, n2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double u = a.uniform(7, static_cast<std::uint64_t>(i));
    CHECK_UNARY(u >= 0.0);
    CHECK_UNARY(u < 1.0);
    s += u;
    s2 += u * u;
    const double z = a.normal(8, static_cast<std::uint64_t>(i));
    n1 += z;
    n2 += z * z;
  }
  CHECK(s / n == doctest::Approx(0.5).epsilon(0.01));
  CHECK(s2 / n - (s / n) * (s / n) == doctest::Approx(1.0 / 12).epsilon(0.01));
  CHECK(std::abs(n1 / n) < 0.01);
  CHECK(n2 / n == doctest::Approx(1.0).epsilon(0.01));
  for (std::uint64_t i = 0; i < 1000; ++i) CHECK(a.below(7, 9, i) < 7);
}

TEST_CASE("fill_uniform and fill_normal are reproducible and in range") {
  Tensor<float> x({1000}), y({1000});
  fill_uniform(x, Philox(5), 1, -2.0, 3.0);
  fill_uniform(y, Philox(5), 1, -2.0, 3.0);
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    CHECK(x(i) == y(i));
    CHECK(x(i) >= -2.0f);
    CHECK(x(i) < 3.0f);
  }
  fill_normal(y, Philox(5), 2, 1.0, 0.0);
  for (float v : y) CHECK(v == 1.0f);
}

namespace {
void spin_for(double seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < end) {
  }
}
double seconds_of(const std::vector<profiler::Entry>& report, const std::string& name,
                  std::int64_t* calls = nullptr) {
  for (const auto& e : report)
    if (name == e.name) {
      if (calls) *calls = e.calls;
      return e.seconds;
    }
  return -1;
}
}  // namespace

TEST_CASE("profiler: nested scopes are charged their own time only") {
  profiler::reset();
  {
    MOCA_PROFILE_SCOPE("ignored while off");
    spin_for(0.001);
  }
  profiler::enable();
  for (int i = 0; i < 2; ++i) {
    MOCA_PROFILE_SCOPE("outer");
    spin_for(0.010);
    {
      MOCA_PROFILE_SCOPE("inner");
      spin_for(0.030);
    }
  }
  profiler::enable(false);
  const auto report = profiler::report();
  std::int64_t outer_calls = 0, inner_calls = 0;
  const double outer = seconds_of(report, "outer", &outer_calls);
  const double inner = seconds_of(report, "inner", &inner_calls);
  CHECK(outer_calls == 2);
  CHECK(inner_calls == 2);
  CHECK(seconds_of(report, "ignored while off") < 0);
  // outer spins 20 ms of its own and waits 60 ms in inner: its entry holds only the 20 ms.
  CHECK(inner >= 0.060);
  CHECK(outer >= 0.020);
  CHECK(outer < 0.050);
  REQUIRE(report.size() == 2);
  CHECK(std::string(report[0].name) == "inner");  // largest first
  profiler::reset();
  CHECK(profiler::report().empty());
}

namespace {
const profiler::Entry* entry_named(const std::vector<profiler::Entry>& report, const char* name) {
  for (const auto& e : report)
    if (std::string(e.name) == name) return &e;
  return nullptr;
}
}  // namespace

TEST_CASE("profiler: ops report their least memory traffic and FLOPs to the innermost scope") {
  Tensor<float> a({10, 100}), b({10, 100}), y({10, 100});
  Tensor<bf16> h({4, 8}), w({6, 8}), c({4, 6});
  profiler::reset();
  ops::gelu(a, y);  // off: not counted
  profiler::enable();
  {
    MOCA_PROFILE_SCOPE("outer");
    ops::gelu(a, y);                         // read a, write y: 2 · 1000 · 4 bytes
    ops::gemm(h, Trans::N, w, Trans::T, c);  // (32 + 48 + 24) bf16, 2·4·6·8 FLOPs
    ops::axpby(2.0f, TensorView<float>(a), 1.0f, TensorView<float>(y));  // a, y read; y written
    {
      MOCA_PROFILE_SCOPE("inner");
      ops::add(a, b, y);                                 // 3 · 4000 bytes
      copy(TensorView<float>(a), TensorView<float>(b));  // 2 · 4000 bytes
    }
  }
  profiler::enable(false);
  const auto report = profiler::report();
  const profiler::Entry* outer = entry_named(report, "outer");
  const profiler::Entry* inner = entry_named(report, "inner");
  REQUIRE(outer != nullptr);
  REQUIRE(inner != nullptr);
  CHECK(outer->bytes == 8000.0 + 2.0 * (32 + 48 + 24) + 12000.0);
  CHECK(outer->flops == 2.0 * 4 * 6 * 8);
  CHECK(inner->bytes == 12000.0 + 8000.0);
  CHECK(inner->flops == 0.0);
  profiler::reset();
  CHECK(profiler::report().empty());
}

namespace {
// A device whose next wait reports a failure (as a CUDA stream does after a faulting kernel).
bool g_device_failed = false;
void failing_synchronize() {
  if (g_device_failed) {
    g_device_failed = false;
    MOCA_CHECK(false, "device failure");
  }
}
}  // namespace

TEST_CASE("profiler: a failure the synchronizer reports at a scope's end is thrown, not fatal") {
  profiler::reset();
  profiler::enable();
  profiler::set_synchronizer(&failing_synchronize);
  std::string caught;
  try {
    MOCA_PROFILE_SCOPE("outer");
    try {
      MOCA_PROFILE_SCOPE("failing");
      g_device_failed = true;  // the work queued in this scope failed
    } catch (const Error& e) {
      caught = e.what();
    }
    // Leaving by an exception: the scope's own failure must not end the program; the first
    // exception goes on.
    MOCA_PROFILE_SCOPE("unwound");
    g_device_failed = true;
    throw std::runtime_error("first");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "first");
  }
  CHECK(caught.find("device failure") != std::string::npos);
  // The scopes were closed: a new one nests at the top level and everything was counted.
  { MOCA_PROFILE_SCOPE("after"); }
  profiler::set_synchronizer(nullptr);
  profiler::enable(false);
  std::int64_t calls = 0;
  for (const char* name : {"outer", "failing", "unwound", "after"}) {
    CHECK_MESSAGE(seconds_of(profiler::report(), name, &calls) >= 0, name);
    CHECK_MESSAGE(calls == 1, name);
  }
  profiler::reset();
}

namespace {
// A device timeline whose clock the test moves: each mark reads it.
struct FakeTimeline final : profiler::Timeline {
  double now = 0.0;
  std::vector<double> marks;
  int waited_for = -1;
  int mark() override {
    marks.push_back(now);
    return static_cast<int>(marks.size()) - 1;
  }
  double seconds_between(int first, int second) override {
    waited_for = std::max(waited_for, second);
    return marks[static_cast<std::size_t>(second)] - marks[static_cast<std::size_t>(first)];
  }
  void clear() override { marks.clear(); }
};
}  // namespace

TEST_CASE("profiler: scopes on a device timeline are charged the device time between marks") {
  FakeTimeline device;
  profiler::reset();
  profiler::set_timeline(&device);
  profiler::enable();
  for (int i = 0; i < 2; ++i) {
    MOCA_PROFILE_SCOPE("step");
    device.now += 1.0;  // the step's own work: 1 s of device time
    {
      MOCA_PROFILE_SCOPE("linear");
      device.now += 3.0;
    }
    {
      MOCA_PROFILE_SCOPE("attention");
      device.now += 2.0;
      {
        MOCA_PROFILE_SCOPE("linear");  // nested in another scope, same entry
        device.now += 0.5;
      }
    }
  }
  profiler::enable(false);
  // Nothing is read until the report: the steps ran without waiting.
  CHECK(device.waited_for == -1);
  CHECK(device.marks.size() == 16);
  const auto report = profiler::report();
  CHECK(device.waited_for == 15);
  CHECK(device.marks.empty());  // resolved and cleared
  std::int64_t calls = 0;
  CHECK(seconds_of(report, "step", &calls) == doctest::Approx(2.0));
  CHECK(calls == 2);
  CHECK(seconds_of(report, "linear", &calls) == doctest::Approx(7.0));
  CHECK(calls == 4);
  CHECK(seconds_of(report, "attention", &calls) == doctest::Approx(4.0));
  CHECK(calls == 2);
  REQUIRE(report.size() == 3);
  CHECK(std::string(report[0].name) == "linear");
  // A second report adds nothing more; reset forgets the entries.
  CHECK(seconds_of(profiler::report(), "step") == doctest::Approx(2.0));
  profiler::reset();
  CHECK(profiler::report().empty());
  profiler::set_timeline(nullptr);
}

TEST_CASE("PendingValues: known values, partial sums added in order, captures, one read") {
  PendingValues<Cpu> values;
  const auto a = values.known(3.0, 2.0);
  CHECK(values[a] == 1.5);  // known values need no read()

  // Partial sums: the value is their sum in order over the divisor, as a reduction's host total.
  auto [b, pb] = values.partial_sums(3, 4.0);
  pb[0] = 1e16;
  pb[1] = 1.0;
  pb[2] = -1e16;
  CHECK_THROWS_WITH_AS(values[b], doctest::Contains("before read()"), Error);
  // A larger set moves the buffer: the values written before keep their place.
  auto [c, pc] = values.partial_sums(500);
  for (int i = 0; i < 500; ++i) pc[i] = 0.5;
  Tensor<float> x({2});
  x.data()[0] = 7.25f;
  const auto d = values.capture(TensorView<float>(x), 2.0);
  x.data()[0] = -1.0f;  // captured when capture() ran (the CPU computes at once)
  values.read();
  CHECK(values[b] == 0.0);  // (1e16 + 1) − 1e16 in double: in any other order it is 1/4
  CHECK(values[c] == 250.0);
  CHECK(values[d] == 3.625);
  CHECK(values.size() == 4);
  CHECK_THROWS_WITH_AS(values[PendingValues<Cpu>::Ticket{4}], doctest::Contains("ticket 4"), Error);

  // clear() starts a new set on the same buffer; a value added after read() needs another read.
  values.clear();
  CHECK(values.size() == 0);
  auto [e, pe] = values.partial_sums(2);
  pe[0] = 2.0;
  pe[1] = 3.0;
  values.read();
  auto [f, pf] = values.partial_sums(1);
  pf[0] = 9.0;
  CHECK_THROWS_AS(values[f], Error);
  values.read();
  CHECK(values[e] == 5.0);
  CHECK(values[f] == 9.0);
  CHECK_THROWS_AS(values.partial_sums(0), Error);
}
