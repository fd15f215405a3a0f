#!/usr/bin/env bash
# Run the GPU-only proofs on a CUDA host and keep every log: the commands behind the
# figures in docs/PERFORMANCE.md, in one place, so anyone with a GPU can rerun them.
#
#   scripts/gpu_host.sh OUTDIR [STAGE ...]
#
# Stages (default: tests bench): each writes OUTDIR/<stage>.log (and .json where the
# script has one) and the run goes on when one fails; the exit status is the number of
# failed stages.
#   tests     python -m pytest -m gpu tests/
#   bench     scripts/bench.py --all (router, p50, big, spawn, batching, weights)
#   standby   scripts/bench.py --standby --upgrades 3
#   oip       scripts/bench.py --oip (and $OIP_ARGS, e.g. "--oip-spin-us 500")
#   oip-spin  scripts/bench_oip_ab.py: the gateways with oip_spin_us 0, 200, 500, 1000, 1 client
#   stress    scripts/stress.py, drain-first with the standby, 200 cycles
#   machine   nvidia-smi, CPU, torch: what the figures were measured on
#
# Needs: torch with CUDA, the package's dependencies (pyzmq, msgpack, psutil, ...), gcc
# (the C parts are built here first).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
out=$1
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests bench)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace >"$out/build.log" 2>&1 || {
  echo "building the C parts failed: see $out/build.log" >&2
  exit 1
}
failed=0
run_stage() {
  local name=$1
  shift
  echo "== $name: $* ($(date -u +%H:%M:%S) UTC)"
  "$@" 2>&1 | tee "$out/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
for stage in "${stages[@]}"; do
  case $stage in
    machine)
      run_stage machine sh -c 'date -u; nvidia-smi; lscpu | head -20; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"' ;;
    tests)
      run_stage tests python3 -m pytest -m gpu tests/ -q -p no:cacheprovider ;;
    bench)
      run_stage bench python3 scripts/bench.py --all --json "$out/bench.json" ;;
    standby)
      run_stage standby python3 scripts/bench.py --standby --upgrades 3 --json "$out/standby.json" ;;
    oip)
      run_stage oip python3 scripts/bench.py --oip --json "$out/oip.json" ${OIP_ARGS:-} ;;
    oip-spin)
      run_stage oip-spin python3 scripts/bench_oip_ab.py --variant spin200=--spin-us=200 \
        --variant spin500=--spin-us=500 --variant spin1000=--spin-us=1000 --rounds 8 \
        --requests 500 ;;
    stress)
      run_stage stress python3 scripts/stress.py --device cuda:0 --standby \
        --strategy drain-first --cycles 200 --out "$out/stress" ;;
    *)
      echo "unknown stage: $stage (see --help)" >&2
      failed=$((failed + 1)) ;;
  esac
done
exit "$failed"
