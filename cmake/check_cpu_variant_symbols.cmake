# Run by cmake/cpu.cmake before _C links (cmake -P): fails the build when an object of the CPU
# kernel variant VARIANT defines an external symbol outside namespace hardneg::cpu_<VARIANT>.
# Such a symbol (a header's inline function, a template instantiation) would be merged by the
# linker with the other variants' copies into one, compiled for whichever ISA came first.
# Inputs: NM (the nm program), VARIANT (the variant id), OBJECTS (its object files).
string(LENGTH "cpu_${VARIANT}" _len)
set(_prefix "_ZN7hardneg${_len}cpu_${VARIANT}")
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} --defined-only --extern-only ${obj}
                  OUTPUT_VARIABLE _out RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  set(_bad "")
  foreach(line IN LISTS _lines)
    # "<address> <type> <name>"; the name is the last field.
    string(REGEX MATCH "[^ ]+$" _sym "${line}")
    if(_sym AND NOT _sym MATCHES "^${_prefix}")
      list(APPEND _bad "${_sym}")
    endif()
  endforeach()
  if(_bad)
    list(JOIN _bad "\n  " _bad)
    message(FATAL_ERROR "CPU variant ${VARIANT}: ${obj} defines external symbols outside "
                        "hardneg::cpu_${VARIANT} (give them internal linkage):\n  ${_bad}")
  endif()
endforeach()
