#!/bin/sh
# Usage: bench/callgrind/count.sh <build dir of the core> <isa> [out dir]
# Builds calls.c against <build dir>/src/bn_core/libbn_core.a (static, OpenMP) and prints
# "<case> <call> <instructions>" for every call, with CBN_ISA=<isa> (valgrind has no
# AVX-512: use scalar or avx2) on one thread.
set -eu
build=$1 isa=$2 out=${3:-$(mktemp -d)}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
cc -O2 -I"$here/../../src/bn_core/include" "$here/calls.c" "$build/src/bn_core/libbn_core.a" \
  -fopenmp -lstdc++ -lm -o "$out/calls"
rm -f "$out"/callgrind.out.*
(cd "$out" && CBN_ISA=$isa OMP_NUM_THREADS=1 valgrind --tool=callgrind \
  --callgrind-out-file="$out/callgrind.out" ./calls >/dev/null 2>"$out/valgrind.log")
for f in "$out"/callgrind.out.*; do
  label=$(sed -n 's/^desc: Trigger: Client Request: //p' "$f")
  total=$(sed -n "s/^totals: //p" "$f" | head -n 1)
  [ -n "$label" ] && echo "$label $total"
done | sort -t. -k1,1 | awk 'NF == 3'
