#!/usr/bin/env bash
# A real single-node SLURM on this machine for tests/test_slurm.py, all its state in one folder:
#
#   bash tests/slurm_cluster.sh start DIR    # munged, slurmctld, slurmd on localhost; DIR/env.sh
#   bash tests/slurm_cluster.sh stop DIR     # cancel jobs, stop the daemons, kill what is left
#
# Needs root and Debian's slurm-wlm and munge (.ci/run installs them); no systemd: the daemons
# are started directly. The node is this machine's short host name at 127.0.0.1, with the CPUs
# and memory `slurmd -C` finds. No cgroup plugin is loaded (proctrack/linuxproc, task/none),
# so it also runs in a container. cred_expire=10 makes a requeued job start again ~10 s later
# (SLURM's default, 120 s, is the wait before a requeued job may run).
set -euo pipefail
what=${1:?usage: slurm_cluster.sh start|stop DIR}
S=${2:?usage: slurm_cluster.sh start|stop DIR}
mkdir -p "$S"
S=$(cd "$S" && pwd -P)
export SLURM_CONF=$S/slurm.conf

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  mkdir -p "$S"/{munge,state,spool,log,pids}
  chmod 711 "$S" "$S/munge"                       # munged wants its socket folder traversable
  if [ -r /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$S/munge/munge.key"
  else dd if=/dev/urandom of="$S/munge/munge.key" bs=1 count=128 status=none; fi
  chmod 600 "$S/munge/munge.key"
  local socket=$S/munge/munge.socket.2 node line
  munged --force --socket="$socket" --key-file="$S/munge/munge.key" --log-file="$S/log/munged.log" \
    --pid-file="$S/pids/munged.pid" --seed-file="$S/munge/munged.seed"
  for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
  node=$(hostname -s)
  line=$(slurmd -C | head -n 1)                   # NodeName=... CPUs=... RealMemory=...
  line=${line/NodeName=* CPUs=/NodeName=$node CPUs=}
  cat > "$SLURM_CONF" <<EOF
ClusterName=snclrtest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket,cred_expire=10
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/pids/slurmctld.pid
SlurmdPidFile=$S/pids/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
PlugStackConfig=$S/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
KillWait=30
MinJobAge=600
InactiveLimit=0
$line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  : > "$S/plugstack.conf"
  echo "CgroupAutomount=no" > "$S/cgroup.conf"
  echo "export SLURM_CONF=$SLURM_CONF" > "$S/env.sh"
  slurmctld -f "$SLURM_CONF" -i
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
  slurmd -f "$SLURM_CONF" -N "$node"
  local state=
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case $state in
      idle|mixed|allocated) echo "slurm up: node $node ($S)"; return 0 ;;
      down*|drain*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  echo "node $node did not come up (state '$state'); logs in $S/log" >&2
  tail -n 20 "$S/log/slurmctld.log" "$S/log/slurmd.log" >&2 || true
  return 1
}

stop() {
  local pid
  if [ -f "$SLURM_CONF" ]; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  sleep 1
  [ -S "$S/munge/munge.socket.2" ] && munged --stop --socket="$S/munge/munge.socket.2" >/dev/null 2>&1 || true
  # what is left of this cluster: its daemons and job steps, found by their state folder
  for pid in $(pgrep -f "$S" || true) $(cat "$S"/pids/*.pid 2>/dev/null || true); do
    [ "$pid" != $$ ] && kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in $(pgrep -x slurmstepd || true); do
    if ls -l "/proc/$pid/fd" 2>/dev/null | grep -qF -- "$S/"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  echo "slurm stopped ($S)"
}

"$what"
