#!/usr/bin/env bash
# hierfed with the MPI at hand on hosts you name (no Slurm needed): the world size comes from the
# topology, a host file keeps each edge with its devices on one host, and an exception on any rank
# ends the whole job (ranks run under `python -m mpi4py`).
#
#   launch/mpirun.sh fanout-2x4 --config run.yaml --rounds 10     # the arguments are `hierfed run`'s
#   HOSTFILE=launch/hosts.example DRY_RUN=1 launch/mpirun.sh fanout-4x2   # show the command and map
#
# MPICH (the venv's mpich wheel, or a site MPICH) gets `-f hostfile`; Open MPI gets `--hostfile`,
# `--map-by slot`, `--oversubscribe`, and `--allow-run-as-root` when run as root.
# Edit the top only (each setting can also come from the environment).
# ---------------------------------------------------------------------------------- settings ---
HOSTFILE="${HOSTFILE:-}"            # MPICH (host:N), Open MPI (host slots=N) or plain; empty: this machine
HOSTS="${HOSTS:-}"                  # or inline hosts and slots: node1:16,node2:16
MAP="${MAP:-edge}"                  # edge: each edge with its devices on one host; block: fill hosts in order
MPIEXEC="${MPIEXEC:-}"              # the site's mpiexec/mpirun; empty: beside $PYTHON, then on PATH
PYTHON="${PYTHON:-.venv/bin/python}"  # the Python with hierfed installed
DRY_RUN="${DRY_RUN:-}"              # non-empty: print the command and the rank-to-host map only
# ----------------------------------------------------------------------- end of the settings ---
set -euo pipefail
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
exec "$PYTHON" -m hierfed launch --launcher mpiexec --map "$MAP" ${HOSTFILE:+--hostfile "$HOSTFILE"} \
    ${HOSTS:+--hosts "$HOSTS"} ${MPIEXEC:+--mpiexec "$MPIEXEC"} ${DRY_RUN:+--dry-run} -- "$@"
