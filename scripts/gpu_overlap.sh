#!/bin/bash
# The accelerator executor on a GPU host: its tests, a real run and the overlap bench, with
# every output under $OUT (default ./gpu-out). Ranks share the host's GPUs as mpiexec places
# them (MPI staging through pinned host memory when they share one).
#   scripts/gpu_overlap.sh tests 1 2 4      # GPU tests at each world size
#   scripts/gpu_overlap.sh run 2            # mc2sim run seed_gmm_alltoallv_ep4 --device cuda
#   scripts/gpu_overlap.sh bench 1 2 4      # scripts/bench_overlap.py --device cuda
set -u
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=. MC2SIM_TIMEOUT=120
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MPIEXEC=(mpiexec)
if mpiexec --version 2>&1 | grep -qiE "open ?mpi|openrte"; then
    MPIEXEC=(mpiexec --allow-run-as-root --oversubscribe --bind-to none)
fi
WITH_MPI=()
if $PY -c "import pytest_mpi" 2>/dev/null; then WITH_MPI=(--with-mpi); fi
what=$1
shift
for n in "$@"; do
    threads=$(( $(nproc) / n / 2 )); [ "$threads" -lt 1 ] && threads=1
    export OMP_NUM_THREADS=$threads
    case $what in
    tests)
        timeout 280 "${MPIEXEC[@]}" -n "$n" $PY -m pytest -q -p no:cacheprovider -o addopts="" \
            -m gpu "${WITH_MPI[@]}" tests/mpi/test_gpu_overlap.py > "$OUT/tests_$n.txt" 2>&1
        echo "tests at $n ranks: exit $?" | tee -a "$OUT/summary.txt" ;;
    run)
        rm -rf "$OUT/run_$n"
        timeout 300 "${MPIEXEC[@]}" -n "$n" $PY -m mc2sim run seed_gmm_alltoallv_ep4 \
            --device cuda --out "$OUT/run_$n" --no-plots > "$OUT/run_$n.txt" 2>&1
        echo "run at $n ranks: exit $?" | tee -a "$OUT/summary.txt" ;;
    bench)
        timeout 400 "${MPIEXEC[@]}" -n "$n" $PY scripts/bench_overlap.py --device cuda \
            --world-size "$n" --reps "${REPS:-5}" > "$OUT/bench_$n.txt" 2>&1
        echo "bench at $n ranks: exit $?" | tee -a "$OUT/summary.txt" ;;
    esac
done
