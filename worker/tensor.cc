#include "worker/tensor.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

#include "worker/check.h"

namespace mamba {
namespace {

std::mutex allocator_mutex;
DeviceAllocator allocators[2];

std::shared_ptr<void> CpuAllocate(size_t bytes) {
  // 64-byte alignment suits AVX-512 loads and cache lines; never return null for 0 bytes.
  size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  MAMBA_CHECK(p != nullptr) << "out of host memory allocating " << bytes << " bytes";
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

}  // namespace

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kF64:
      return 8;
    case DType::kBF16:
      return 2;
    case DType::kI32:
      return 4;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "float32";
    case DType::kF64:
      return "float64";
    case DType::kBF16:
      return "bfloat16";
    case DType::kI32:
      return "int32";
  }
  return "?";
}

const char* DeviceName(Device device) { return device == Device::kCPU ? "cpu" : "cuda"; }

// Plain std::ostringstream rather than Abseil: tensors also build in kernels-only mode.
std::string ShapeString(const Shape& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ")";
  return out.str();
}

std::optional<int64_t> CheckedNumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
  }
  return n;
}

int64_t NumElements(const Shape& shape) {
  const std::optional<int64_t> n = CheckedNumElements(shape);
  MAMBA_CHECK(n.has_value()) << "shape " << ShapeString(shape) << " has no element count";
  return *n;
}

void RegisterAllocator(Device device, DeviceAllocator allocator) {
  std::lock_guard<std::mutex> lock(allocator_mutex);
  allocators[static_cast<int>(device)] = std::move(allocator);
}

Tensor Tensor::Empty(Shape shape, DType dtype, Device device) {
  for (int64_t d : shape) MAMBA_CHECK(d >= 0) << "negative dimension in " << ShapeString(shape);
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  size_t bytes = t.nbytes();
  if (device == Device::kCPU) {
    t.buffer_ = CpuAllocate(bytes);
  } else {
    DeviceAllocator alloc;
    {
      std::lock_guard<std::mutex> lock(allocator_mutex);
      alloc = allocators[static_cast<int>(device)];
    }
    MAMBA_CHECK(alloc) << "no allocator registered for device " << DeviceName(device);
    t.buffer_ = alloc(bytes);
  }
  return t;
}

Tensor Tensor::Over(std::shared_ptr<void> buffer, Shape shape, DType dtype, Device device) {
  for (int64_t d : shape) MAMBA_CHECK(d >= 0) << "negative dimension in " << ShapeString(shape);
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.buffer_ = std::move(buffer);
  return t;
}

Tensor Tensor::Zeros(Shape shape, DType dtype) {
  Tensor t = Empty(std::move(shape), dtype, Device::kCPU);
  std::memset(t.raw(), 0, t.nbytes());
  return t;
}

Tensor Tensor::View(int64_t offset, Shape shape) const {
  for (int64_t d : shape) MAMBA_CHECK(d >= 0) << "negative dimension in " << ShapeString(shape);
  const int64_t n = NumElements(shape);
  MAMBA_CHECK(defined() && offset >= 0 && offset + n <= numel())
      << "view " << ShapeString(shape) << " at element " << offset << " of " << DebugString();
  Tensor t = *this;
  // The aliasing constructor: owns what buffer_ owns, points offset elements further.
  t.buffer_ = std::shared_ptr<void>(buffer_,
                                    static_cast<char*>(buffer_.get()) + offset * DTypeSize(dtype_));
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::Slice(int64_t begin, int64_t end) const {
  MAMBA_CHECK(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0])
      << "slice [" << begin << ", " << end << ") of " << DebugString();
  const int64_t row = shape_[0] == 0 ? 0 : numel() / shape_[0];
  Shape shape = shape_;
  shape[0] = end - begin;
  return View(begin * row, std::move(shape));
}

Tensor Tensor::Reshape(Shape shape) const {
  MAMBA_CHECK(NumElements(shape) == numel())
      << "reshape " << ShapeString(shape_) << " to " << ShapeString(shape);
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

std::string Tensor::DebugString() const {
  std::ostringstream out;
  out << "Tensor" << ShapeString(shape_) << " " << DTypeName(dtype_) << " " << DeviceName(device_);
  return out.str();
}

void CheckSameShape(const Tensor& a, const Tensor& b, const char* what) {
  MAMBA_CHECK(a.shape() == b.shape())
      << what << ": " << a.DebugString() << " vs " << b.DebugString();
}

void Tensor::CheckDType(DType expected) const {
  MAMBA_CHECK(defined()) << "access to an undefined tensor";
  MAMBA_CHECK(dtype_ == expected) << "tensor is " << DTypeName(dtype_) << ", accessed as "
                                  << DTypeName(expected);
}

}  // namespace mamba
