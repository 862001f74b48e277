// The _C module: CPU kernels. Forwards only; arguments were checked once in Python.
#include <pybind11/pybind11.h>

#include "../cpu/hardneg_loss.h"
#include "params.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "hardneg CPU kernels (no libtorch: pointers, sizes and scalars cross the boundary)";
  hardneg::bind_params(m);
  namespace py = pybind11;
  m.def("hardneg_loss_rows", &hardneg::hardneg_loss_rows_cpu,
        py::call_guard<py::gil_scoped_release>());
  m.def("hardneg_loss_block_update", &hardneg::hardneg_loss_block_update_cpu,
        py::call_guard<py::gil_scoped_release>());
  m.def("hardneg_loss_block_grad", &hardneg::hardneg_loss_block_grad_cpu,
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "hardneg_exp",
      [](uintptr_t x, uintptr_t y, int64_t n) {
        hardneg::hardneg_exp_cpu(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), n);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::call_guard<py::gil_scoped_release>());
}
