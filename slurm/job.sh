#!/usr/bin/env bash
# hierfed on Slurm: one homogeneous job, every rank a task, started by srun (or MPICH's mpiexec).
#
#   bash slurm/job.sh [SBATCH-OPTIONS]   # submits itself with --ntasks from the topology
#   sbatch slurm/job.sh                  # uses the #SBATCH lines; a wrong --ntasks fails at once
#
# Edit the top only: the #SBATCH lines and the settings (each setting can also come from the
# environment: `TOPOLOGY=fanout-2x4 RUN_ARGS="--rounds 10" bash slurm/job.sh`).
#SBATCH --job-name=hierfed
#SBATCH --ntasks=7                  # = `hierfed topology ranks $TOPOLOGY`; checked before anything runs
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue                   # a job that lost a node is requeued and continues (--resume auto)
# ---------------------------------------------------------------------------------- settings ---
TOPOLOGY="${TOPOLOGY:-default}"     # a name in topologies/ or a path to a topology file
CONFIG="${CONFIG:-}"                # a run config YAML; empty: the embedded defaults
RUN_ARGS="${RUN_ARGS:-}"            # more `hierfed run` arguments, e.g. "--rounds 10 --set train.lr=1e-3"
OUT="${OUT:-}"                      # results directory; empty: runs/<topology>-<job id> (kept across a requeue)
PYTHON="${PYTHON:-.venv/bin/python}"  # the Python with hierfed installed (relative to the submit dir)
LAUNCHER="${LAUNCHER:-srun}"        # srun (--mpi=pmi2), or mpiexec (Hydra inside the allocation)
MAP="${MAP:-edge}"                  # edge: each edge with its devices on one node; block: fill nodes
# ----------------------------------------------------------------------- end of the settings ---
set -euo pipefail
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

if [ -z "${SLURM_JOB_ID:-}" ]; then   # not in a job yet: submit this script, sized from the topology
    n="$("$PYTHON" -m hierfed topology ranks "$TOPOLOGY")"
    exec sbatch --ntasks="$n" "$@" "$0"
fi

# Fail fast, before any rank starts, when the allocation does not match the topology.
# (More tasks than ranks only across nodes: keeping each edge on one node can leave slots free.)
need="$("$PYTHON" -m hierfed topology ranks "$TOPOLOGY")"
if [ "${SLURM_NTASKS:-0}" -lt "$need" ] || { [ "${SLURM_NTASKS:-0}" -gt "$need" ] && [ "${SLURM_JOB_NUM_NODES:-1}" = 1 ]; }; then
    echo "slurm/job.sh: error: topology $TOPOLOGY needs $need tasks" \
         "($("$PYTHON" -m hierfed topology validate "$TOPOLOGY" | sed 's/^ok: [^:]*: //'))," \
         "but this job has SLURM_NTASKS=${SLURM_NTASKS:-unset};" \
         "submit with --ntasks=$need, or with 'bash slurm/job.sh', which sizes the job itself" >&2
    exit 2
fi

echo "slurm/job.sh: job $SLURM_JOB_ID, $SLURM_NTASKS tasks on ${SLURM_JOB_NODELIST:-?}"
# A requeued job numbers its steps from 0 again, and MPICH names its shared-memory segment after the
# step (job.step): a step killed on this node in the earlier run left that segment behind, and the
# new step would attach to it and spin in MPI_Init forever. One throw-away step per restart gives
# the run a step id no earlier run of this job used.
if [ "$LAUNCHER" = srun ]; then
    for _ in $(seq 1 "${SLURM_RESTART_COUNT:-0}"); do srun --ntasks=1 --nodes=1 true; done
fi
exec "$PYTHON" -m hierfed launch --launcher "$LAUNCHER" --map "$MAP" -- "$TOPOLOGY" \
    ${CONFIG:+--config "$CONFIG"} --out "${OUT:-runs/$(basename "$TOPOLOGY" .yaml)-$SLURM_JOB_ID}" --resume auto $RUN_ARGS
