#!/usr/bin/env bash
# stop.sh - tear down the cluster tests/slurm/cluster/start.sh started.
# Idempotent. Kills only the PIDs recorded in our pid files (after checking the
# process name), never by name. Options:
#   --keep-munge   leave munged running
#   --keep-etc     leave /etc/hosts entries and /etc/slurm/slurm.conf symlink
#   --purge        also delete state/spool/log dirs (not the munge key)
set -uo pipefail
ROOT=${LOCAL_SLURM_ROOT:-${TMPDIR:-/tmp}/zenlm-slurm}
MARK="# zenlm-test-slurm:${ROOT}"
KEEP_MUNGE=0; KEEP_ETC=0; PURGE=0
for a in "$@"; do case $a in
  --keep-munge) KEEP_MUNGE=1;; --keep-etc) KEEP_ETC=1;; --purge) PURGE=1;;
  *) echo "unknown option $a" >&2; exit 2;; esac; done
log() { echo "[zenlm-slurm stop $(date +%T)] $*" >&2; }
export SLURM_CONF="$ROOT/etc/slurm.conf"

pid_of() { local p; p=$(cat "$1" 2>/dev/null) || return 1; [ -n "$p" ] && [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$2" ] && echo "$p"; }
# stop_pids COMM FILE... : SIGTERM every live pid named in FILEs (checking the
# process name first), wait up to 15 s, then SIGKILL what is left
stop_pids() {
  local comm=$1 f p n=0; shift; local pids=()
  for f in "$@"; do
    [ -e "$f" ] || continue
    if p=$(pid_of "$f" "$comm"); then pids+=("$p"); log "stopping $comm pid $p"; kill -TERM "$p" 2>/dev/null; fi
    rm -f "$f"
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  while :; do
    local left=()
    for p in "${pids[@]}"; do [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$comm" ] && left+=("$p"); done
    [ ${#left[@]} -eq 0 ] && return 0
    n=$((n+1))
    if [ $n -ge 150 ]; then log "SIGKILL $comm ${left[*]}"; kill -KILL "${left[@]}" 2>/dev/null; return 0; fi
    sleep 0.1
  done
}

# 1. cancel all jobs while slurmctld/slurmd are still up, so that their
#    slurmstepd processes exit normally instead of being orphaned
if [ -n "$(pid_of "$ROOT/run/slurmctld.pid" slurmctld)" ] && command -v squeue >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | paste -sd' ' -)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $jobs"; scancel $jobs 2>/dev/null
    for _ in $(seq 1 60); do [ -z "$(squeue -h -t R,CG,S,PD -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

# 2. slurmd's, then slurmctld, then munged
stop_pids slurmd "$ROOT"/run/slurmd-*.pid
stop_pids slurmctld "$ROOT/run/slurmctld.pid"
[ "$KEEP_MUNGE" = 1 ] || stop_pids munged "$ROOT/munge/run/munged.pid"

# 3. report (never kill) stray step daemons; they would belong to us only if
#    the job cancel above timed out
stray=$(for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = slurmstepd ] && echo "${d#/proc/}"; done | paste -sd' ' -)
[ -n "$stray" ] && log "warning: slurmstepd processes still present: $stray"

# 4. undo /etc changes made by start.sh
if [ "$KEEP_ETC" = 0 ]; then
  if grep -qF "$MARK" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount in containers: rewrite in place, not mv
    grep -vF "$MARK" /etc/hosts > "$ROOT/hosts.tmp" && cat "$ROOT/hosts.tmp" > /etc/hosts && rm -f "$ROOT/hosts.tmp"
  fi
  [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$ROOT/etc/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
fi
[ "$PURGE" = 1 ] && rm -rf "$ROOT/state" "$ROOT/spool" "$ROOT/log" "$ROOT/run"
log "stopped"
exit 0
