// The _C_cuda module: CUDA kernels. Forwards only; arguments were checked once in Python, and the
// kernels launch asynchronously on params.stream (the GIL is released while the host enqueues).
#include <pybind11/pybind11.h>

#include "../cuda/hardneg_loss.h"
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
#ifdef HARDNEG_HAVE_NCCL
  hardneg::bind_nccl(m);  // the ring's NCCL communicator (csrc/cuda/nccl_comm.h)
#endif
}
