"""Checks that hardneg's CUDA module runs on drivers of a CUDA line (default 12.0, torch's CUDA 12
wheels: r525+), from the built shared object itself.

    python tools/check_cuda_compat.py [--target 12.0] [--sass] [path/to/_C_cuda*.so]

What it asserts (cmake/cuda.cmake explains the design):
- no CUDA runtime, driver, NCCL or other CUDA library among the dynamic dependencies (readelf -d),
  no CUDA symbol left for the loader to bind (nm -D --undefined-only), and no statically linked
  runtime inside (its error table, e.g. "cudaErrorInsufficientDriver", would be);
- every embedded PTX declares an ISA the target driver can JIT (CUDA 12.0: ISA 8.0);
- with --sass, every embedded cubin comes from a ptxas of the target's major line: its ELF ABI
  version is at most the one that line's ptxas writes (CUDA 12.x writes 7, CUDA 13.0 writes 8, as
  measured with ptxas 12.9 and 13.0), so the driver loads it without JIT;
- build_info() agrees: cuda_driver_min (and with --sass cuda_driver_min_sass) at most the target.
Exit status 1 with one line per problem; 0 with a summary otherwise.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

EM_CUDA = 190
# Newest cubin ELF ABI version a driver of each CUDA major loads.
CUBIN_ABI_BY_MAJOR = {11: 7, 12: 7, 13: 8}
FORBIDDEN_LIBS = re.compile(r"lib(cudart|cuda|nccl|nvrtc|cublas|nvJitLink)\b")
FORBIDDEN_SYMBOLS = re.compile(r"^(cuda[A-Z_]|cu[A-Z]|nccl[A-Z])")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def ptx_isa_for_driver(cuda: tuple[int, int]) -> tuple[int, int]:
    """Newest PTX ISA a driver of CUDA `cuda` JIT-compiles (11.x: 7.x, 12.0-12.5: 8.0-8.5)."""
    major, minor = cuda
    if major <= 11:
        return 7, minor
    if major == 12:
        return (8, minor) if minor <= 5 else (8, min(minor - 1, 8))
    return 9, minor


def embedded_images(data: bytes) -> tuple[list[tuple[int, int]], list[int]]:
    """(PTX ISA versions, cubin ELF ABI versions) of the images embedded in a shared object."""
    ptx = [(int(m[1]), int(m[2])) for m in re.finditer(rb"\n\.version (\d+)\.(\d+)\n", data)]
    abis = []
    for m in re.finditer(rb"\x7fELF", data):
        start = m.start()
        header = data[start : start + 20]
        if len(header) == 20 and int.from_bytes(header[18:20], "little") == EM_CUDA:
            abis.append(header[8])
    return ptx, abis


def _tool_lines(cmd: list[str]) -> list[str]:
    if shutil.which(cmd[0]) is None:
        raise SystemExit(f"{cmd[0]} not found (binutils): cannot inspect {cmd[-1]}")
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()


def check(so: Path, target: tuple[int, int], sass: bool, info: dict) -> list[str]:
    problems = []
    needed = [
        ln.split("[")[-1].rstrip("]")
        for ln in _tool_lines(["readelf", "-d", str(so)])
        if "(NEEDED)" in ln
    ]
    problems += [f"depends on {lib}" for lib in needed if FORBIDDEN_LIBS.search(lib)]
    undefined = [ln.split()[-1] for ln in _tool_lines(["nm", "-D", "--undefined-only", str(so)])]
    problems += [f"imports {sym}" for sym in undefined if FORBIDDEN_SYMBOLS.match(sym)]
    data = so.read_bytes()
    if b"cudaErrorInsufficientDriver" in data:
        problems.append("contains a statically linked CUDA runtime (its error table)")
    ptx, abis = embedded_images(data)
    if not ptx:
        problems.append("no embedded PTX found")
    isa = ptx_isa_for_driver(target)
    problems += [
        f"PTX ISA {v[0]}.{v[1]} > {isa[0]}.{isa[1]} (CUDA {target[0]}.{target[1]} JIT)"
        for v in ptx
        if v > isa
    ]
    if sass:
        if not abis:
            problems.append("no embedded cubin found")
        limit = CUBIN_ABI_BY_MAJOR.get(target[0], 0)
        problems += [
            f"cubin ELF ABI version {a} > {limit} (a ptxas newer than CUDA {target[0]})"
            for a in abis
            if a > limit
        ]
    keys = ["cuda_driver_min"] + (["cuda_driver_min_sass"] if sass else [])
    for key in keys:
        value = info.get(key)
        if not value or _version(value) > target:
            problems.append(f"build_info()[{key!r}] = {value!r} > {target[0]}.{target[1]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("so", nargs="?", help="the _C_cuda shared object (default: the installed)")
    parser.add_argument("--target", default="12.0", help="oldest CUDA driver line to support")
    parser.add_argument("--sass", action="store_true", help="also require cubins loadable there")
    args = parser.parse_args(argv)
    import hardneg

    info = hardneg.build_info()
    if not info["cuda"]:
        print("hardneg was built without its CUDA module: nothing to check")
        return 0
    if args.so:
        so = Path(args.so)
    else:
        import hardneg._C_cuda as module

        so = Path(module.__file__)
    problems = check(so, _version(args.target), args.sass, info)
    for p in problems:
        print(f"{so.name}: {p}")
    if problems:
        return 1
    ptx, abis = embedded_images(so.read_bytes())
    print(
        f"{so.name}: runs on CUDA {args.target}+ drivers: no CUDA library linked, PTX ISA "
        f"{sorted({f'{a}.{b}' for a, b in ptx})}, cubin ELF ABI {sorted(set(abis))}, driver min "
        f"{info['cuda_driver_min']} (JIT) / {info['cuda_driver_min_sass']} (cubins)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
