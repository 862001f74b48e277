# cmake -DIN=a.ptx -DOUT=b.ptx -DISA=7.8 -P lower_ptx.cmake
# Lowers a PTX file's ISA version (".version X.Y") to ISA, the oldest that knows its target, so
# that older drivers can JIT it. ptxas then assembles the result and rejects any instruction the
# lowered ISA lacks, so a lowering that changed meaning cannot build.
file(READ "${IN}" ptx)
string(REGEX MATCH "\n\\.version ([0-9]+)\\.([0-9]+)\n" found "${ptx}")
if(NOT found)
  message(FATAL_ERROR "${IN}: no .version line")
endif()
if("${CMAKE_MATCH_1}.${CMAKE_MATCH_2}" VERSION_GREATER "${ISA}")
  string(REGEX REPLACE "\n\\.version [0-9]+\\.[0-9]+\n" "\n.version ${ISA}\n" ptx "${ptx}")
endif()
file(WRITE "${OUT}" "${ptx}")
