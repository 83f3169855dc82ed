// The safetensors module: round trips of every dtype and shape, bf16/f16 conversions, and a
// clear DATA_LOSS error naming the file for every kind of corrupt file.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "checkpoints/safetensors.h"
#include "tests/test_util.h"

namespace mamba::ckpt {
namespace {

Tensor Filled(const Shape& shape, DType dtype, uint64_t seed) {
  Tensor t = Tensor::Empty(shape, dtype);
  const auto v = testing::RandomVector(t.numel(), seed, -100, 100);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (dtype == DType::kF32) t.data<float>()[i] = float(v[i]);
    if (dtype == DType::kF64) t.data<double>()[i] = v[i];
    if (dtype == DType::kI32) t.data<int32_t>()[i] = int32_t(v[i] * 1000);
  }
  return t;
}

// A file from a header text and a data buffer, as a corrupt writer might produce.
std::string RawFile(const std::string& header, const std::string& data, int64_t length = -1) {
  std::string out(8, '\0');
  const uint64_t n = length < 0 ? header.size() : uint64_t(length);
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

absl::Status ParseError(const std::string& bytes) {
  return SafetensorsReader::Parse(bytes, "bad.safetensors").status();
}

void ExpectCorrupt(const std::string& bytes, const std::string& needle) {
  const absl::Status s = ParseError(bytes);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("bad.safetensors: "), std::string::npos) << s;
  EXPECT_NE(s.message().find(needle), std::string::npos)
      << "expected \"" << needle << "\" in " << s.message();
}

TEST(Safetensors, RoundTripsEveryDtypeAndShape) {
  const std::vector<Shape> shapes = {{}, {0}, {1}, {7}, {2, 3}, {2, 0, 4}, {1, 2, 3, 5}};
  SafetensorsWriter w;
  std::vector<std::pair<std::string, Tensor>> written;
  uint64_t seed = 1;
  for (DType dtype : {DType::kF32, DType::kF64, DType::kI32}) {
    for (const Shape& shape : shapes) {
      const std::string name = std::string(DTypeName(dtype)) + ShapeString(shape);
      written.emplace_back(name, Filled(shape, dtype, seed++));
      w.Add(name, written.back().second);
    }
  }
  w.SetMetadata("format", "pt");
  const std::string bytes = w.Serialize();
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ((8 + header_len) % 8, 0u) << "data must start 8-byte aligned";

  auto r = SafetensorsReader::Parse(bytes, "mem");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->metadata().at("format"), "pt");
  ASSERT_EQ(r->tensors().size(), written.size());
  for (const auto& [name, t] : written) {
    const TensorEntry* e = r->Find(name);
    ASSERT_NE(e, nullptr) << name;
    EXPECT_EQ(e->begin % DTypeSize(t.dtype()), 0u) << name << " is not element-aligned";
    auto back = r->Load(name, t.dtype());
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->shape(), t.shape()) << name;
    EXPECT_EQ(std::memcmp(back->raw(), t.raw(), t.nbytes()), 0) << name;
  }
}

TEST(Safetensors, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.00390625f), 0x3f80);   // halfway, round to even (down)
  EXPECT_EQ(FloatToBf16(1.01171875f), 0x3f82);   // halfway, round to even (up)
  EXPECT_EQ(FloatToBf16(1.005859375f), 0x3f81);  // above halfway
  EXPECT_EQ(FloatToBf16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToBf16(INFINITY), 0x7f80);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));

  Tensor t = Filled({3, 5}, DType::kF32, 9);
  SafetensorsWriter w;
  w.Add("w", t, /*as_bf16=*/true);
  auto r = SafetensorsReader::Parse(w.Serialize(), "mem");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->Find("w")->dtype, "BF16");
  auto back = r->Load("w", DType::kF32);
  ASSERT_TRUE(back.ok());
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float x = t.data<float>()[i], y = back->data<float>()[i];
    EXPECT_EQ(y, Bf16ToFloat(FloatToBf16(x)));
    EXPECT_LE(std::abs(x - y), std::abs(x) * (1.0f / 256));  // 8 significant bits
  }
}

TEST(Safetensors, LoadsF16AsFloat) {
  const uint16_t halves[] = {0x3c00, 0x0001, 0xc000, 0x7c00, 0x3555, 0x8000};
  SafetensorsWriter w;
  w.AddRaw("h", "F16", {6}, std::string(reinterpret_cast<const char*>(halves), sizeof(halves)));
  auto r = SafetensorsReader::Parse(w.Serialize(), "mem");
  ASSERT_TRUE(r.ok());
  auto t = r->Load("h", DType::kF32);
  ASSERT_TRUE(t.ok());
  const float* f = t->data<float>();
  EXPECT_EQ(f[0], 1.0f);
  EXPECT_EQ(f[1], std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f[2], -2.0f);
  EXPECT_EQ(f[3], INFINITY);
  EXPECT_NEAR(f[4], 1.0 / 3, 1e-3);
  EXPECT_TRUE(std::signbit(f[5]));
}

TEST(Safetensors, RefusesLossyOrMismatchedLoads) {
  SafetensorsWriter w;
  w.Add("i", Filled({2}, DType::kI32, 1));
  auto r = SafetensorsReader::Parse(w.Serialize(), "x.safetensors");
  ASSERT_TRUE(r.ok());
  const absl::Status s = r->Load("i", DType::kF32).status();
  EXPECT_NE(s.message().find("x.safetensors: tensor \"i\" has dtype I32"), std::string::npos) << s;
  EXPECT_EQ(r->Load("nope", DType::kF32).status().code(), absl::StatusCode::kNotFound);
}

TEST(Safetensors, MissingFileIsNotFound) {
  const absl::Status s = SafetensorsReader::Open("/nonexistent/m.safetensors").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("/nonexistent/m.safetensors"), std::string::npos);
}

TEST(Safetensors, EveryCorruptionIsAClearError) {
  const std::string ok_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string data(8, '\1');
  ASSERT_TRUE(SafetensorsReader::Parse(RawFile(ok_header, data), "ok").ok());

  SafetensorsWriter w;
  w.Add("t", Filled({4, 4}, DType::kF32, 3));
  const std::string good = w.Serialize();
  ExpectCorrupt(good.substr(0, 5), "too short for the 8-byte header length");
  ExpectCorrupt(good.substr(0, 40), "exceeds the");                // truncated in the header
  ExpectCorrupt(good.substr(0, good.size() - 1), "out of range");  // truncated in the data
  ExpectCorrupt(good + "xx", "tensors cover 64 bytes but the data buffer has 66");
  ExpectCorrupt(RawFile(ok_header, data, 1000), "header length 1000 exceeds");
  ExpectCorrupt(RawFile("{\"a\": [1,", data), "header: not valid JSON");
  ExpectCorrupt(RawFile("[1, 2]", ""), "header is not a JSON object");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data),
                "data_offsets [0, 16] out of range of the 8-byte data buffer");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                        data),
                "overlap");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data),
                "gap of 4 bytes before tensor \"a\"");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", data),
                "unknown dtype \"Q7\"");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data),
                "shape (3) of F32 needs 12 bytes but data_offsets span 8");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data),
                "non-natural");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data),
                "end 0 < begin 8");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[2]}})", data), "data_offsets must be");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", data),
                "unknown header field \"x\"");
  ExpectCorrupt(RawFile(R"({"__metadata__":{"k":1}})", ""), "__metadata__ value of \"k\"");
  ExpectCorrupt(RawFile(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],)"
                        R"("data_offsets":[0,8]}})",
                        data),
                "needs too many bytes");
}

}  // namespace
}  // namespace mamba::ckpt
