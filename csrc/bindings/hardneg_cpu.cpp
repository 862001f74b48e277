// The _C module: CPU kernels and their run-time ISA choice. Forwards only; arguments were checked
// once in Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../cpu/cpu_isa.h"
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
  m.def(
      "hardneg_round",
      [](uintptr_t x, uintptr_t y, int64_t n, int32_t dtype) {
        hardneg::hardneg_round_cpu(reinterpret_cast<const float*>(x), reinterpret_cast<void*>(y), n,
                                   dtype);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::arg("dtype"),
      py::call_guard<py::gil_scoped_release>());

  // ISA variants (csrc/cpu/cpu_isa.h). std::invalid_argument arrives in Python as ValueError.
  m.def("cpu_isa", &hardneg::cpu_isa);
  m.def("cpu_isas_compiled", &hardneg::cpu_isas_compiled);
  m.def("cpu_isas_supported", &hardneg::cpu_isas_supported);
  m.def("set_cpu_isa", &hardneg::set_cpu_isa, py::arg("isa"));
  m.def("cpu_isa_features", &hardneg::cpu_isa_features, py::arg("isa"));
  m.def(
      "cpu_isa_problem",
      [](const std::string& isa, const std::vector<std::string>& present) {
        return hardneg::cpu_isa_problem(isa, hardneg::cpu_feature_bits(present));
      },
      py::arg("isa"), py::arg("present"));
  m.def("cpu_features_present",
        [] { return hardneg::cpu_feature_names(hardneg::cpu_features_present()); });
}
