#!/usr/bin/env bash
# A private single-node SLURM for tests and trying out the slurm/ scripts on one machine.
#
#   eval "$(bash slurm/private-cluster.sh start DIR)"   # prints: export SLURM_CONF=DIR/slurm.conf
#   sbatch -n 2 slurm/single-node.sbatch job.toml
#   bash slurm/private-cluster.sh stop DIR
#
# `start` runs as root (SlurmUser=root) and keeps everything under DIR: its own munge key,
# socket, pid and log files, slurm.conf, state, spool, pid and log files of slurmctld and
# slurmd. The node is this machine (hostname -s at 127.0.0.1) with CPUs=4 whatever the
# core count (SlurmdParameters=config_overrides), in one partition "debug"; no accounting
# (sacct does not work: read exit codes from `sbatch --wait` or `scontrol show job`).
# The ports are free ones picked at start, so several private clusters can run at once.
# It returns once the node is idle, and prints the line that points sbatch, srun, sinfo
# ... at this cluster. Logs: DIR/*.log.
#
# `stop` cancels the cluster's jobs, then ends slurmd, slurmctld and munged by the pids
# in DIR's pid files (each checked to still be that daemon) and nothing else.
#
# Needs Debian's slurm-wlm and munge (bash .ci/setup mpi,test,slurm installs them).
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
conf=$dir/slurm.conf

# daemon_pid NAME: the pid in DIR/NAME.pid if that process is still NAME, else nothing.
daemon_pid() {
    local pid
    pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 0
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
    return 0
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "$0: $tool not found: apt-get install slurm-wlm munge" >&2; exit 1; }
    done
    for name in munged slurmctld slurmd; do
        [ -z "$(daemon_pid $name)" ] || { echo "$0: $name already runs for $dir; stop it first" >&2; exit 1; }
    done
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir/munge"
    [ -s "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    # --force: DIR may sit in a folder only root can enter (pytest, mktemp), which munged
    # would refuse for its socket; all clients here run as root.
    munged --force --socket="$dir/munge/socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

    local host ctld_port slurmd_port
    host=$(hostname -s)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    cat >"$conf" <<EOF
# Written by slurm/private-cluster.sh: a private single-node cluster under $dir.
ClusterName=mpinfer
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    slurmd -f "$conf"
    local state=""
    for _ in $(seq 300); do
        state=$(sinfo -h -o %T 2>/dev/null || true)
        [ "$state" = idle ] && { echo "export SLURM_CONF=$conf"; return 0; }
        sleep 0.1
    done
    echo "$0: the node is not idle after 30 s (sinfo: '$state'); see $dir/*.log" >&2
    stop
    exit 1
}

stop() {
    if [ -n "$(daemon_pid slurmctld)" ] && [ -f "$conf" ]; then
        # Jobs first, so that no slurmstepd or task outlives the daemons.
        SLURM_CONF=$conf scancel --quiet --user=root 2>/dev/null || true
        for _ in $(seq 100); do
            [ -z "$(SLURM_CONF=$conf squeue -h 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    local name pid
    for name in slurmd slurmctld munged; do
        pid=$(daemon_pid $name)
        [ -n "$pid" ] || continue
        kill "$pid"
        # The daemon removes its pid file before it exits: wait for the process itself.
        for _ in $(seq 100); do
            [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = $name ] || break
            sleep 0.1
        done
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = $name ]; then
            kill -KILL "$pid"
        fi
    done
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
