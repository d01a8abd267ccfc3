#!/usr/bin/env bash
# Builds the C API fuzzer (clang 16, ASan + UBSan, libFuzzer), replays the
# fixed findings in tests/fuzz/regressions, then fuzzes for a bounded time from
# a copy of the seed corpus. Fails on any finding (crash, sanitizer report,
# wrong result, hang), whose input lands in build/fuzz-findings/.
# Usage, from anywhere: tests/fuzz/run.sh [seconds, default 120]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-120}
build=build/fuzz

CC=clang-16 CXX=clang++-16 cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBN_CORE_BUILD_FUZZER=ON \
  -DBN_CORE_BUILD_PYTHON=OFF -DBN_CORE_BUILD_TESTS=OFF -DBN_CORE_INSTALL=OFF -DBN_CORE_OPENMP=OFF
cmake --build "$build" --parallel 2
fuzzer=$build/tests/fuzz/fuzz_bn_core

# Allocations the core cannot make must reach it as NULL (a status), as without ASan.
export ASAN_OPTIONS=allocator_may_return_null=1
echo "== fuzz: replaying tests/fuzz/regressions"
"$fuzzer" tests/fuzz/regressions/*

corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
cp tests/fuzz/corpus/* "$corpus/"
mkdir -p build/fuzz-findings
echo "== fuzz: $seconds s from the seed corpus"
"$fuzzer" -max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
  -artifact_prefix=build/fuzz-findings/ "$corpus"
