// pybind11 view of HardnegLossParams shared by the _C and _C_cuda modules: pointers cross the
// boundary as integers (tensor.data_ptr()), everything else as plain numbers.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "hardneg/hardneg_loss.h"

namespace hardneg {

#define HARDNEG_PTR_FIELD(cls, T, name)                                                      \
  cls.def_property(                                                                          \
      #name, [](const HardnegLossParams& p) { return reinterpret_cast<uintptr_t>(p.name); }, \
      [](HardnegLossParams& p, uintptr_t v) { p.name = reinterpret_cast<T>(v); })

inline void bind_params(pybind11::module_& m) {
  namespace py = pybind11;
  // module_local: _C and _C_cuda each register their own class, and both load in one process.
  py::class_<HardnegLossParams> cls(m, "HardnegLossParams", py::module_local());
  cls.def(py::init<>());
  HARDNEG_PTR_FIELD(cls, float*, s);
  HARDNEG_PTR_FIELD(cls, void*, ds);
  HARDNEG_PTR_FIELD(cls, const int64_t*, row_ids);
  HARDNEG_PTR_FIELD(cls, const int64_t*, col_ids);
  HARDNEG_PTR_FIELD(cls, float*, lse);
  HARDNEG_PTR_FIELD(cls, float*, loss);
  HARDNEG_PTR_FIELD(cls, float*, z_pos);
  HARDNEG_PTR_FIELD(cls, float*, s_pos);
  HARDNEG_PTR_FIELD(cls, float*, run_max);
  HARDNEG_PTR_FIELD(cls, float*, run_sum);
  HARDNEG_PTR_FIELD(cls, float*, ega_loss);
  HARDNEG_PTR_FIELD(cls, float*, run_max_u);
  HARDNEG_PTR_FIELD(cls, float*, run_sum_u);
  HARDNEG_PTR_FIELD(cls, const float*, row_scale);
  cls.def_readwrite("rows", &HardnegLossParams::rows)
      .def_readwrite("cols", &HardnegLossParams::cols)
      .def_readwrite("ld_s", &HardnegLossParams::ld_s)
      .def_readwrite("ld_ds", &HardnegLossParams::ld_ds)
      .def_property(
          "ds_dtype", [](const HardnegLossParams& p) { return static_cast<int>(p.ds_dtype); },
          [](HardnegLossParams& p, int v) { p.ds_dtype = static_cast<DsDtype>(v); })
      .def_readwrite("pos_offset", &HardnegLossParams::pos_offset)
      .def_property(
          "mode", [](const HardnegLossParams& p) { return static_cast<int>(p.mode); },
          [](HardnegLossParams& p, int v) { p.mode = static_cast<LossMode>(v); })
      .def_readwrite("inv_tau", &HardnegLossParams::inv_tau)
      .def_readwrite("alpha", &HardnegLossParams::alpha)
      .def_readwrite("ega_beta", &HardnegLossParams::ega_beta)
      .def_readwrite("ega_margin", &HardnegLossParams::ega_margin)
      .def_readwrite("grad_scale", &HardnegLossParams::grad_scale)
      .def_readwrite("need_grad", &HardnegLossParams::need_grad)
      .def_readwrite("num_threads", &HardnegLossParams::num_threads)
      .def_readwrite("stream", &HardnegLossParams::stream);
}

#undef HARDNEG_PTR_FIELD

}  // namespace hardneg
