// The _C_cuda module: CUDA kernels. Forwards only; arguments were checked once in Python, and the
// kernels launch asynchronously on params.stream (the GIL is released while the host enqueues).
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "../cuda/cuda_driver.h"
#include "../cuda/hardneg_loss.h"
#include "../cuda/kernel_image.h"
#include "params.h"
#ifdef HARDNEG_HAVE_NCCL
#include "nccl_comm_bind.h"
#endif

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hardneg CUDA kernels (no libtorch: pointers, sizes, scalars and a stream cross)";
  hardneg::bind_params(m);
  namespace py = pybind11;
  m.def("hardneg_loss_rows", &hardneg::hardneg_loss_rows_cuda,
        py::call_guard<py::gil_scoped_release>());
  m.def("hardneg_loss_block_update", &hardneg::hardneg_loss_block_update_cuda,
        py::call_guard<py::gil_scoped_release>());
  m.def("hardneg_loss_block_grad", &hardneg::hardneg_loss_block_grad_cuda,
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_driver_version", &hardneg::cuda_driver_version,
        "CUDA version the NVIDIA driver supports (e.g. 12020), from libcuda.so.1");
  m.def(
      "kernel_images",
      [] {
        std::vector<std::string> names;
        for (const auto& image : hardneg::kernel_images()) names.emplace_back(image.name);
        return names;
      },
      "The kernel images built into this module");
  m.def("loaded_kernel_image", &hardneg::loaded_kernel_image, py::arg("device"),
        py::call_guard<py::gil_scoped_release>(),
        "The image that serves `device` (loading it if needed), e.g. 'sm_90 cubin'");
#ifdef HARDNEG_HAVE_NCCL
  hardneg::bind_nccl(m);  // the ring's NCCL communicator (csrc/cuda/nccl_comm.h)
#endif
}
