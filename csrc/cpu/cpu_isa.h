// Run-time choice of the CPU kernels' instruction set. csrc/cpu/hardneg_loss.cpp is compiled once
// per ISA variant (CMake: baseline, avx2, avx512 in the portable build; one -march variant named
// "arch" otherwise), each copy in its own namespace hardneg::cpu_<variant> and exporting one
// CpuKernels table. cpu_isa.cpp, compiled for the baseline, reads CPUID once and calls the best
// variant this CPU runs; HARDNEG_CPU_ISA (read by hardneg._ops) can force another.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hardneg/hardneg_loss.h"

namespace hardneg {

// x86 features a variant's compiler flags may let it use: one bit each, in the order of
// kCpuFeatureNames (cpu_isa.cpp). A variant records the ones its translation unit was compiled
// with (kCompiledCpuFeatures) and runs only where CPUID reports all of them. Features outside
// this list (F16C, LZCNT, MOVBE, AMX, AVX512-FP16, ...: -march=native may enable them, nothing in
// these kernels compiles to them) are not checked; other architectures record none.
enum CpuFeature : uint32_t {
  kSse3 = 1u << 0,
  kSsse3 = 1u << 1,
  kSse41 = 1u << 2,
  kSse42 = 1u << 3,
  kPopcnt = 1u << 4,
  kAvx = 1u << 5,
  kAvx2 = 1u << 6,
  kFma = 1u << 7,
  kBmi = 1u << 8,
  kBmi2 = 1u << 9,
  kAvx512f = 1u << 10,
  kAvx512cd = 1u << 11,
  kAvx512bw = 1u << 12,
  kAvx512dq = 1u << 13,
  kAvx512vl = 1u << 14,
  kAvx512vnni = 1u << 15,
  kAvx512bf16 = 1u << 16,
  kAvx512vbmi = 1u << 17,
  kAvx512ifma = 1u << 18,
  kAvx512vbmi2 = 1u << 19,
  kAvx512bitalg = 1u << 20,
  kAvx512vpopcntdq = 1u << 21,
  kNumCpuFeatures = 22,
};

// CpuFeature bits of the translation unit that includes this header, from the compiler's
// predefined macros. Internal linkage: each variant's copy holds its own flags.
static constexpr uint32_t kCompiledCpuFeatures = 0u
#ifdef __SSE3__
                                                 | kSse3
#endif
#ifdef __SSSE3__
                                                 | kSsse3
#endif
#ifdef __SSE4_1__
                                                 | kSse41
#endif
#ifdef __SSE4_2__
                                                 | kSse42
#endif
#ifdef __POPCNT__
                                                 | kPopcnt
#endif
#ifdef __AVX__
                                                 | kAvx
#endif
#ifdef __AVX2__
                                                 | kAvx2
#endif
#ifdef __FMA__
                                                 | kFma
#endif
#ifdef __BMI__
                                                 | kBmi
#endif
#ifdef __BMI2__
                                                 | kBmi2
#endif
#ifdef __AVX512F__
                                                 | kAvx512f
#endif
#ifdef __AVX512CD__
                                                 | kAvx512cd
#endif
#ifdef __AVX512BW__
                                                 | kAvx512bw
#endif
#ifdef __AVX512DQ__
                                                 | kAvx512dq
#endif
#ifdef __AVX512VL__
                                                 | kAvx512vl
#endif
#ifdef __AVX512VNNI__
                                                 | kAvx512vnni
#endif
#ifdef __AVX512BF16__
                                                 | kAvx512bf16
#endif
#ifdef __AVX512VBMI__
                                                 | kAvx512vbmi
#endif
#ifdef __AVX512IFMA__
                                                 | kAvx512ifma
#endif
#ifdef __AVX512VBMI2__
                                                 | kAvx512vbmi2
#endif
#ifdef __AVX512BITALG__
                                                 | kAvx512bitalg
#endif
#ifdef __AVX512VPOPCNTDQ__
                                                 | kAvx512vpopcntdq
#endif
    ;

// One compiled variant of the CPU kernels (csrc/cpu/hardneg_loss.h documents the entry points).
struct CpuKernels {
  const char* isa;    // "baseline", "avx2", "avx512", or the -march value of a one-variant build
  uint32_t features;  // CpuFeature bits the variant was compiled for
  void (*rows)(const HardnegLossParams&);
  void (*block_update)(const HardnegLossParams&);
  void (*block_grad)(const HardnegLossParams&);
  void (*exp)(const float*, float*, int64_t);
  void (*round)(const float*, void*, int64_t, DsDtype);
};

// The variant the kernels call. Throws std::runtime_error when no compiled variant runs on this
// CPU (a HARDNEG_CPU_ARCH=native build moved to an older machine).
const CpuKernels& active_cpu_kernels();

// Name of the active variant, or "none" when no compiled variant runs on this CPU.
std::string cpu_isa();

// Compiled variants, best first.
std::vector<std::string> cpu_isas_compiled();

// Compiled variants this CPU runs, best first.
std::vector<std::string> cpu_isas_supported();

// Makes `isa` the active variant; throws std::invalid_argument naming the value when it was not
// compiled or when this CPU lacks a feature it needs. "auto" restores the best supported one.
void set_cpu_isa(const std::string& isa);

// The message set_cpu_isa gives for `isa` on a CPU with features `present` (CpuFeature bits), or
// "" when it would run; a pure function, so tests can check the refusal on any machine.
std::string cpu_isa_problem(const std::string& isa, uint32_t present);

// CpuFeature bits CPUID reports on this machine (0 off x86).
uint32_t cpu_features_present();

// Names of the CpuFeature bits set in `features`, in bit order.
std::vector<std::string> cpu_feature_names(uint32_t features);

// CpuFeature bits of feature names; throws std::invalid_argument on a name it does not know.
uint32_t cpu_feature_bits(const std::vector<std::string>& names);

// Names of the features the compiled variant `isa` needs; throws std::invalid_argument when no
// such variant was compiled.
std::vector<std::string> cpu_isa_features(const std::string& isa);

}  // namespace hardneg
