#!/usr/bin/env bash
# One command for formatting and lint: ruff (format + lint) for Python, clang-format for C++/CUDA.
# Checks by default (CI); `tools/lint.sh --fix` rewrites the files instead.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t cxx < <(git ls-files -co --exclude-standard 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' \
  'tests/*.h' 'tests/*.cpp')
if [[ "${1:-}" == "--fix" ]]; then
  ruff format .
  ruff check --fix .
  clang-format -i "${cxx[@]}"
else
  ruff format --check .
  ruff check .
  clang-format --dry-run --Werror "${cxx[@]}"
fi
# Shell scripts: shellcheck where it is installed (apt-get install shellcheck).
if command -v shellcheck >/dev/null; then
  shellcheck tools/*.sh
fi
