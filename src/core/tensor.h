// Tensor: a strided 2-D view of backend memory. Rows are tokens unless said otherwise; `stride` is
// the distance between rows in elements (>= cols), so a column range of a wider buffer is a view.
// Where the memory lives is part of the view: ops check it, host code never dereferences device
// memory.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace sp {

enum class Device : uint8_t { kHost, kCuda };

struct Tensor {
  void* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t stride = 0;  // elements from one row to the next
  DType dtype = DType::kF32;
  Device device = Device::kHost;

  // A contiguous [rows, cols] view of existing memory.
  static Tensor of(void* p, int64_t rows, int64_t cols, DType dt = DType::kF32,
                   Device dev = Device::kHost) {
    return Tensor{p, rows, cols, cols, dt, dev};
  }
  static Tensor of(float* p, int64_t rows, int64_t cols) {
    return of(static_cast<void*>(p), rows, cols, DType::kF32, Device::kHost);
  }
  int64_t elem_size() const { return dtype_size(dtype); }
  bool contiguous() const { return stride == cols || rows <= 1; }
  int64_t numel() const { return rows * cols; }
  // Bytes from the first element to one past the last row's last element.
  int64_t span_bytes() const { return rows == 0 ? 0 : ((rows - 1) * stride + cols) * elem_size(); }

  template <typename T>
  T* ptr(int64_t r = 0) const {
    return static_cast<T*>(data) + r * stride;
  }
  // fp32 rows (the CPU backend's activations).
  float* row(int64_t r) const { return static_cast<float*>(data) + r * stride; }
  float* f32() const { return static_cast<float*>(data); }

  Tensor slice_rows(int64_t begin, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<uint8_t*>(data) + begin * stride * elem_size();
    t.rows = n;
    return t;
  }
  Tensor slice_cols(int64_t begin, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<uint8_t*>(data) + begin * elem_size();
    t.cols = n;
    return t;
  }
  // The same memory read as a contiguous [rows, cols] (a workspace reused at another width).
  Tensor view(int64_t r, int64_t c) const { return Tensor{data, r, c, c, dtype, device}; }
};

}  // namespace sp
