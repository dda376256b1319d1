#!/usr/bin/env bash
# hierfed on Slurm as a heterogeneous job: the cloud and the edges on GPU nodes (one GPU per edge
# rank), the devices on CPU nodes.
#
#   bash slurm/hetjob.sh [SBATCH-OPTIONS]   # submits itself, one component per tier block
#
# Slurm numbers ranks component after component, so the job has one component per block of the
# topology's rank order: cloud, then for each edge its edge ranks and its device ranks
# (`hierfed launch --print het-sizes -- TOPOLOGY`; default: 1 : 1 : 2 : 1 : 2). One srun spans all
# components, so all ranks share one MPI_COMM_WORLD. Slurm's backfill scheduler starts a
# heterogeneous job and puts its components on distinct nodes: plan on 1 + 2 × edges nodes.
#
# Edit the top only (each setting can also come from the environment).
# ---------------------------------------------------------------------------------- settings ---
TOPOLOGY="${TOPOLOGY:-default}"     # a name in topologies/ or a path to a topology file
CONFIG="${CONFIG:-}"                # a run config YAML; empty: the embedded defaults
RUN_ARGS="${RUN_ARGS:-}"            # more `hierfed run` arguments
OUT="${OUT:-}"                      # results directory; empty: runs/<topology>-<job id>
PYTHON="${PYTHON:-.venv/bin/python}"  # the Python with hierfed installed (relative to the submit dir)
CLOUD_OPTS="${CLOUD_OPTS:---partition=gpu}"                    # the cloud's component
EDGE_OPTS="${EDGE_OPTS:---partition=gpu --gpus-per-task=1}"    # each edge's ranks: a GPU each
DEVICE_OPTS="${DEVICE_OPTS:---partition=cpu}"                  # each edge's devices
JOB_OPTS="${JOB_OPTS:---job-name=hierfed-het --time=02:00:00 --output=slurm-%x-%j.out}"
# ----------------------------------------------------------------------- end of the settings ---
set -euo pipefail
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

sizes="$("$PYTHON" -m hierfed launch --print het-sizes -- "$TOPOLOGY")"
if [ -z "${SLURM_JOB_ID:-}" ]; then   # not in a job yet: build the components and submit
    components=() i=0
    for n in $sizes; do
        if [ "$i" = 0 ]; then opts=$CLOUD_OPTS; elif [ $((i % 2)) = 1 ]; then opts=$EDGE_OPTS; else opts=$DEVICE_OPTS; fi
        [ "$i" = 0 ] || components+=(":")
        # shellcheck disable=SC2206  # the option strings are meant to split into words
        components+=($opts --ntasks="$n")
        i=$((i + 1))
    done
    # shellcheck disable=SC2086
    exec sbatch $JOB_OPTS "$@" "${components[@]}" "$0"
fi

# Fail fast when the components do not match the topology's blocks.
have=""
for i in $(seq 0 $(( ${SLURM_HET_SIZE:-1} - 1 ))); do
    var="SLURM_NTASKS_HET_GROUP_$i"
    have="$have ${!var:-${SLURM_NTASKS:-?}}"
    nodes="SLURM_JOB_NODELIST_HET_GROUP_$i"
    echo "slurm/hetjob.sh: component $i: ${!var:-?} tasks on ${!nodes:-?}"
done
if [ "${have# }" != "$sizes" ]; then
    echo "slurm/hetjob.sh: error: topology $TOPOLOGY" \
         "($("$PYTHON" -m hierfed topology validate "$TOPOLOGY" | sed 's/^ok: [^:]*: //'))" \
         "needs components of $sizes tasks (cloud, then each edge and its devices), but this job has${have};" \
         "submit with 'bash slurm/hetjob.sh', which builds the components" >&2
    exit 2
fi

exec "$PYTHON" -m hierfed launch --launcher srun -- "$TOPOLOGY" \
    ${CONFIG:+--config "$CONFIG"} --out "${OUT:-runs/$(basename "$TOPOLOGY" .yaml)-$SLURM_JOB_ID}" $RUN_ARGS
