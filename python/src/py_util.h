// Helpers of the Python extension: numpy arrays <-> mamba::Tensor without copies, and the
// checks that turn a wrong dtype or shape into a ValueError naming the argument.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "mamba/error.h"
#include "mamba/tensor.h"

namespace mambapy {

namespace py = pybind11;

// A float32 numpy array as a Tensor over the same memory (no copy). A non-C-contiguous array is
// copied into a contiguous one first (numpy's ascontiguousarray); any other dtype is a
// mamba::Error (ValueError) naming `what`: no silent conversion. `keep` receives the array that
// owns the memory: the caller keeps it alive as long as the Tensor is used.
// writable: the Tensor will be written (decode state, gradients): a copy would lose the writes,
// so a non-contiguous or read-only array is an error instead.
inline mamba::Tensor tensor_of(const py::handle& obj, const char* what, py::list& keep,
                               bool writable = false) {
  if (!py::isinstance<py::array>(obj))
    throw mamba::Error(mamba::str(what, ": expected a numpy array (float32), got ",
                                  std::string(py::str(py::type::of(obj)))));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<float>()))
    throw mamba::Error(mamba::str(what, ": expected dtype float32, got ",
                                  std::string(py::str(arr.dtype())),
                                  " (mambacpp computes in float32: convert explicitly)"));
  const bool contiguous = (arr.flags() & py::array::c_style) != 0;
  if (writable) {
    if (!contiguous)
      throw mamba::Error(mamba::str(what, ": must be C-contiguous (it is written in place)"));
    if (!arr.writeable()) throw mamba::Error(mamba::str(what, ": array is read-only"));
  } else if (!contiguous) {
    arr = py::array::ensure(arr, py::array::c_style);
  }
  mamba::Shape shape(arr.shape(), arr.shape() + arr.ndim());
  keep.append(arr);
  // Tensor::wrap takes float*; a read-only input is only read by the library.
  auto* ptr = static_cast<float*>(const_cast<void*>(arr.data()));
  return mamba::Tensor::wrap(ptr, shape);
}

// A Tensor as a numpy array sharing its storage (no copy); the array keeps the storage alive.
inline py::array array_of(const mamba::Tensor& t0) {
  mamba::Tensor t = t0.contiguous();
  auto* holder = new mamba::Tensor(t);
  py::capsule owner(holder, [](void* p) { delete static_cast<mamba::Tensor*>(p); });
  std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end());
  return py::array_t<float>(shape, holder->numel() ? holder->data() : nullptr, owner);
}

// A view of a Tensor owned by a C++ object `owner` (a layer's parameter, a state): writes through
// the array change the Tensor. The array keeps `owner` (a Python object) alive.
inline py::array view_of(mamba::Tensor& t, const py::handle& owner) {
  std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end());
  return py::array_t<float>(shape, t.data(), owner);
}

}  // namespace mambapy
