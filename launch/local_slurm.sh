#!/usr/bin/env bash
# A one-node SLURM cluster on this host, for the tests and for trying launch/slurm.sbatch.
#
#   eval "$(launch/local_slurm.sh up)"   # prints: export SLURM_CONF=...
#   sbatch --wrap hostname
#   launch/local_slurm.sh down
#
# `up` installs slurm-wlm and munge with apt-get if they are missing (root only), writes a
# slurm.conf for this host (proctrack/linuxproc, task/none, select/cons_tres, the host's
# cores and memory), keeps state, logs and its own munge key under one directory, starts
# munged, slurmctld and slurmd, and waits until sinfo shows the node idle. `down` stops
# exactly the daemons `up` started (their PID files) and removes nothing else.
#
# Environment:
#   LOCAL_SLURM_DIR   where conf, state, logs, key and PID files live (default /tmp/sidpipe-slurm)
#   LOCAL_SLURM_PORT  slurmctld's port; slurmd uses the next one (default 6817)
# Exit status: 0 up (or down); 3 this host cannot run it (not root, no apt-get): the reason
# is printed; 1 a daemon failed to start (its log is printed).
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-/tmp/sidpipe-slurm}"
PORT="${LOCAL_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
DAEMONS=(slurmd slurmctld munged)  # stopped in this order

die() { echo "local_slurm.sh: error: $*" >&2; exit 1; }
unavailable() { echo "local_slurm.sh: unavailable: $*" >&2; exit 3; }
[[ "$DIR" =~ ^/[^[:space:]\'\"]+$ ]] || die "LOCAL_SLURM_DIR='$DIR' must be an absolute path without spaces"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "LOCAL_SLURM_PORT=$PORT must be a port number"

install_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return 0
  fi
  [[ "$(id -u)" == 0 ]] || unavailable "slurm-wlm/munge are not installed and this is not root"
  command -v apt-get >/dev/null || unavailable "slurm-wlm/munge are not installed and there is no apt-get"
  echo "local_slurm.sh: installing slurm-wlm and munge (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || unavailable "apt-get update failed"
  apt-get install -y -qq slurm-wlm munge >&2 || unavailable "apt-get install slurm-wlm munge failed"
}

running() {  # running NAME: its PID file names a live process
  local pidfile="$DIR/run/$1.pid"
  [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

write_conf() {
  local host cpus mem_mb
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10240 ))
  cat >"$CONF" <<EOF
# written by launch/local_slurm.sh: a one-node cluster on $host
ClusterName=sidpipe-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s).
# slurmd refuses to launch a job whose credential it revoked less than this ago, so a
# requeued job forced to start sooner fails log-less ("Job credential revoked").
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MessageTimeout=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

up() {
  install_missing
  mkdir -p "$DIR"/{state,spool,log,munge,run}
  chmod 700 "$DIR/munge"
  export SLURM_CONF="$CONF"
  if running slurmctld && running slurmd && running munged; then
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  write_conf
  if [[ ! -s "$DIR/munge/munge.key" ]]; then
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
  fi
  running munged || munged --force --key-file="$DIR/munge/munge.key" \
    --socket="$DIR/munge/munge.socket" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start: $(tail -n 5 "$DIR/log/munged.log" 2>/dev/null)"
  running slurmctld || slurmctld -f "$CONF" \
    || die "slurmctld did not start: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
  running slurmd || slurmd -f "$CONF" \
    || die "slurmd did not start: $(tail -n 5 "$DIR/log/slurmd.log" 2>/dev/null)"
  local state=""
  for _ in $(seq 120); do
    state="$(sinfo -h -o %t 2>/dev/null || true)"
    if [[ "$state" == idle* ]]; then
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "local_slurm.sh: the node did not become idle (sinfo: '${state}')" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
}

down() {
  local name pid
  for name in "${DAEMONS[@]}"; do
    [[ -s "$DIR/run/$name.pid" ]] || continue
    pid="$(cat "$DIR/run/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$DIR/run/$name.pid"
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $(basename "$0") up|down" >&2; exit 2 ;;
esac
