// safetensors reading and writing, atomic writes, and name-based loading of parameter stores.
#include <doctest/doctest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <moca/io/safetensors.hpp>
#include <moca/io/state_dict.hpp>
#include <moca/models/vit.hpp>
#include <moca/nn/parameter.hpp>
#include <numbers>
#include <string>
#include <vector>

#include "temp_files.hpp"

using namespace moca;
namespace fs = std::filesystem;

namespace {

using testing::contains;
using testing::error_of;
using testing::TempDir;

std::vector<std::byte> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> b(c.size());
  if (!c.empty()) std::memcpy(b.data(), c.data(), c.size());
  return b;
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A file with the given JSON header (padded to 8 bytes) and `data_bytes` bytes of data.
std::string make_file(std::string json, std::size_t data_bytes, std::uint64_t declared_len = 0) {
  json.append((8 - json.size() % 8) % 8, ' ');
  const std::uint64_t n = declared_len ? declared_len : json.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + json + std::string(data_bytes, '\x01');
}

template <class T>
Tensor<T> tensor_of(Shape shape, const std::vector<T>& values) {
  Tensor<T> t(shape);
  REQUIRE(static_cast<std::size_t>(t.numel()) == values.size());
  for (std::size_t i = 0; i < values.size(); ++i) t.data()[i] = values[i];
  return t;
}

template <class T>
bool bits_equal(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

VitConfig tiny_vit() {
  VitConfig c;
  c.img_size = 8;
  c.patch = 4;
  c.in_chans = 1;
  c.dim = 8;
  c.depth = 2;
  c.heads = 2;
  c.mlp_ratio = 2.0;
  return c;
}

template <class T>
bool stores_equal(const ParameterStore<T>& a, const ParameterStore<T>& b) {
  if (a.num_trainable() != b.num_trainable() || a.num_frozen() != b.num_frozen()) return false;
  return std::memcmp(a.values().data(), b.values().data(), a.values().bytes()) == 0 &&
         std::memcmp(a.frozen().data(), b.frozen().data(), a.frozen().bytes()) == 0;
}

}  // namespace

TEST_CASE("safetensors dtypes: names, sizes and C++ types") {
  CHECK(std::string(to_string(SafetensorsDtype::BF16)) == "BF16");
  CHECK(parse_safetensors_dtype("F16") == SafetensorsDtype::F16);
  CHECK(parse_safetensors_dtype("I64") == SafetensorsDtype::I64);
  CHECK_FALSE(parse_safetensors_dtype("F8_E4M3").has_value());
  CHECK_FALSE(parse_safetensors_dtype("f32").has_value());
  CHECK(element_size(SafetensorsDtype::BF16) == 2);
  CHECK(element_size(SafetensorsDtype::I64) == 8);
  CHECK(element_size(SafetensorsDtype::U8) == 1);
  static_assert(safetensors_dtype_of<float>() == SafetensorsDtype::F32);
  static_assert(safetensors_dtype_of<double>() == SafetensorsDtype::F64);
  static_assert(safetensors_dtype_of<std::int64_t>() == SafetensorsDtype::I64);
  static_assert(safetensors_dtype_of<std::int32_t>() == SafetensorsDtype::I32);
  static_assert(safetensors_dtype_of<std::uint8_t>() == SafetensorsDtype::U8);
}

TEST_CASE("F16 conversion: exact values, rounding to nearest even, overflow, subnormals") {
  using detail::f16_bits;
  using detail::f16_value;
  CHECK(f16_bits(1.0) == 0x3c00);
  CHECK(f16_bits(-2.5) == 0xc100);
  CHECK(f16_bits(65504.0) == 0x7bff);                          // largest finite
  CHECK(f16_bits(65519.0) == 0x7bff);                          // below the halfway point
  CHECK(f16_bits(65520.0) == 0x7c00);                          // halfway to 2^16: infinity
  CHECK(f16_bits(std::ldexp(1.0, -14)) == 0x0400);             // smallest normal
  CHECK(f16_bits(std::ldexp(1.0, -24)) == 0x0001);             // smallest subnormal
  CHECK(f16_bits(std::ldexp(1023.0, -24)) == 0x03ff);          // largest subnormal
  CHECK(f16_bits(std::ldexp(1.0, -25)) == 0x0000);             // tie: to even (zero)
  CHECK(f16_bits(std::ldexp(3.0, -26)) == 0x0001);             // above the tie
  CHECK(f16_bits(std::ldexp(1.0, -14) - std::ldexp(1.0, -25)) == 0x0400);  // up into normal
  CHECK(f16_bits(1.0 + std::ldexp(1.0, -11)) == 0x3c00);       // tie: down to even
  CHECK(f16_bits(1.0 + std::ldexp(3.0, -11)) == 0x3c02);       // tie: up to even
  CHECK(f16_bits(1.0 / 3.0) == 0x3555);
  CHECK(f16_bits(-0.0) == 0x8000);
  CHECK(f16_bits(1e-30) == 0x0000);
  CHECK(f16_bits(-1e30) == 0xfc00);
  CHECK(f16_bits(std::numeric_limits<double>::infinity()) == 0x7c00);
  CHECK(f16_bits(std::numeric_limits<double>::quiet_NaN()) == 0x7e00);
  // The double is rounded once: 1 + 2^-11 + 2^-40 is above the tie (float would round it down).
  CHECK(f16_bits(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40)) == 0x3c01);

  CHECK(f16_value(0x3c00) == 1.0);
  CHECK(f16_value(0xc100) == -2.5);
  CHECK(f16_value(0x7bff) == 65504.0);
  CHECK(f16_value(0x0001) == std::ldexp(1.0, -24));
  CHECK(f16_value(0x03ff) == std::ldexp(1023.0, -24));
  CHECK(f16_value(0x3555) == 0.333251953125);
  CHECK(std::isinf(f16_value(0xfc00)));
  CHECK(f16_value(0xfc00) < 0);
  CHECK(std::isnan(f16_value(0x7e00)));
  CHECK(std::signbit(f16_value(0x8000)));
  // Every finite half survives a round trip.
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    if ((h & 0x7c00) == 0x7c00) continue;
    REQUIRE(f16_bits(f16_value(h)) == h);
  }
}

TEST_CASE("BF16 conversion: exact values, rounding to nearest even, overflow, subnormals") {
  using detail::bf16_bits;
  using detail::bf16_value;
  CHECK(bf16_bits(1.0) == 0x3f80);
  CHECK(bf16_bits(-2.5) == 0xc020);
  CHECK(bf16_bits(static_cast<float>(1.0 / 3.0)) == 0x3eab);
  CHECK(bf16_bits(static_cast<float>(std::numbers::pi)) == 0x4049);
  CHECK(bf16_bits(1.0 + std::ldexp(1.0, -8)) == 0x3f80);   // tie: down to even
  CHECK(bf16_bits(1.0 + std::ldexp(3.0, -8)) == 0x3f82);   // tie: up to even
  CHECK(bf16_bits(std::numeric_limits<float>::max()) == 0x7f80);  // rounds up to infinity
  CHECK(bf16_bits(3.3895313892515355e38) == 0x7f7f);        // largest finite
  CHECK(bf16_bits(std::ldexp(1.0, -133)) == 0x0001);        // smallest subnormal
  CHECK(bf16_bits(std::ldexp(1.0, -149)) == 0x0000);
  CHECK(bf16_bits(-std::numeric_limits<double>::infinity()) == 0xff80);
  CHECK(bf16_bits(std::numeric_limits<double>::quiet_NaN()) == 0x7fc0);
  CHECK(bf16_value(0x3f80) == 1.0);
  CHECK(bf16_value(0xc020) == -2.5);
  CHECK(bf16_value(0x0001) == std::ldexp(1.0, -133));
  CHECK(bf16_value(0x7f7f) == 3.3895313892515355e38);
  // Against the float bit trick for every finite bfloat16.
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    if ((h & 0x7f80) == 0x7f80) continue;
    const float f = std::bit_cast<float>(b << 16);
    REQUIRE(bf16_value(h) == static_cast<double>(f));
    REQUIRE(bf16_bits(f) == h);
  }
}

TEST_CASE("safetensors round trip of every dtype, with conversions on read") {
  TempDir dir("io");
  const std::string path = dir.file("all.safetensors");
  const std::vector<float> fv = {1.0f, -2.5f, 65504.0f, 0.1f, std::ldexp(1.0f, -24), -0.0f};
  const std::vector<double> dv = {1.0 / 3.0, -1e300, 5e-324, 0.1};
  auto f = tensor_of<float>({2, 3}, fv);
  auto d = tensor_of<double>({4}, dv);
  auto i64 = tensor_of<std::int64_t>({2, 2}, {0, -1, std::int64_t{1} << 62,
                                              std::numeric_limits<std::int64_t>::min()});
  auto i32 = tensor_of<std::int32_t>({3}, {7, std::numeric_limits<std::int32_t>::min(),
                                           std::numeric_limits<std::int32_t>::max()});
  auto u8 = tensor_of<std::uint8_t>({1, 2, 2}, {0, 1, 128, 255});
  Tensor<float> scalar(Shape{});
  scalar.data()[0] = 3.5f;
  Tensor<float> empty({0, 4});

  SafetensorsWriter w;
  w.add("f32", f);
  w.add("f64", d);
  w.add("f16", f, SafetensorsDtype::F16);
  w.add("bf16", f, SafetensorsDtype::BF16);
  w.add("f16_from_double", d, SafetensorsDtype::F16);
  w.add("f32_from_double", d, SafetensorsDtype::F32);
  w.add("i64", i64);
  w.add("i32", i32);
  w.add("u8", u8);
  w.add("i32_as_i16", i32.rows(0, 1), SafetensorsDtype::I16);
  w.add("scalar", scalar);
  w.add("empty", empty);
  w.set_metadata("format", "pt");
  w.set_metadata("step", "1234");
  w.set_metadata("note", "héllo \"quoted\" {json}");
  w.write(path);

  const auto file = SafetensorsFile::open(path);
  CHECK(file.path() == path);
  CHECK(file.size() == 12);
  CHECK(file.dtype("f16") == SafetensorsDtype::F16);
  CHECK(file.dtype("bf16") == SafetensorsDtype::BF16);
  CHECK(file.dtype("i32_as_i16") == SafetensorsDtype::I16);
  CHECK(file.shape("u8") == std::vector<std::int64_t>{1, 2, 2});
  CHECK(file.shape("scalar").empty());
  CHECK(file.shape("empty") == std::vector<std::int64_t>{0, 4});
  CHECK(file.metadata().size() == 3);
  CHECK(file.metadata("step") == "1234");
  CHECK(file.metadata("note") == "héllo \"quoted\" {json}");
  CHECK_FALSE(file.metadata("missing").has_value());

  // Same type: bit-exact, signed zero included.
  auto f2 = file.read<float>("f32");
  CHECK(f2.shape() == Shape{2, 3});
  for (std::size_t i = 0; i < fv.size(); ++i) CHECK(bits_equal(f2.data()[i], fv[i]));
  auto d2 = file.read<double>("f64");
  for (std::size_t i = 0; i < dv.size(); ++i) CHECK(bits_equal(d2.data()[i], dv[i]));
  // Widening is exact; narrowing rounds to nearest.
  auto d_as_f = file.read<float>("f64");
  for (std::size_t i = 0; i < dv.size(); ++i) CHECK(bits_equal(d_as_f.data()[i], static_cast<float>(dv[i])));
  auto f_as_d = file.read<double>("f32");
  for (std::size_t i = 0; i < fv.size(); ++i) CHECK(f_as_d.data()[i] == static_cast<double>(fv[i]));
  auto f32d = file.read<double>("f32_from_double");
  for (std::size_t i = 0; i < dv.size(); ++i) CHECK(f32d.data()[i] == static_cast<double>(static_cast<float>(dv[i])));
  // Half and bfloat16: every value here is representable except 0.1 (rounded).
  auto h = file.read<float>("f16");
  CHECK(h.data()[0] == 1.0f);
  CHECK(h.data()[1] == -2.5f);
  CHECK(h.data()[2] == 65504.0f);
  CHECK(h.data()[3] == static_cast<float>(detail::f16_value(0x2e66)));  // 0.1 → 0.0999755859375
  CHECK(h.data()[4] == std::ldexp(1.0f, -24));
  CHECK(std::signbit(h.data()[5]));
  auto hd = file.read<double>("f16_from_double");
  CHECK(hd.data()[0] == detail::f16_value(0x3555));
  CHECK(std::isinf(hd.data()[1]));
  CHECK(hd.data()[2] == 0.0);
  auto b = file.read<double>("bf16");
  CHECK(b.data()[0] == 1.0);
  CHECK(b.data()[1] == -2.5);
  CHECK(b.data()[2] == 65536.0);  // 65504 → 2^16 in bfloat16
  CHECK(b.data()[3] == detail::bf16_value(detail::bf16_bits(0.1f)));
  // Integers: same type exact, other integer types range-checked, floating types allowed.
  auto i2 = file.read<std::int64_t>("i64");
  CHECK(i2.data()[2] == (std::int64_t{1} << 62));
  CHECK(i2.data()[3] == std::numeric_limits<std::int64_t>::min());
  auto i32b = file.read<std::int32_t>("i32");
  CHECK(i32b.data()[1] == std::numeric_limits<std::int32_t>::min());
  auto i32_as_64 = file.read<std::int64_t>("i32");
  CHECK(i32_as_64.data()[2] == std::numeric_limits<std::int32_t>::max());
  CHECK(file.read<std::int32_t>("i32_as_i16").data()[0] == 7);
  auto u = file.read<std::uint8_t>("u8");
  CHECK(u.shape() == Shape{1, 2, 2});
  CHECK(u.data()[3] == 255);
  auto uf = file.read<float>("u8");
  CHECK(uf.data()[2] == 128.0f);
  CHECK(file.read<float>("scalar").data()[0] == 3.5f);
  CHECK(file.read<float>("scalar").shape() == Shape{});
  CHECK(file.read<float>("empty").shape() == Shape{0, 4});

  // Conversions that would lose information are refused, naming the file and the tensor.
  std::string msg = error_of([&] { (void)file.read<std::int32_t>("i64"); });
  CHECK(contains(msg, path));
  CHECK(contains(msg, "'i64'"));
  msg = error_of([&] { (void)file.read<std::int64_t>("f32"); });
  CHECK(contains(msg, "'f32'"));
  CHECK(contains(msg, "floating-point"));
  msg = error_of([&] { (void)file.read<float>("nope"); });
  CHECK(contains(msg, path));
  CHECK(contains(msg, "'nope'"));

  // read_into checks the destination's shape.
  Tensor<float> dst({2, 3});
  file.read_into("f32", TensorView<float>(dst));
  CHECK(dst(1, 0) == 0.1f);
  Tensor<float> wrong({3, 2});
  msg = error_of([&] { file.read_into("f32", TensorView<float>(wrong)); });
  CHECK(contains(msg, "[2, 3]"));
  CHECK(contains(msg, "[3, 2]"));
}

TEST_CASE("safetensors writer: the reference header layout, order and padding") {
  // One F32 tensor: 64 bytes of JSON, no padding needed.
  Tensor<float> t({1, 2, 3});
  for (int i = 0; i < 6; ++i) t.data()[i] = static_cast<float>(i);
  SafetensorsWriter one;
  one.add("attn.0", t);
  const std::string h = one.header();
  const std::string json = R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  REQUIRE(json.size() == 64);
  CHECK(h == std::string("\x40\0\0\0\0\0\0\0", 8) + json);
  const auto bytes = one.serialize();
  CHECK(bytes.size() == 8 + 64 + 24);
  float v4;
  std::memcpy(&v4, bytes.data() + 72 + 16, 4);
  CHECK(v4 == 4.0f);

  // No tensors: "{}" padded with six spaces.
  SafetensorsWriter none;
  CHECK(none.header() == std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  none.set_metadata("framework", "pt");
  CHECK(none.header() ==
        std::string("\x28\0\0\0\0\0\0\0", 8) + R"({"__metadata__":{"framework":"pt"}})" + "     ");

  // Larger element types first, then by name; metadata first.
  SafetensorsWriter w;
  Tensor<float> a({3});
  Tensor<std::int64_t> n({1});
  Tensor<double> c({1});
  w.add("b_f32", a);
  w.add("a_bf16", a, SafetensorsDtype::BF16);
  w.add("a_f32", a);
  w.add("z_i64", n);
  w.add("y_f64", c);
  w.set_metadata("format", "pt");
  const std::string hw = w.header();
  const std::size_t n_json = hw.size() - 8;
  CHECK(n_json % 8 == 0);
  std::uint64_t declared;
  std::memcpy(&declared, hw.data(), 8);
  CHECK(declared == n_json);
  const std::vector<std::string> order = {"__metadata__", "z_i64", "y_f64", "a_f32", "b_f32",
                                          "a_bf16"};
  std::size_t pos = 0;
  for (const auto& key : order) {
    const std::size_t at = hw.find("\"" + key + "\"");
    REQUIRE(at != std::string::npos);
    CHECK(at > pos);
    pos = at;
  }
  const auto parsed = SafetensorsFile::from_bytes(w.serialize(), "in-memory");
  CHECK(parsed.names() == std::vector<std::string>{"z_i64", "y_f64", "a_f32", "b_f32", "a_bf16"});
  CHECK(parsed.info("a_bf16").begin == 8 + 8 + 12 + 12);

  // Names that cannot be written are refused when added.
  CHECK_THROWS_AS(w.add("a_f32", a), Error);
  CHECK_THROWS_AS(w.add("__metadata__", a), Error);
  CHECK_THROWS_AS(w.add(std::string("bad\xff"), a), Error);
  CHECK_THROWS_AS(w.set_metadata("k", std::string("\xc3")), Error);
  CHECK_THROWS_AS(w.add("f_as_int", a, SafetensorsDtype::I32), Error);
  auto big = tensor_of<std::int64_t>({1}, {std::int64_t{1} << 40});
  CHECK(contains(error_of([&] { w.add("too_big", big, SafetensorsDtype::I32); }), "too_big"));
  CHECK_FALSE(w.contains("too_big"));
}

TEST_CASE("safetensors: reads a file written by PyTorch and writes it back byte for byte") {
  // tests/data/io/torch_reference.safetensors comes from tests/python/make_io_fixture.py
  // (torch + safetensors.torch.save_file); the values below are the ones listed there.
  const fs::path fixture = fs::path(MOCA_TEST_DATA_DIR) / "io" / "torch_reference.safetensors";
  const auto file = SafetensorsFile::open(fixture);
  CHECK(file.metadata("format") == "pt");
  CHECK(file.size() == 9);

  const std::vector<float> f32 = {1.0f, -2.5f, static_cast<float>(0.1), 65504.0f,
                                  static_cast<float>(1e-30), -0.0f};
  const std::vector<double> f64 = {1.0 / 3.0, -1e300, 5e-324, 0.1};
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<float> f16_src = {
      1.0f, -2.5f, 65504.0f, 65519.0f, 65520.0f, std::ldexp(1.0f, -24), std::ldexp(1.0f, -25),
      std::ldexp(3.0f, -26), static_cast<float>(1.0 / 3.0), 1.0f + std::ldexp(1.0f, -11),
      1.0f + std::ldexp(3.0f, -11), -0.0f, static_cast<float>(inf),
      std::numeric_limits<float>::quiet_NaN()};
  const std::vector<std::uint16_t> f16_torch = {0x3c00, 0xc100, 0x7bff, 0x7bff, 0x7c00,
                                                0x0001, 0x0000, 0x0001, 0x3555, 0x3c00,
                                                0x3c02, 0x8000, 0x7c00, 0x7e00};
  const std::vector<float> bf16_src = {
      1.0f, -2.5f, static_cast<float>(1.0 / 3.0), static_cast<float>(std::numbers::pi),
      1.0f + std::ldexp(1.0f, -8), 1.0f + std::ldexp(3.0f, -8), static_cast<float>(3.4e38),
      std::ldexp(1.0f, -133), static_cast<float>(-inf)};
  const std::vector<std::uint16_t> bf16_torch = {0x3f80, 0xc020, 0x3eab, 0x4049, 0x3f80,
                                                 0x3f82, 0x7f80, 0x0001, 0xff80};
  const std::vector<std::int64_t> i64 = {0, -1, std::int64_t{1} << 62,
                                         std::numeric_limits<std::int64_t>::min()};
  const std::vector<std::int32_t> i32 = {7, std::numeric_limits<std::int32_t>::min(),
                                         std::numeric_limits<std::int32_t>::max()};
  std::vector<float> qkv(24);
  for (int i = 0; i < 24; ++i) qkv[static_cast<std::size_t>(i)] = static_cast<float>(i) / 8.0f;

  // Reading.
  auto rf = file.read<float>("f32");
  for (std::size_t i = 0; i < f32.size(); ++i) CHECK(bits_equal(rf.data()[i], f32[i]));
  auto rd = file.read<double>("f64");
  for (std::size_t i = 0; i < f64.size(); ++i) CHECK(bits_equal(rd.data()[i], f64[i]));
  const auto raw16 = file.raw("f16");
  for (std::size_t i = 0; i < f16_torch.size(); ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, raw16.data() + 2 * i, 2);
    CHECK(bits == f16_torch[i]);
    CHECK(detail::f16_bits(f16_src[i]) == f16_torch[i]);  // our rounding = torch's
  }
  const auto raw_bf = file.raw("bf16");
  for (std::size_t i = 0; i < bf16_torch.size(); ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, raw_bf.data() + 2 * i, 2);
    CHECK(bits == bf16_torch[i]);
    CHECK(detail::bf16_bits(bf16_src[i]) == bf16_torch[i]);
  }
  auto rh = file.read<float>("f16");
  CHECK(rh.shape() == Shape{2, 7});
  CHECK(rh.data()[2] == 65504.0f);
  CHECK(std::isinf(rh.data()[4]));
  CHECK(std::isnan(rh.data()[13]));
  auto rb = file.read<float>("bf16");
  CHECK(rb.shape() == Shape{3, 3});
  CHECK(rb.data()[3] == 3.140625f);
  auto ri = file.read<std::int64_t>("i64");
  for (std::size_t i = 0; i < i64.size(); ++i) CHECK(ri.data()[i] == i64[i]);
  auto ri32 = file.read<std::int32_t>("i32");
  for (std::size_t i = 0; i < i32.size(); ++i) CHECK(ri32.data()[i] == i32[i]);
  auto ru = file.read<std::uint8_t>("u8");
  CHECK(ru.shape() == Shape{1, 2, 2});
  CHECK(ru.data()[2] == 128);
  CHECK(file.read<float>("scalar").data()[0] == 3.5f);
  auto rq = file.read<float>("blocks.0.attn.qkv.weight");
  CHECK(rq.shape() == Shape{6, 4});
  CHECK(rq(5, 3) == 23.0f / 8.0f);

  // Writing the same tensors from C++ gives the same bytes.
  SafetensorsWriter w;
  w.add("f32", tensor_of<float>({2, 3}, f32));
  w.add("f64", tensor_of<double>({4}, f64));
  w.add("f16", tensor_of<float>({2, 7}, f16_src), SafetensorsDtype::F16);
  w.add("bf16", tensor_of<float>({3, 3}, bf16_src), SafetensorsDtype::BF16);
  w.add("i64", tensor_of<std::int64_t>({2, 2}, i64));
  w.add("i32", tensor_of<std::int32_t>({3}, i32));
  w.add("u8", tensor_of<std::uint8_t>({1, 2, 2}, {0, 1, 128, 255}));
  w.add("scalar", tensor_of<float>(Shape{}, {3.5f}));
  w.add("blocks.0.attn.qkv.weight", tensor_of<float>({6, 4}, qkv));
  w.set_metadata("format", "pt");
  CHECK(w.serialize() == read_bytes(fixture));
}

TEST_CASE("safetensors: a tiny ViT saved and loaded into a fresh store bit-exactly") {
  TempDir dir("io");
  const std::string path = dir.file("vit.safetensors");
  VisionTransformer<float> vit(tiny_vit());
  ParameterStore<float> ps(vit);
  ps.initialize(1);
  save_parameters(ps, path, "", {{"step", "7"}});

  const auto file = SafetensorsFile::open(path);
  CHECK(file.size() == ps.entries().size());
  CHECK(file.metadata("format") == "pt");
  CHECK(file.metadata("step") == "7");
  for (const auto& e : ps.entries()) {
    REQUIRE(file.contains(e.name));
    CHECK(file.dtype(e.name) == SafetensorsDtype::F32);
    CHECK(detail::same_shape(file.shape(e.name), e.shape));
  }
  CHECK(file.contains("pos_embed"));  // frozen tensors are saved too
  CHECK(file.shape("blocks.1.attn.qkv.weight") == std::vector<std::int64_t>{24, 8});
  CHECK(file.shape("patch_embed.proj.weight") == std::vector<std::int64_t>{8, 1, 4, 4});

  VisionTransformer<float> vit2(tiny_vit());
  ParameterStore<float> fresh(vit2);
  CHECK_FALSE(stores_equal(ps, fresh));
  const LoadReport r = load_parameters(fresh, path);
  CHECK(r.ok());
  CHECK(r.loaded == static_cast<std::int64_t>(ps.entries().size()));
  CHECK(r.str() == "all matched");
  CHECK(stores_equal(ps, fresh));
  // The module's own views see the loaded values.
  CHECK(vit2.cls_token.value.data()[0] == vit.cls_token.value.data()[0]);

  // A double store: F64 keeps it exact, the default F32 rounds.
  VisionTransformer<double> vd(tiny_vit());
  ParameterStore<double> psd(vd);
  psd.initialize(3);
  save_parameters(psd, dir.file("vit64.safetensors"), "", {}, SafetensorsDtype::F64);
  save_parameters(psd, dir.file("vit32.safetensors"));
  VisionTransformer<double> vd2(tiny_vit());
  ParameterStore<double> psd2(vd2);
  load_parameters(psd2, dir.file("vit64.safetensors"));
  CHECK(stores_equal(psd, psd2));
  load_parameters(psd2, dir.file("vit32.safetensors"));
  CHECK_FALSE(stores_equal(psd, psd2));
  for (std::int64_t i = 0; i < psd.num_trainable(); ++i)
    REQUIRE(psd2.values().data()[i] == static_cast<double>(static_cast<float>(psd.values().data()[i])));
  // Loading a float store from F64 and from BF16 converts.
  VisionTransformer<float> vf(tiny_vit());
  ParameterStore<float> psf(vf);
  load_parameters(psf, dir.file("vit64.safetensors"));
  CHECK(psf.values().data()[5] == static_cast<float>(psd.values().data()[5]));
  save_parameters(ps, dir.file("vit_bf16.safetensors"), "", {}, SafetensorsDtype::BF16);
  load_parameters(psf, dir.file("vit_bf16.safetensors"));
  for (std::int64_t i = 0; i < ps.num_trainable(); ++i)
    REQUIRE(psf.values().data()[i] ==
            static_cast<float>(detail::bf16_value(detail::bf16_bits(ps.values().data()[i]))));
}

TEST_CASE("load_parameters: strict mode lists every missing, unexpected and mis-shaped name") {
  TempDir dir("io");
  VisionTransformer<float> vit(tiny_vit());
  ParameterStore<float> ps(vit);
  ps.initialize(1);
  const std::string good = dir.file("good.safetensors");
  save_parameters(ps, good);
  const auto src = SafetensorsFile::open(good);

  // Rewrites the good file without `drop`, with an extra tensor and a re-shaped cls_token.
  const std::string bad = dir.file("bad.safetensors");
  {
    SafetensorsWriter w;
    for (const auto& t : src.tensors()) {
      if (t.name == "norm.bias" || t.name == "blocks.1.mlp.fc2.weight") continue;
      if (t.name == "cls_token") continue;
      w.add_raw(t.name, t.dtype, t.shape, src.raw(t.name));
    }
    w.add("cls_token", Tensor<float>({1, 1, 16}));
    w.add("head.weight", Tensor<float>({10, 8}));
    w.write(bad);
  }

  VisionTransformer<float> vit2(tiny_vit());
  ParameterStore<float> target(vit2);
  target.initialize(2);
  VisionTransformer<float> vit3(tiny_vit());
  ParameterStore<float> before(vit3);
  before.initialize(2);

  const std::string msg = error_of([&] { load_parameters(target, bad); });
  CHECK(contains(msg, bad));
  CHECK(contains(msg, "2 missing: blocks.1.mlp.fc2.weight, norm.bias"));
  CHECK(contains(msg, "1 unexpected: head.weight"));
  CHECK(contains(msg, "cls_token expected [1, 1, 8] found [1, 1, 16]"));
  CHECK(stores_equal(target, before));  // a failed strict load changes nothing

  // Not strict: the same findings, and everything else is loaded.
  const LoadReport r = load_parameters(target, bad, "", /*strict=*/false);
  CHECK_FALSE(r.ok());
  CHECK(r.missing == std::vector<std::string>{"blocks.1.mlp.fc2.weight", "norm.bias"});
  CHECK(r.unexpected == std::vector<std::string>{"head.weight"});
  REQUIRE(r.mismatched.size() == 1);
  CHECK(r.mismatched[0].name == "cls_token");
  CHECK(r.mismatched[0].expected == Shape{1, 1, 8});
  CHECK(r.mismatched[0].found == std::vector<std::int64_t>{1, 1, 16});
  CHECK(r.loaded == static_cast<std::int64_t>(ps.entries().size()) - 3);
  const auto* qkv = ps.find("blocks.0.attn.qkv.weight");
  CHECK(std::memcmp(target.view(*qkv).data(), ps.view(*qkv).data(), ps.view(*qkv).bytes()) == 0);
  const auto* nb = ps.find("norm.bias");
  CHECK(std::memcmp(target.view(*nb).data(), before.view(*nb).data(), before.view(*nb).bytes()) == 0);
}

TEST_CASE("load_parameters: prefixes select one model of a full checkpoint") {
  TempDir dir("io");
  VisionTransformer<float> student(tiny_vit()), teacher(tiny_vit());
  ParameterStore<float> ps(student), pt(teacher, /*with_grads=*/false);
  ps.initialize(1);
  pt.initialize(2);
  const std::string path = dir.file("checkpoint.safetensors");
  SafetensorsWriter w;
  add_parameters(w, ps, "encoder.");
  add_parameters(w, pt, "encoder_teacher.");
  w.add("decoder_pos_embed", Tensor<float>({1, 5, 8}));
  w.write(path);

  const auto file = SafetensorsFile::open(path);
  CHECK(file.contains("encoder_teacher.blocks.0.attn.qkv.weight"));
  CHECK(file.contains("encoder.pos_embed"));

  VisionTransformer<float> v(tiny_vit());
  ParameterStore<float> loaded(v);
  CHECK(load_parameters(loaded, file, "encoder_teacher.").ok());
  CHECK(stores_equal(loaded, pt));
  CHECK(load_parameters(loaded, path, "encoder.").ok());
  CHECK(stores_equal(loaded, ps));

  // Without a prefix every name is unexpected and every parameter missing.
  std::string msg = error_of([&] { load_parameters(loaded, path); });
  CHECK(contains(msg, path));
  CHECK(contains(msg, "unexpected: "));
  CHECK(contains(msg, "encoder_teacher.cls_token"));
  CHECK(contains(msg, "decoder_pos_embed"));
  // A wrong prefix finds nothing and says which prefixes the file has.
  msg = error_of([&] { load_parameters(loaded, path, "encoder_pred."); });
  CHECK(contains(msg, "under prefix 'encoder_pred.'"));
  CHECK(contains(msg, "encoder_pred.cls_token"));
  CHECK(contains(msg, "'encoder.' 'encoder_teacher.'"));
  // Saving with a prefix.
  save_parameters(pt, dir.file("teacher.safetensors"), "encoder_teacher.");
  CHECK(SafetensorsFile::open(dir.file("teacher.safetensors")).contains("encoder_teacher.norm.weight"));
}

TEST_CASE("safetensors: malformed files throw moca::Error naming the file, never crash") {
  TempDir dir("io");
  const std::string good_json =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}})";
  write_bytes(dir.file("ok.safetensors"), make_file(good_json, 16));
  CHECK(SafetensorsFile::open(dir.file("ok.safetensors")).size() == 2);

  struct Case {
    const char* name;
    std::string bytes;
    const char* expect;  // a part of the message
  };
  const std::string full = make_file(good_json, 16);
  const std::vector<Case> cases = {
      {"empty", "", "too short"},
      {"short", std::string("\x05\0\0", 3), "too short"},
      {"truncated_header", full.substr(0, 40), "exceeds"},
      {"truncated_data", full.substr(0, full.size() - 3), "data section"},
      {"trailing", full + "xyz", "data section"},
      {"length_too_big", make_file(good_json, 16, std::uint64_t{1} << 62), "header length"},
      {"length_huge", make_file(good_json, 16, ~std::uint64_t{0}), "header length"},
      {"not_json", make_file("{\"a\": nope}", 0), "not valid JSON"},
      {"not_object", make_file("[1, 2]", 0), "start with '{'"},
      {"trailing_garbage", make_file("{} }", 0), "not valid JSON"},
      {"nul_padding", make_file(std::string("{}") + std::string(6, '\0'), 0), "not valid JSON"},
      {"unknown_dtype",
       make_file(R"({"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2),
       "unsupported dtype 'F8_E4M3'"},
      {"dtype_not_string", make_file(R"({"a":{"dtype":32,"shape":[2],"data_offsets":[0,8]}})", 8),
       "no dtype"},
      {"no_shape", make_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), "no shape"},
      {"negative_shape", make_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "non-negative"},
      {"float_shape", make_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
       "non-negative integer"},
      {"shape_overflow",
       make_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
       "too large"},
      {"shape_offset_mismatch",
       make_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"},
      {"offsets_out_of_range",
       make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8),
       "outside the data section"},
      {"offsets_huge",
       make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,0]}})", 8),
       "end before"},
      {"offsets_reversed", make_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
       "end before"},
      {"offsets_not_pair", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
       "pair"},
      {"overlap",
       make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
       "overlap"},
      {"gap", make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "unused"},
      {"duplicate",
       make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
       "twice"},
      {"metadata_not_strings", make_file(R"({"__metadata__":{"step":3}})", 0), "not a string"},
      {"entry_not_object", make_file(R"({"a":[1,2]})", 0), "not an object"},
      {"bad_utf8", make_file("{\"a\xff\":{}}", 0), "not valid JSON"},
  };
  for (const Case& c : cases) {
    const std::string case_name = c.name;
    CAPTURE(case_name);
    const std::string path = dir.file(std::string(c.name) + ".safetensors");
    write_bytes(path, c.bytes);
    const std::string msg = error_of([&] { (void)SafetensorsFile::open(path); });
    CHECK(contains(msg, path));
    CHECK_MESSAGE(contains(msg, c.expect), msg);
  }

  // Missing files and directories.
  std::string msg = error_of([&] { (void)SafetensorsFile::open(dir.file("absent.safetensors")); });
  CHECK(contains(msg, dir.file("absent.safetensors")));
  CHECK(contains(msg, "cannot open"));
  msg = error_of([&] { (void)SafetensorsFile::open(dir.path); });
  CHECK(contains(msg, "directory"));
  // load_parameters passes the file's errors on.
  VisionTransformer<float> vit(tiny_vit());
  ParameterStore<float> ps(vit);
  msg = error_of([&] { load_parameters(ps, dir.file("overlap.safetensors")); });
  CHECK(contains(msg, dir.file("overlap.safetensors")));
  CHECK(contains(msg, "overlap"));
}

TEST_CASE("safetensors: writes are atomic") {
  TempDir dir("io");
  const std::string path = dir.file("model.safetensors");
  Tensor<float> a({4});
  a.data()[0] = 1.0f;
  SafetensorsWriter first;
  first.add("a", a);
  first.write(path);
  CHECK(fs::exists(path));
  CHECK_FALSE(fs::exists(path + ".tmp"));
  const auto old_bytes = read_bytes(path);

  // Replaced on success.
  SafetensorsWriter second;
  second.add("b", a);
  second.write(path);
  CHECK_FALSE(fs::exists(path + ".tmp"));
  CHECK(SafetensorsFile::open(path).contains("b"));
  CHECK_FALSE(SafetensorsFile::open(path).contains("a"));

  // A failed write (the temporary cannot be created) leaves the existing file as it was.
  first.write(path);
  fs::create_directory(path + ".tmp");
  std::string msg = error_of([&] { second.write(path); });
  CHECK(contains(msg, path + ".tmp"));
  CHECK(read_bytes(path) == old_bytes);
  fs::remove(path + ".tmp");

  // A failed rename (the target is a directory) removes the temporary.
  const std::string dir_target = dir.file("is_a_dir");
  fs::create_directory(dir_target);
  msg = error_of([&] { second.write(dir_target); });
  CHECK(contains(msg, dir_target));
  CHECK_FALSE(fs::exists(dir_target + ".tmp"));
  CHECK(fs::is_directory(dir_target));

  // A directory that does not exist.
  msg = error_of([&] { second.write(dir.file("no/such/dir/x.safetensors")); });
  CHECK(contains(msg, "no/such/dir"));

  // AtomicFileWriter abandoned before commit leaves nothing behind and the target untouched.
  {
    AtomicFileWriter out(path);
    out.write("partial", 7);
    CHECK(fs::exists(path + ".tmp"));
  }
  CHECK_FALSE(fs::exists(path + ".tmp"));
  CHECK(read_bytes(path) == old_bytes);
}
