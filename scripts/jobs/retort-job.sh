#!/usr/bin/env bash
# One unattended `retort run` from a git checkout of the recipe repository: the entry point the cron,
# systemd, Slurm and Kubernetes examples beside this file call.
#
#   RETORT_REPO=/srv/recipes RECIPE=recipes/tickets.toml scripts/jobs/retort-job.sh
#
# Environment:
#   RETORT_REPO     the checkout holding the recipe (required); updated with `git pull --ff-only`
#                   unless RETORT_NO_PULL=1
#   RECIPE          the recipe, relative to RETORT_REPO (required)
#   RETORT_BIN      the retort binary (default: `retort` on PATH)
#   RETORT_ARGS     extra arguments for `retort run` (e.g. "--from train")
#   API keys        whatever the recipe's `api_key_env` names (OPENAI_API_KEY, ...); never in the recipe
#
# Exit codes are retort's, passed through unchanged so the scheduler can tell them apart:
#   0 ok · 1 bad input (fix the recipe; retrying will not help) · 2 internal error
#   3 quality gate failed (nothing exported) · 4 stopped or over a limit (resumable: run again)
# A second job that finds one already running on the same checkout exits 75 (EX_TEMPFAIL) at once.
set -uo pipefail

: "${RETORT_REPO:?set RETORT_REPO to the recipe repository checkout}"
: "${RECIPE:?set RECIPE to the recipe path inside RETORT_REPO}"
RETORT_BIN=${RETORT_BIN:-retort}
cd "$RETORT_REPO" || exit 1

# One run per checkout: stages share checkpoints and caches. flock releases the lock when we exit,
# however we exit.
lock="$RETORT_REPO/.retort-job.lock"
[ -d "$RETORT_REPO/.git" ] && lock="$RETORT_REPO/.git/retort-job.lock"   # not an untracked file in the tree
exec 9>"$lock"
if ! flock -n 9; then
  echo '{"level":"WARN","message":"another retort job holds this checkout; not starting"}' >&2
  exit 75
fi

if [ "${RETORT_NO_PULL:-0}" != 1 ]; then
  git pull --ff-only --quiet || { echo '{"level":"ERROR","message":"git pull --ff-only failed"}' >&2; exit 1; }
fi

# Not a terminal: retort logs JSON lines, which journald, Slurm and kubectl logs keep as they are.
export RETORT_LOG_FORMAT=${RETORT_LOG_FORMAT:-json}

# retort must receive SIGTERM itself (pre-emption, `systemctl stop`, pod eviction) to checkpoint and exit 4,
# so it runs in the background and this shell forwards the signal. The trap is set before retort starts
# (a signal in between would otherwise kill this shell with 143 and orphan retort); one that arrives
# before retort's pid is known is remembered and forwarded right after.
child='' pending=''
forward() { if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; else pending=1; fi; }
trap forward TERM INT
# shellcheck disable=SC2086
"$RETORT_BIN" run "$RECIPE" ${RETORT_ARGS:-} &
child=$!
[ -n "$pending" ] && kill -TERM "$child" 2>/dev/null
# `wait` returns early (status > 128) when a trapped signal arrives; wait again while retort runs. Once it
# is gone, one more `wait` gives its own status (bash keeps it), also when the signal cut the last wait
# short just as retort exited.
wait "$child"
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"; code=$?
exit "$code"
