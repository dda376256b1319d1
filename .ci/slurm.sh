#!/usr/bin/env bash
# A one-node Slurm cluster for CI, from Debian's packages, started by hand (no systemd here).
#
#   bash .ci/slurm.sh up       # install (if needed), configure, start munged + slurmctld + slurmd, wait
#   bash .ci/slurm.sh down     # stop the daemons this script started (by their pid files)
#   bash .ci/slurm.sh status   # sinfo
#
# Must run as root. The node over-declares its CPUs (SlurmdParameters=config_overrides) so jobs of
# 17+ tasks fit on a 2-core machine, and every partition is OverSubscribe=FORCE. Two extra
# partitions, `gpu` (with 8 fake GPUs: a gres count without device files) and `cpu`, hold the same
# node so slurm/hetjob.sh runs for real. Tasks are tracked by /proc (proctrack/linuxproc) and not
# bound (task/none): no cgroups needed. MpiDefault=pmi2: srun starts the PyPI mpich's ranks.
set -euo pipefail

CPUS="${HIERFED_CI_SLURM_CPUS:-64}"      # declared CPUs: more than the largest test job's tasks
STATE=/var/lib/hierfed-ci-slurm         # pid files, logs, spool (all ours)
CONF=/etc/slurm

log() { echo "slurm.sh: $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

configure() {
    local host mem
    host="$(hostname -s)"
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # half the RAM, in MB
    mkdir -p "$STATE"/{spool/ctld,spool/d,log} "$CONF" /run/munge /var/log/munge /var/lib/munge
    cat > "$CONF/slurm.conf" <<EOF
# Written by .ci/slurm.sh: a one-node test cluster.
ClusterName=hierfed-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmi2
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MaxArraySize=1000
KillWait=5
MinJobAge=300
SchedulerParameters=defer_batch
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP OverSubscribe=FORCE
PartitionName=cpu Nodes=$host MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
    # Fake GPUs: slurmd counts gres/gpu from device files, so 8 character devices that are /dev/null.
    mkdir -p "$STATE/dev"
    for i in 0 1 2 3 4 5 6 7; do
        [ -e "$STATE/dev/gpu$i" ] || mknod "$STATE/dev/gpu$i" c 1 3
    done
    cat > "$CONF/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu File=$STATE/dev/gpu[0-7]
EOF
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
}

running() {  # running NAME: the daemon whose pid file is ours is alive
    local pid
    pid="$(cat "$STATE/$1.pid" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

up() {
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
    install
    down quiet
    configure
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
    munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }
    /usr/sbin/slurmctld -i
    /usr/sbin/slurmd
    local host i
    host="$(hostname -s)"
    for i in $(seq 1 60); do
        state="$(sinfo -h -n "$host" -p debug -o %t 2>/dev/null || true)"
        case "$state" in
            idle*|mix*|alloc*) log "up: node $host $state, $CPUS CPUs declared on $(nproc) cores"; return 0 ;;
            down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "slurm did not come up; last node state '${state:-none}'"
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    exit 1
}

down() {
    local name pid
    for name in slurmd slurmctld munged; do
        pid="$(cat "$STATE/$name.pid" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$STATE/$name.pid"
    done
    [ "${1:-}" = quiet ] || log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *) echo "usage: bash .ci/slurm.sh up|down|status" >&2; exit 2 ;;
esac
