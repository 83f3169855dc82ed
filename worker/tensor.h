// A tensor is a shape, a dtype, a device and a shared buffer. It is a handle: copies share the
// buffer (like torch.Tensor), so ops take outputs as `Tensor&` and write through them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace mamba {

enum class DType : uint8_t { kF32, kF64, kBF16, kI32 };
enum class Device : uint8_t { kCPU, kCUDA };

size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);
const char* DeviceName(Device device);

template <typename T>
constexpr DType DTypeOf();
template <>
constexpr DType DTypeOf<float>() {
  return DType::kF32;
}
template <>
constexpr DType DTypeOf<double>() {
  return DType::kF64;
}
template <>
constexpr DType DTypeOf<int32_t>() {
  return DType::kI32;
}

using Shape = std::vector<int64_t>;
std::string ShapeString(const Shape& shape);
// The number of elements of `shape`: the one place element counts are computed. Checked aborts
// on negative dimensions or a count beyond int64 (a programming error: shapes from files are
// checked with CheckedNumElements first).
int64_t NumElements(const Shape& shape);
// The number of elements, or nullopt when a dimension is negative or the running product of the
// dimensions (in order, zeros included) leaves int64.
std::optional<int64_t> CheckedNumElements(const Shape& shape);

// Allocates `bytes` on a device and returns a deleter-owning pointer. The CPU allocator is built
// in; a GPU backend registers its own for Device::kCUDA.
using DeviceAllocator = std::function<std::shared_ptr<void>(size_t bytes)>;
void RegisterAllocator(Device device, DeviceAllocator allocator);

class Tensor {
 public:
  Tensor() = default;  // undefined: the "absent" value of optional op arguments
  static Tensor Empty(Shape shape, DType dtype, Device device = Device::kCPU);
  // A tensor over `buffer` (at least the shape's bytes, on `device`), which it shares ownership of:
  // for backends that hand out memory of their own (pinned host staging buffers).
  static Tensor Over(std::shared_ptr<void> buffer, Shape shape, DType dtype, Device device);
  // Zero-filled; CPU only (device backends zero with their own ops).
  static Tensor Zeros(Shape shape, DType dtype);

  bool defined() const { return buffer_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return NumElements(shape_); }
  // Rows when seen as a (rows, last dimension) matrix, as the ops see activations.
  int64_t rows() const { return dim(-1) == 0 ? 0 : numel() / dim(-1); }
  size_t nbytes() const { return numel() * DTypeSize(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  void* raw() const { return buffer_.get(); }
  // Typed access; checks the dtype (a mismatch is a programming error and aborts).
  template <typename T>
  T* data() const {
    CheckDType(DTypeOf<T>());
    return static_cast<T*>(buffer_.get());
  }

  // Same buffer, new shape with the same number of elements.
  Tensor Reshape(Shape shape) const;
  // `shape` elements starting `offset` elements in: a view that shares (and keeps alive) this
  // tensor's buffer, on any device. Must lie within this tensor.
  Tensor View(int64_t offset, Shape shape) const;
  // Entries [begin, end) of the leading dimension (a View).
  Tensor Slice(int64_t begin, int64_t end) const;
  std::string DebugString() const;

 private:
  void CheckDType(DType expected) const;

  std::shared_ptr<void> buffer_;
  Shape shape_;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCPU;
};

// Aborts, naming `what` and both tensors, unless a and b have the same shape.
void CheckSameShape(const Tensor& a, const Tensor& b, const char* what);

}  // namespace mamba
