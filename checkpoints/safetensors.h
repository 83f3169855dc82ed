// The safetensors format (https://github.com/huggingface/safetensors), read and written by the
// project itself: an 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the byte buffer that the offsets index. The reader trusts nothing in the file: every
// offset, shape and dtype is checked before a byte of data is used.
#pragma once

#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/tensor.h"

namespace mamba::ckpt {

// Bytes per element of a safetensors dtype name ("F32", "BF16", ...); nullopt if unknown.
std::optional<size_t> SafetensorsDTypeSize(std::string_view dtype);
// The safetensors name of a tensor dtype ("F32" for kF32).
const char* SafetensorsDTypeName(DType dtype);

// float32 <-> bfloat16 / float16 bit conversions (round to nearest even; NaN stays NaN).
uint16_t FloatToBf16(float f);
float Bf16ToFloat(uint16_t b);
float HalfToFloat(uint16_t h);

struct TensorEntry {
  std::string name;
  std::string dtype;  // safetensors name
  Shape shape;
  size_t begin = 0, end = 0;  // offsets into the data buffer
};

class SafetensorsReader {
 public:
  // Reads and validates a whole file. Errors name the file: NOT_FOUND if it is missing,
  // DATA_LOSS for anything malformed.
  static absl::StatusOr<SafetensorsReader> Open(const std::string& path);
  // Same checks on bytes in memory; `label` names them in errors.
  static absl::StatusOr<SafetensorsReader> Parse(std::string bytes, std::string label);

  const std::string& label() const { return label_; }
  const std::vector<TensorEntry>& tensors() const { return entries_; }  // in data order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorEntry* Find(std::string_view name) const;
  std::string_view Bytes(const TensorEntry& e) const;

  // A host tensor of `dtype`: floating dtypes (F64/F32/F16/BF16) convert to kF32 or kF64,
  // I32 loads as kI32. Anything else is INVALID_ARGUMENT naming the file and tensor.
  absl::StatusOr<Tensor> Load(std::string_view name, DType dtype) const;

 private:
  std::string label_;
  std::string bytes_;  // the whole file
  size_t data_start_ = 0;
  std::vector<TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // Stores a host tensor as its own dtype, or an F32 tensor as BF16 when `as_bf16`.
  void Add(const std::string& name, const Tensor& host, bool as_bf16 = false);
  // Stores raw little-endian bytes under a safetensors dtype name (e.g. "I64" scalars).
  void AddRaw(const std::string& name, const std::string& dtype, Shape shape, std::string bytes);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // The file's bytes. Tensors are laid out by element size, largest first, so that every tensor
  // starts aligned to its element size once the header is padded to 8 bytes.
  std::string Serialize() const;

 private:
  struct Pending {
    std::string name, dtype;
    Shape shape;
    std::string bytes;
  };
  std::vector<Pending> pending_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace mamba::ckpt
