# shellcheck shell=bash
# Shared by slurm/*.sbatch (sourced). Everything a job needs between sbatch and launch/train.py:
# the node/GPU/CPU shape from Slurm's environment, the rendezvous, per-job directories, the
# launcher (one srun task per GPU, or one torchrun per node), preemption forwarding, requeue with
# a restart cap, and one line naming the cause when the job fails. docs/slurm.md explains it.
#
# Knobs (environment, all optional; sbatch passes the submitting shell's environment through):
#   ZENLM_ROOT            the zenlm checkout (default: $SLURM_SUBMIT_DIR: submit from it)
#   ZENLM_PYTHON          interpreter (default: $ZENLM_ROOT/.venv/bin/python, else python3)
#   ZENLM_LAUNCHER        srun (default: one task per GPU, zenlm reads SLURM_PROCID/NTASKS/
#                         LOCALID) or torchrun (one task per node running torchrun, c10d)
#   ZENLM_PROCS_PER_NODE  training processes per node (default: GPUs on the node, else
#                         --ntasks-per-node, else 1)
#   ZENLM_RUN_NAME        run directory name under logging.run_dir (default: <job name>-<job
#                         id>; a requeued job keeps its id, so it resumes in the same directory)
#   ZENLM_RUN_DIR         logging.run_dir (default: $ZENLM_ROOT/runs)
#   ZENLM_LOG_ROOT        parent of the per-run log folders (default: $ZENLM_ROOT/logs)
#   ZENLM_LOG_DIR         this run's failure records (default: $ZENLM_LOG_ROOT/<run name>)
#   ZENLM_MAX_RESTARTS    requeues allowed after preemption (default 10; SLURM_RESTART_COUNT)
#   ZENLM_SRUN_ARGS       more srun options for the training step (--mpi=pmix, --container-image=...)
#   ZENLM_STOP_GRACE_S    seconds torchrun waits for its workers to save after a stop signal
#                         before it kills them (default 600; keep it below the --signal lead)

set -euo pipefail

ZENLM_PREEMPTED_EXIT_CODE=75 # launch/train.py: stop signal received, state saved, requeue me

zen_log() { echo "[zenlm $(date +%T) job ${SLURM_JOB_ID:-?}] $*" >&2; }

zen_die() {
	zen_log "error: $*"
	exit 2
}

zen_setup() {
	[ -n "${SLURM_JOB_ID:-}" ] || zen_die "not inside a Slurm job: submit with sbatch (or launch/submit.py)"
	ZENLM_ROOT=${ZENLM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
	[ -f "$ZENLM_ROOT/launch/train.py" ] ||
		zen_die "ZENLM_ROOT=$ZENLM_ROOT is not a zenlm checkout (no launch/train.py): submit from the checkout or set ZENLM_ROOT"
	if [ -z "${ZENLM_PYTHON:-}" ]; then
		ZENLM_PYTHON=python3
		[ -x "$ZENLM_ROOT/.venv/bin/python" ] && ZENLM_PYTHON=$ZENLM_ROOT/.venv/bin/python
	fi
	ZENLM_LAUNCHER=${ZENLM_LAUNCHER:-srun}
	case $ZENLM_LAUNCHER in srun | torchrun) ;; *) zen_die "ZENLM_LAUNCHER=$ZENLM_LAUNCHER: use srun or torchrun" ;; esac

	NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
	local gpus=${SLURM_GPUS_ON_NODE:-}
	if [ -z "$gpus" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then gpus=${SLURM_GPUS_PER_NODE##*:}; fi
	[ "${gpus:-0}" -gt 0 ] 2>/dev/null || gpus=""
	local tasks=${SLURM_NTASKS_PER_NODE:-}
	tasks=${tasks%%(*} # "2(x3)" -> 2
	PROCS_PER_NODE=${ZENLM_PROCS_PER_NODE:-${gpus:-${tasks:-1}}}
	WORLD_SIZE_TOTAL=$((NNODES * PROCS_PER_NODE))
	CPUS_PER_NODE=${SLURM_CPUS_ON_NODE:-1}

	# Rendezvous: rank 0 (srun) or the c10d store (torchrun) on the first host of the job.
	MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
	MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
	export MASTER_ADDR MASTER_PORT

	ZENLM_RUN_NAME=${ZENLM_RUN_NAME:-${SLURM_JOB_NAME:-zenlm}-$SLURM_JOB_ID}
	ZENLM_RUN_DIR=${ZENLM_RUN_DIR:-$ZENLM_ROOT/runs}
	ZENLM_LOG_DIR=${ZENLM_LOG_DIR:-${ZENLM_LOG_ROOT:-$ZENLM_ROOT/logs}/$ZENLM_RUN_NAME}
	RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
	ZENLM_MAX_RESTARTS=${ZENLM_MAX_RESTARTS:-10}
	export ZENLM_FAILURE_DIR=$ZENLM_LOG_DIR/failures-restart$RESTART_COUNT
	mkdir -p "$ZENLM_LOG_DIR" "$ZENLM_RUN_DIR"
	rm -rf "$ZENLM_FAILURE_DIR"

	zen_network_env
	zen_log "nodes $NNODES ($SLURM_JOB_NODELIST) x $PROCS_PER_NODE processes = world $WORLD_SIZE_TOTAL," \
		"launcher $ZENLM_LAUNCHER, master $MASTER_ADDR:$MASTER_PORT, restart $RESTART_COUNT/$ZENLM_MAX_RESTARTS," \
		"run $ZENLM_RUN_DIR/$ZENLM_RUN_NAME"
}

# NCCL, gloo and thread settings, in one place. Defaults only: a value already in the
# environment (the cluster's module, the submitting shell) wins. See docs/slurm.md.
zen_network_env() {
	export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
	# Fail a collective whose peer died instead of hanging until the job's time limit.
	export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
	# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME: the interface that reaches the other nodes
	# (e.g. ib0, eth0, hsn0); unset lets NCCL/gloo choose. NCCL_IB_HCA selects InfiniBand HCAs.
	# One intra-op thread per rank unless told otherwise: CPU ranks share the node's cores.
	if [ -z "${OMP_NUM_THREADS:-}" ]; then
		export OMP_NUM_THREADS=$((CPUS_PER_NODE / PROCS_PER_NODE > 0 ? CPUS_PER_NODE / PROCS_PER_NODE : 1))
	fi
}

# The batch shell receives the preemption signal (#SBATCH --signal=B:USR1@<s>, or
# `scancel --signal=USR1 --batch`, or SIGTERM from a cancel, the time limit or a preemption).
# It forwards SIGUSR1 to every process of the job's steps (scancel without --batch signals all
# steps but not the batch shell): the training processes save at the next step boundary and exit
# 75; DataLoader workers ignore it; torchrun forwards it (TORCHELASTIC_SIGNALS_TO_HANDLE below).
ZEN_SIGNAL=""
zen_forward_signal() {
	ZEN_SIGNAL=$1
	zen_log "received SIG$1: asking the training processes to save and stop"
	scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
}

# zen_step CMD...: run a job step in the background, forwarding stop signals; sets STEP_RC.
zen_step() {
	trap 'zen_forward_signal USR1' USR1
	trap 'zen_forward_signal TERM' TERM
	"$@" &
	local pid=$!
	set +e
	while :; do
		wait "$pid"
		STEP_RC=$?
		kill -0 "$pid" 2>/dev/null || break # still running: wait was interrupted by a trap
	done
	set -e
}

# zen_train CONFIG [a.b=c ...]: launch/train.py on every node, then finish, requeue or fail.
zen_train() {
	[ $# -ge 1 ] || zen_die "usage: sbatch slurm/<script>.sbatch CONFIG.yaml [a.b.c=value ...]"
	local config=$1
	shift
	zen_setup
	[ -f "$config" ] || [ -f "$ZENLM_ROOT/$config" ] || zen_die "config $config not found (relative paths are from $ZENLM_ROOT)"
	cd "$ZENLM_ROOT"
	local run_args=(--config "$config" "logging.run_dir=$ZENLM_RUN_DIR" "logging.run_name=$ZENLM_RUN_NAME" "$@")
	local status_file=$ZENLM_RUN_DIR/$ZENLM_RUN_NAME/exit_status.json
	rm -f "$status_file"

	# --kill-on-bad-exit: one failed task ends the step at once (the others would wait in a
	# collective until its timeout). --export=ALL: the environment above reaches every task.
	local srun_common=(srun --kill-on-bad-exit=1 --export=ALL --nodes="$NNODES")
	# Cluster-specific srun options, e.g. --mpi=pmix or pyxis's --container-image=... (split on spaces).
	# shellcheck disable=SC2206
	srun_common+=(${ZENLM_SRUN_ARGS:-})
	if [ "$ZENLM_LAUNCHER" = srun ]; then
		zen_step "${srun_common[@]}" --ntasks="$WORLD_SIZE_TOTAL" --ntasks-per-node="$PROCS_PER_NODE" \
			--cpus-per-task=$((CPUS_PER_NODE / PROCS_PER_NODE > 0 ? CPUS_PER_NODE / PROCS_PER_NODE : 1)) \
			"$ZENLM_PYTHON" launch/train.py "${run_args[@]}"
	else
		# torchrun handles only TERM/INT/HUP/QUIT unless told: without SIGUSR1 in this list a
		# forwarded USR1 kills it (and its workers with it). On a stop signal it forwards the
		# signal to its workers and kills them after --shutdown_timeout seconds.
		export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
		# The first node's torchrun hosts the c10d store. torchrun guesses that by matching
		# MASTER_ADDR against the local host names, which fails where node names are aliases
		# (or resolve to another address): say it (PET_RDZV_CONF is torchrun's --rdzv_conf).
		zen_step "${srun_common[@]}" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE" \
			bash -c 'PET_RDZV_CONF=is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0) exec "$@"' zenlm-node \
			"$ZENLM_PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$PROCS_PER_NODE" \
			--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
			--max_restarts=0 --shutdown_timeout="${ZENLM_STOP_GRACE_S:-600}" \
			launch/train.py "${run_args[@]}"
	fi
	zen_finish "$STEP_RC" "$status_file"
}

# zen_finish RC STATUS_FILE: exit 0 (finished), requeue (preempted), or fail with the cause.
zen_finish() {
	local rc=$1 status=""
	[ -f "$2" ] && status=$(sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p' "$2")
	if [ "$rc" = 0 ] && [ "$status" = finished ]; then
		zen_log "run finished"
		exit 0
	fi
	if [ "$rc" = "$ZENLM_PREEMPTED_EXIT_CODE" ] || [ "$status" = preempted ]; then
		if [ "$ZEN_SIGNAL" = TERM ]; then
			# A cancel, the time limit, or Slurm's own preemption (which requeues by itself).
			zen_log "stopped by SIGTERM with the state saved; not requeued by this script"
			exit "$ZENLM_PREEMPTED_EXIT_CODE"
		fi
		if [ "$RESTART_COUNT" -ge "$ZENLM_MAX_RESTARTS" ]; then
			zen_log "preempted with the state saved, but restart cap reached ($RESTART_COUNT of ZENLM_MAX_RESTARTS=$ZENLM_MAX_RESTARTS): not requeued; resubmit with ZENLM_RUN_NAME=$ZENLM_RUN_NAME to continue"
			exit "$ZENLM_PREEMPTED_EXIT_CODE"
		fi
		zen_log "preempted with the state saved: requeueing (restart $((RESTART_COUNT + 1)) of at most $ZENLM_MAX_RESTARTS)"
		scontrol requeue "$SLURM_JOB_ID"
		exit 0
	fi
	[ "$rc" = 0 ] && rc=1 # ended without saying it finished
	local first
	first=$(cat "$ZENLM_FAILURE_DIR"/rank-*.txt 2>/dev/null | sort -n | head -n1 | cut -d' ' -f2-)
	if [ -n "$first" ]; then
		rc=${first%% *} # the first failing rank's exit code (srun's is the highest of all tasks)
		zen_log "job failed (exit $rc), not requeued: ${first#* }"
	else
		zen_log "job failed (exit $rc), not requeued: no rank recorded an error (killed by a signal or out of memory?); see srun's lines above"
	fi
	exit "$rc"
}

# zen_convert ARGS...: tools/convert.py ARGS on one task (import / export need no GPU).
zen_convert() {
	[ $# -ge 1 ] || zen_die "usage: sbatch slurm/convert.sbatch import|export ... (see docs/convert.md)"
	zen_setup
	cd "$ZENLM_ROOT"
	zen_step srun --ntasks=1 --nodes=1 --export=ALL "$ZENLM_PYTHON" tools/convert.py "$@"
	if [ "$STEP_RC" = 0 ]; then
		zen_log "conversion finished"
	else
		zen_log "conversion failed (exit $STEP_RC); its error line is above"
	fi
	exit "$STEP_RC"
}
