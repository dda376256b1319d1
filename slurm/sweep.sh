#!/usr/bin/env bash
# A hierfed sweep on Slurm: one array task per unfinished point, then a report job.
#
#   bash slurm/sweep.sh [SBATCH-OPTIONS]   # submits the array (unfinished points only, each task
#                                          # sized for the largest point) and the report job after it
#   sbatch slurm/sweep.sh                  # one allocation; the points run one after another
#
# Each array task runs `hierfed sweep SPEC --point $SLURM_ARRAY_TASK_ID` (finished points exit at
# once); the report job writes results.csv, summary.md and the plots when the array is over.
# Edit the top only (each setting can also come from the environment).
#SBATCH --job-name=hierfed-sweep
#SBATCH --ntasks=17                 # >= `hierfed sweep $SPEC --print max-ranks` (checked per point)
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%A_%a.out
# ---------------------------------------------------------------------------------- settings ---
SPEC="${SPEC:-launch/sweeps/fanout.yaml}"  # the sweep spec
SWEEP_ARGS="${SWEEP_ARGS:-}"        # more `hierfed sweep` arguments, e.g. "--out sweeps/try2 --set seed=1"
PYTHON="${PYTHON:-.venv/bin/python}"  # the Python with hierfed installed (relative to the submit dir)
LAUNCHER="${LAUNCHER:-srun}"        # how each point starts its ranks: srun, or mpiexec
ARRAY_LIMIT="${ARRAY_LIMIT:-}"      # at most this many points at once (empty: no limit)
# ----------------------------------------------------------------------- end of the settings ---
set -euo pipefail
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
sweep() { "$PYTHON" -m hierfed sweep "$SPEC" $SWEEP_ARGS "$@"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then   # not in a job yet: submit the array and the report
    pending="$(sweep --print pending)"
    if [ -z "$pending" ]; then
        echo "slurm/sweep.sh: every point of $SPEC is finished; writing the report"
        exec "$PYTHON" -m hierfed sweep "$SPEC" $SWEEP_ARGS --report
    fi
    ranks="$(sweep --print max-ranks)"
    rc=0
    array="$(sbatch --parsable --array="$pending${ARRAY_LIMIT:+%$ARRAY_LIMIT}" --ntasks="$ranks" "$@" "$0")" || rc=$?
    [ -n "$array" ] || exit "${rc:-1}"
    array="${array%%;*}"
    echo "slurm/sweep.sh: array job $array: points $pending, $ranks tasks each"
    report="$(HIERFED_SWEEP_REPORT=1 sbatch --parsable --dependency="afterany:$array" --ntasks=1 \
              --job-name=hierfed-sweep-report "$@" "$0")" || rc=$?
    echo "slurm/sweep.sh: report job ${report%%;*} after it"
    exit "$rc"
fi

if [ -n "${HIERFED_SWEEP_REPORT:-}" ]; then
    exec "$PYTHON" -m hierfed sweep "$SPEC" $SWEEP_ARGS --report
fi
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    exec "$PYTHON" -m hierfed sweep "$SPEC" $SWEEP_ARGS --point "$SLURM_ARRAY_TASK_ID" --launcher "$LAUNCHER"
fi
exec "$PYTHON" -m hierfed sweep "$SPEC" $SWEEP_ARGS --launcher "$LAUNCHER"   # plain sbatch: all points
