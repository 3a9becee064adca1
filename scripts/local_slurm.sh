#!/usr/bin/env bash
# A one-node SLURM cluster with accounting, in a temp dir: for the `slurm` tests (make test-slurm)
# and for trying eenn's launcher presets by hand. Needs root: it installs Debian's slurm-wlm,
# slurmdbd, munge and mariadb-server with apt when they are missing, and runs every daemon as root.
#   scripts/local_slurm.sh start    # prints the dir; then `export SLURM_CONF=<dir>/slurm.conf`
#   scripts/local_slurm.sh status
#   scripts/local_slurm.sh stop     # kills only the daemons it started (by their pid files), removes the dir
# EENN_SLURM_DIR picks the dir (default /tmp/eenn-slurm). Accounting goes through slurmdbd to a
# private mariadbd on 127.0.0.1, so `sacct` works (and submitit's polls stop warning).
set -euo pipefail
DIR=${EENN_SLURM_DIR:-/tmp/eenn-slurm}
CONF=$DIR/slurm.conf
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)  # the order they stop in
DB_PORT=16306 DBD_PORT=16819 CTLD_PORT=16817 SLURMD_PORT=16818

die() { echo "local_slurm: $*" >&2; exit 1; }

install() {
  command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
    && command -v mariadbd >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm, slurmdbd, munge and mariadb-server are not all installed, and installing them needs root."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for <what> <command...>: up to 30 s
  local what=$1 end=$((SECONDS + 30)); shift
  while [ $SECONDS -lt $end ]; do "$@" >/dev/null 2>&1 && return; sleep 0.5; done
  die "$what did not come up in 30 s; see $DIR/log/."
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$DIR"/{state,spool,log,munge,db}
  cat > "$CONF" <<CONF
ClusterName=eenn-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
MinJobAge=3600
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  # slurmdbd reads slurmdbd.conf beside slurm.conf, and only if its owner alone can read it
  cat > "$DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=eenn
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
  # Slurm's client commands only talk to munge's default socket: a munged already serving it (the
  # host's own) is used as it is; otherwise one is started there with a key of its own
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
  [ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 2>/dev/null; chmod 400 "$DIR/munge/munge.key"; }
  chmod 700 "$DIR/munge"
  mkdir -p /run/munge
  munged --force --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
}

start_db() {
  local sock=$DIR/db/mysqld.sock
  [ -d "$DIR/db/data/mysql" ] || mariadb-install-db --user=root --datadir="$DIR/db/data" \
    --auth-root-authentication-method=socket --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
  # mariadbd does not daemonize itself; it writes its own pid file
  nohup mariadbd --no-defaults --user=root --datadir="$DIR/db/data" --socket="$sock" --port=$DB_PORT \
    --bind-address=127.0.0.1 --pid-file="$DIR/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
    --innodb-buffer-pool-size=32M >/dev/null 2>&1 &
  wait_for mariadbd mariadb --no-defaults -S "$sock" -u root -e "select 1"
  mariadb --no-defaults -S "$sock" -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'eenn';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'eenn';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start() {
  install
  if running slurmctld && running slurmd; then echo "$DIR"; return; fi
  write_conf
  export SLURM_CONF=$CONF
  running munged || start_munge
  running mariadbd || start_db
  running slurmdbd || slurmdbd
  wait_for slurmdbd sacctmgr -n list cluster
  sacctmgr -i -Q add cluster eenn-local >/dev/null 2>&1 || true  # "already exists" on a restart
  running slurmctld || slurmctld
  running slurmd || slurmd
  wait_for "the node" bash -c "sinfo -h -o %T | grep -qx idle"
  echo "$DIR"
}

stop() {
  # jobs first: a job step's slurmstepd outlives a stopped slurmd and would be left behind
  if running slurmctld; then
    SLURM_CONF=$CONF scancel --user="$(id -un)" 2>/dev/null || true
    local end=$((SECONDS + 30))
    while [ $SECONDS -lt $end ] && { [ -n "$(SLURM_CONF=$CONF squeue -h 2>/dev/null)" ] || pgrep -x slurmstepd >/dev/null; }; do
      sleep 0.5
    done
  fi
  for d in "${DAEMONS[@]}"; do
    if running "$d"; then
      kill "$(cat "$DIR/$d.pid")"
      for _ in $(seq 40); do running "$d" || break; sleep 0.25; done
    fi
  done
  rm -rf "$DIR"
}

status() {
  for d in "${DAEMONS[@]}"; do
    if running "$d"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; else echo "$d: stopped"; fi
  done
  if running slurmctld; then SLURM_CONF=$CONF sinfo; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
