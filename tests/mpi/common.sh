# Shared by tests/mpi/*.sh: the tool, mpirun with the flags CI needs, a small training run.
# Usage (from a test): source common.sh MAMBACPP MPIEXEC WORKDIR
set -euo pipefail
MAMBACPP=$1
MPIEXEC=$2
WORK=$3
rm -rf "$WORK" && mkdir -p "$WORK"
# CI runs as root: OpenMPI refuses that unless told. --oversubscribe: 2 ranks on any machine.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN=("$MPIEXEC" --oversubscribe --bind-to none -np 2)
# A small Mamba-1 model on selective copying: seconds, not minutes. One thread per process, so
# both runs use the same kernels' partitioning.
MODEL=(--task selective-copy --seqlen 32 --n-copy 4 --task-vocab 8 --d_model 32 --n_layer 2
       --d_state 8 --lr 3e-3 --warmup 2 --threads 1 --eval-batches 0 --log-every 1000
       --bucket-mib 0.01)
# The columns of loss.csv that must agree (step,loss,lr,grad_norm,accuracy,tokens; not seconds).
curve() { cut -d, -f1-6 "$1/loss.csv"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
