// pybind11 view of hardneg's NCCL communicator, added to _C_cuda when NCCL headers were found.
// Buffers cross as (address, bytes) pairs and streams as integers (no libtorch).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "../cuda/nccl_comm.h"

namespace hardneg {

inline std::vector<NcclBuffer> to_buffers(const std::vector<std::tuple<uintptr_t, size_t>>& v) {
  std::vector<NcclBuffer> out;
  out.reserve(v.size());
  for (const auto& [ptr, bytes] : v) out.push_back({ptr, bytes});
  return out;
}

inline void bind_nccl(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("nccl_version", &nccl_version, "Version code of the libnccl.so.2 loaded at run time");
  m.def(
      "nccl_unique_id", [] { return py::bytes(nccl_unique_id()); },
      "A fresh ncclUniqueId (raw bytes) for NcclComm");
  py::class_<NcclComm>(m, "NcclComm")
      .def(py::init([](py::bytes uid, int nranks, int rank, int device, double timeout) {
             std::string id(uid);
             py::gil_scoped_release release;  // init waits (at most `timeout`) for every rank
             return new NcclComm(id, nranks, rank, device, timeout);
           }),
           py::arg("unique_id"), py::arg("nranks"), py::arg("rank"), py::arg("device"),
           py::arg("timeout") = 300.0)
      .def(
          "exchange",
          [](NcclComm& c, const std::vector<std::tuple<uintptr_t, size_t>>& sends, int dst,
             const std::vector<std::tuple<uintptr_t, size_t>>& recvs, int src, uintptr_t stream) {
            const auto s = to_buffers(sends);
            const auto r = to_buffers(recvs);
            py::gil_scoped_release release;
            return c.exchange(s, dst, r, src, stream);
          },
          py::arg("sends"), py::arg("dst"), py::arg("recvs"), py::arg("src"), py::arg("stream"))
      .def("wait", &NcclComm::wait, py::arg("slot"), py::arg("stream"),
           py::call_guard<py::gil_scoped_release>())
      .def("destroy", &NcclComm::destroy, py::call_guard<py::gil_scoped_release>(),
           "Waits (at most timeout s) for queued transfers, then ncclCommDestroy; aborts instead "
           "when NCCL reported an error or the transfers do not finish")
      .def("abort", &NcclComm::abort, py::call_guard<py::gil_scoped_release>(),
           "ncclCommAbort without waiting: for a group whose peer is gone")
      .def_property_readonly("alive", &NcclComm::alive)
      .def_property_readonly("timeout", &NcclComm::timeout)
      .def_property_readonly("rank", &NcclComm::rank)
      .def_property_readonly("size", &NcclComm::size)
      .def_property_readonly("device", &NcclComm::device);
}

}  // namespace hardneg
