#!/usr/bin/env bash
# A Slurm cluster on this one machine for CI, from Debian's packages, started by hand (no systemd).
#
#   bash .ci/slurm.sh up       # install (if needed), configure, start munged, slurmctld, slurmds; wait
#   bash .ci/slurm.sh down     # stop the daemons this script started (by their pid files)
#   bash .ci/slurm.sh status   # sinfo
#
# Must run as root. One machine, NODES virtual nodes hf1..hfN: one slurmd each (`slurmd -N hfK`, own
# port and spool), all on 127.0.0.1. Several nodes because Slurm's backfill scheduler puts the
# components of a heterogeneous job on distinct nodes, and slurm/hetjob.sh has 1 + 2 × edges
# components. Known working settings on a 2-core container:
#   - SlurmdParameters=config_overrides: each node over-declares CPUs, so 17+ tasks fit on 2 cores;
#   - OverSubscribe=FORCE on every partition, ProctrackType=proctrack/linuxproc and
#     TaskPlugin=task/none (no cgroups), MpiDefault=pmi2 (srun starts the PyPI mpich's ranks);
#   - backfill every second (bf_interval=1): heterogeneous jobs are started by the backfill pass;
#   - MinJobAge=10: `sbatch --wait` polls every min(32, grows ×4 while < MinJobAge/2) seconds, so
#     this keeps its polls 8 s apart (2 s, then 8 s) instead of 32 s, and records outlive a poll.
# Partitions: debug (default, all nodes), gpu (first half; 4 fake GPUs each: gres from character
# devices that are /dev/null), cpu (second half).
set -euo pipefail

NODES="${HIERFED_CI_SLURM_NODES:-8}"     # virtual nodes (>= 5: the het test has 5 components)
CPUS="${HIERFED_CI_SLURM_CPUS:-32}"      # declared CPUs per node: more than the largest test job
STATE=/var/lib/hierfed-ci-slurm          # pid files, logs, spool, fake GPUs (all ours)
CONF=/etc/slurm
PORT0=6900                               # slurmd of hfK listens on PORT0 + K

log() { echo "slurm.sh: $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

configure() {
    local host half k
    host="$(hostname -s)"
    half=$(( NODES / 2 ))
    mkdir -p "$STATE"/{spool/ctld,log,dev} "$CONF" /run/munge /var/log/munge /var/lib/munge
    for k in $(seq 1 "$NODES"); do mkdir -p "$STATE/spool/hf$k"; done
    cat > "$CONF/slurm.conf" <<EOF
# Written by .ci/slurm.sh: a test cluster of $NODES virtual nodes on one machine.
ClusterName=hierfed-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmi2
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,bf_resolution=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=10
GresTypes=gpu
NodeName=hf[1-$half] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT0 + 1))-$((PORT0 + half))] CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=2000 Gres=gpu:4 State=UNKNOWN
NodeName=hf[$((half + 1))-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT0 + half + 1))-$((PORT0 + NODES))] CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=hf[1-$NODES] Default=YES MaxTime=UNLIMITED DefaultTime=60 State=UP OverSubscribe=FORCE
PartitionName=gpu Nodes=hf[1-$half] MaxTime=UNLIMITED DefaultTime=60 State=UP OverSubscribe=FORCE
PartitionName=cpu Nodes=hf[$((half + 1))-$NODES] MaxTime=UNLIMITED DefaultTime=60 State=UP OverSubscribe=FORCE
EOF
    # Fake GPUs: slurmd counts gres/gpu from device files; character devices that are /dev/null.
    for k in 0 1 2 3; do
        [ -e "$STATE/dev/gpu$k" ] || mknod "$STATE/dev/gpu$k" c 1 3
    done
    cat > "$CONF/gres.conf" <<EOF
AutoDetect=off
NodeName=hf[1-$half] Name=gpu File=$STATE/dev/gpu[0-3]
EOF
    rm -f "$CONF/cgroup.conf"
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
}

up() {
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
    install
    down quiet
    configure
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
    munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }
    /usr/sbin/slurmctld -c -i
    local k i idle
    for k in $(seq 1 "$NODES"); do /usr/sbin/slurmd -N "hf$k"; done
    for i in $(seq 1 60); do
        idle="$(sinfo -h -N -p debug -t idle -o %N 2>/dev/null | sort -u | wc -l)"
        if [ "$idle" -ge "$NODES" ]; then
            log "up: $NODES nodes idle (hf1-hf$NODES, $CPUS CPUs declared each, on $(nproc) cores)"
            return 0
        fi
        sleep 1
    done
    log "slurm did not come up: $idle of $NODES nodes idle"
    sinfo -N >&2 || true
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd-hf1.log" >&2 || true
    exit 1
}

stop_pidfile() {  # stop the process named in pid file $1, if it is alive; remove the file
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

down() {
    local f
    for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
        [ -e "$f" ] && stop_pidfile "$f"
    done
    [ "${1:-}" = quiet ] || log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *) echo "usage: bash .ci/slurm.sh up|down|status" >&2; exit 2 ;;
esac
