#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the real-cluster tests (tests/test_cluster_slurm.py):
# Debian's slurm-wlm and munge packages, one controller and one node (this host, with its cores and
# memory, `slurmd -C`), partition `debug` (the default), everything on 127.0.0.1. Needs root and the
# Debian package mirror; no systemd (the daemons are started directly, as in a container), no
# cgroups (proctrack/linuxproc, task/none), no accounting database (sacct answers "accounting
# storage is disabled"; submitit then reads the jobs' result files, which is all it needs).
# MaxArraySize is 4 (SLURM_MAX_ARRAY_SIZE): an array of more tasks is split by the launcher.
#
#   sudo bash scripts/cluster_setup.sh      # .ci/run calls it before the tests
#
# Safe to re-run: installed packages, a munge key, a running daemon and an unchanged slurm.conf are
# kept. Exits non-zero with one line saying why when the cluster cannot be set up (not root, no
# apt, the packages cannot be installed, the node never turns idle); the tests then skip with that
# reason (they look for a node with `sinfo`).
set -euo pipefail

PARTITION=${SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
MAX_ARRAY_SIZE=${SLURM_MAX_ARRAY_SIZE:-4}
LOG_DIR=/var/log/slurm
SPOOL=/var/spool/slurm

say() { echo "cluster_setup: $*"; }
fail() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (apt-get install, daemons as root); the SLURM tests will skip"

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || fail "no apt-get: install slurm-wlm and munge by hand"
    say "installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed: no package mirror?"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
}

start_munge() {
    [ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    fail "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
    local host node tmp
    host=$(hostname -s)
    # this host as slurmd sees it: NodeName=... CPUs=... RealMemory=... (its first line)
    node=$(slurmd -C | head -n 1)
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# written by resnorm's scripts/cluster_setup.sh: one controller and one node, this host
ClusterName=resnorm
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=2
MinJobAge=300
SlurmdTimeout=60
# small, so that the slurm launcher's split of a larger array into several is tested
MaxArraySize=$MAX_ARRAY_SIZE
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return
    fi
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    CHANGED=1
    say "wrote $CONF ($node)"
}

# the daemon of pid file $1 is running (a stale file, e.g. after the machine's processes were killed, is not)
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}

start_slurm() {
    install -d -m 0755 "$LOG_DIR" "$SPOOL/ctld" "$SPOOL/d"
    if running /run/slurmctld.pid && running /run/slurmd.pid; then
        if [ "$CHANGED" = 1 ]; then
            say "slurm.conf changed: scontrol reconfigure"
            scontrol reconfigure
        fi
        return
    fi
    running /run/slurmctld.pid || { say "starting slurmctld"; /usr/sbin/slurmctld; }
    running /run/slurmd.pid || { say "starting slurmd"; /usr/sbin/slurmd; }
}

wait_idle() {
    local host state
    host=$(hostname -s)
    for _ in $(seq 60); do
        state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -n 1 || true)
        case "$state" in
            idle|mix|alloc) say "node $host is $state in partition $PARTITION"; return ;;
            down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    fail "node $host never turned idle (state '${state:-none}'; see $LOG_DIR/slurmctld.log, slurmd.log)"
}

install_packages
start_munge
CHANGED=0
write_conf
start_slurm
wait_idle
