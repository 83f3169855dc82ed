#include "checkpoints/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "checkpoints/durable_io.h"
#include "checkpoints/json_reader.h"
#include "nlohmann/json.hpp"
#include "worker/check.h"

namespace mamba::ckpt {
namespace {

using nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, before allocating.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

absl::Status Corrupt(const std::string& label, const std::string& problem) {
  return absl::DataLossError(absl::StrCat(label, ": ", problem));
}

// Product of dims times element size, or nullopt on overflow.
std::optional<size_t> ByteSize(const Shape& shape, size_t elem) {
  const std::optional<int64_t> n = CheckedNumElements(shape);
  int64_t bytes = 0;
  if (!n || __builtin_mul_overflow(*n, static_cast<int64_t>(elem), &bytes)) return std::nullopt;
  return static_cast<size_t>(bytes);
}

absl::StatusOr<TensorEntry> ParseEntry(const std::string& label, const std::string& name,
                                       const json& v) {
  const std::string where = absl::StrCat("tensor \"", name, "\": ");
  if (!v.is_object()) return Corrupt(label, where + "header entry is not an object");
  for (const auto& [key, unused] : v.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      return Corrupt(label, absl::StrCat(where, "unknown header field \"", key, "\""));
    }
  }
  TensorEntry e;
  e.name = name;
  if (!v.contains("dtype") || !v["dtype"].is_string()) {
    return Corrupt(label, where + "missing or non-string dtype");
  }
  e.dtype = v["dtype"].get<std::string>();
  const auto elem = SafetensorsDTypeSize(e.dtype);
  if (!elem) return Corrupt(label, absl::StrCat(where, "unknown dtype \"", e.dtype, "\""));
  if (!v.contains("shape") || !v["shape"].is_array()) {
    return Corrupt(label, where + "missing or non-array shape");
  }
  for (const json& d : v["shape"]) {
    if (!d.is_number_unsigned()) return Corrupt(label, where + "shape holds a non-natural number");
    const uint64_t u = d.get<uint64_t>();
    if (u > uint64_t{1} << 62) return Corrupt(label, where + "shape dimension too large");
    e.shape.push_back(static_cast<int64_t>(u));
  }
  const json* off = v.contains("data_offsets") ? &v["data_offsets"] : nullptr;
  if (off == nullptr || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    return Corrupt(label, where + "data_offsets must be [begin, end] natural numbers");
  }
  e.begin = (*off)[0].get<uint64_t>();
  e.end = (*off)[1].get<uint64_t>();
  if (e.end < e.begin) {
    return Corrupt(label, absl::StrCat(where, "data_offsets end ", e.end, " < begin ", e.begin));
  }
  const auto bytes = ByteSize(e.shape, *elem);
  if (!bytes || *bytes != e.end - e.begin) {
    return Corrupt(label, absl::StrCat(where, "shape ", ShapeString(e.shape), " of ", e.dtype,
                                       " needs ", bytes ? absl::StrCat(*bytes) : "too many",
                                       " bytes but data_offsets span ", e.end - e.begin));
  }
  return e;
}

// float32 bits <-> float.
uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
T ReadLE(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // the project targets little-endian hosts only
  return v;
}

}  // namespace

std::optional<size_t> SafetensorsDTypeSize(std::string_view dtype) {
  static const std::map<std::string_view, size_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  auto it = kSizes.find(dtype);
  if (it == kSizes.end()) return std::nullopt;
  return it->second;
}

const char* SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF64:
      return "F64";
    case DType::kBF16:
      return "BF16";
    case DType::kI32:
      return "I32";
  }
  return "?";
}

uint16_t FloatToBf16(float f) {
  const uint32_t u = Bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float Bf16ToFloat(uint16_t b) { return FromBits(uint32_t{b} << 16); }

float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return FromBits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return FromBits(sign);
    // Subnormal: normalize.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    return FromBits(sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13);
  }
  return FromBits(sign | (exp + 127 - 15) << 23 | mant << 13);
}

absl::StatusOr<SafetensorsReader> SafetensorsReader::Open(const std::string& path) {
  auto bytes = ReadWholeFile(path);
  if (!bytes.ok()) return bytes.status();
  return Parse(std::move(*bytes), path);
}

absl::StatusOr<SafetensorsReader> SafetensorsReader::Parse(std::string bytes, std::string label) {
  SafetensorsReader r;
  r.label_ = std::move(label);
  r.bytes_ = std::move(bytes);
  const std::string& b = r.bytes_;
  if (b.size() < 8) {
    return Corrupt(r.label_, absl::StrCat("file is ", b.size(),
                                          " bytes, too short for the 8-byte header length"));
  }
  const uint64_t n = ReadLE<uint64_t>(b.data());
  if (n > b.size() - 8) {
    return Corrupt(r.label_, absl::StrCat("header length ", n, " exceeds the ", b.size() - 8,
                                          " bytes after it (truncated file or corrupt length)"));
  }
  if (n > kMaxHeaderBytes) {
    return Corrupt(r.label_, absl::StrCat("header length ", n, " exceeds the 100 MB limit"));
  }
  auto parsed =
      ParseJsonBounded(std::string_view(reinterpret_cast<const char*>(b.data()) + 8, n), "header");
  if (!parsed.ok()) return Corrupt(r.label_, std::string(parsed.status().message()));
  const json& header = *parsed;
  if (!header.is_object()) return Corrupt(r.label_, "header is not a JSON object");
  r.data_start_ = 8 + n;
  const size_t data_size = b.size() - r.data_start_;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) return Corrupt(r.label_, "__metadata__ is not an object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) {
          return Corrupt(r.label_,
                         absl::StrCat("__metadata__ value of \"", mk, "\" is not a string"));
        }
        r.metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    auto e = ParseEntry(r.label_, key, value);
    if (!e.ok()) return e.status();
    if (e->end > data_size) {
      return Corrupt(r.label_,
                     absl::StrCat("tensor \"", key, "\": data_offsets [", e->begin, ", ", e->end,
                                  "] out of range of the ", data_size, "-byte data buffer"));
    }
    r.entries_.push_back(std::move(*e));
  }
  // The tensors must tile the buffer exactly: no overlap, no gap, nothing after the last.
  std::sort(r.entries_.begin(), r.entries_.end(), [](const TensorEntry& x, const TensorEntry& y) {
    return std::tie(x.begin, x.end, x.name) < std::tie(y.begin, y.end, y.name);
  });
  size_t pos = 0;
  const TensorEntry* prev = nullptr;
  for (const TensorEntry& e : r.entries_) {
    if (e.begin < pos) {
      return Corrupt(r.label_, absl::StrCat("tensors \"", prev->name, "\" and \"", e.name,
                                            "\" overlap in the data buffer"));
    }
    if (e.begin > pos) {
      return Corrupt(r.label_, absl::StrCat("gap of ", e.begin - pos, " bytes before tensor \"",
                                            e.name, "\" in the data buffer"));
    }
    pos = e.end;
    if (e.end > e.begin) prev = &e;
  }
  if (pos != data_size) {
    return Corrupt(r.label_, absl::StrCat("tensors cover ", pos, " bytes but the data buffer has ",
                                          data_size));
  }
  return r;
}

const TensorEntry* SafetensorsReader::Find(std::string_view name) const {
  for (const TensorEntry& e : entries_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

std::string_view SafetensorsReader::Bytes(const TensorEntry& e) const {
  return std::string_view(bytes_).substr(data_start_ + e.begin, e.end - e.begin);
}

absl::StatusOr<Tensor> SafetensorsReader::Load(std::string_view name, DType dtype) const {
  const TensorEntry* e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(label_, ": missing tensor \"", std::string(name), "\""));
  }
  Tensor t = Tensor::Empty(e->shape, dtype);
  const char* src = Bytes(*e).data();
  const int64_t n = t.numel();
  const bool float_out = dtype == DType::kF32 || dtype == DType::kF64;
  auto store = [&](auto read) {
    if (dtype == DType::kF32) {
      float* out = t.data<float>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(read(i));
    } else {
      double* out = t.data<double>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(read(i));
    }
  };
  if (float_out && e->dtype == "F32") {
    store([&](int64_t i) { return ReadLE<float>(src + 4 * i); });
  } else if (float_out && e->dtype == "F64") {
    store([&](int64_t i) { return ReadLE<double>(src + 8 * i); });
  } else if (float_out && e->dtype == "BF16") {
    store([&](int64_t i) { return Bf16ToFloat(ReadLE<uint16_t>(src + 2 * i)); });
  } else if (float_out && e->dtype == "F16") {
    store([&](int64_t i) { return HalfToFloat(ReadLE<uint16_t>(src + 2 * i)); });
  } else if (dtype == DType::kI32 && e->dtype == "I32") {
    std::memcpy(t.raw(), src, t.nbytes());
  } else if (dtype == DType::kBF16 && e->dtype == "BF16") {
    std::memcpy(t.raw(), src, t.nbytes());
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(label_, ": tensor \"", std::string(name), "\" has dtype ", e->dtype,
                     ", which cannot be loaded as ", DTypeName(dtype)));
  }
  return t;
}

void SafetensorsWriter::Add(const std::string& name, const Tensor& host, bool as_bf16) {
  MAMBA_CHECK(host.device() == Device::kCPU) << name;
  MAMBA_CHECK(!as_bf16 || host.dtype() == DType::kF32) << name << ": bf16 only from float32";
  std::string bytes;
  if (as_bf16) {
    bytes.resize(host.numel() * 2);
    const float* src = host.data<float>();
    for (int64_t i = 0; i < host.numel(); ++i) {
      const uint16_t h = FloatToBf16(src[i]);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  } else {
    bytes.assign(static_cast<const char*>(host.raw()), host.nbytes());
  }
  AddRaw(name, as_bf16 ? "BF16" : SafetensorsDTypeName(host.dtype()), host.shape(),
         std::move(bytes));
}

void SafetensorsWriter::AddRaw(const std::string& name, const std::string& dtype, Shape shape,
                               std::string bytes) {
  MAMBA_CHECK(name != "__metadata__");
  for (const Pending& p : pending_) MAMBA_CHECK(p.name != name) << "duplicate tensor " << name;
  const auto elem = SafetensorsDTypeSize(dtype);
  MAMBA_CHECK(elem.has_value()) << dtype;
  MAMBA_CHECK(ByteSize(shape, *elem) == bytes.size()) << name << ": byte count vs shape";
  pending_.push_back({name, dtype, std::move(shape), std::move(bytes)});
}

std::string SafetensorsWriter::Serialize() const {
  std::vector<const Pending*> order;
  for (const Pending& p : pending_) order.push_back(&p);
  std::stable_sort(order.begin(), order.end(), [](const Pending* a, const Pending* b) {
    const size_t sa = *SafetensorsDTypeSize(a->dtype), sb = *SafetensorsDTypeSize(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  json header = json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  size_t offset = 0;
  for (const Pending* p : order) {
    header[p->name] = {{"dtype", p->dtype},
                       {"shape", p->shape},
                       {"data_offsets", {offset, offset + p->bytes.size()}}};
    offset += p->bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');  // data starts 8-byte aligned
  std::string out(8, '\0');
  const uint64_t n = text.size();
  std::memcpy(out.data(), &n, 8);
  out += text;
  out.reserve(out.size() + offset);
  for (const Pending* p : order) out += p->bytes;
  return out;
}

}  // namespace mamba::ckpt
