# Time-boxed steps for the GPU scripts (sourced by gpu_check.sh and gpu_models.sh): each step runs under its
# own cap, never past the script's overall budget, and adds one line to the summary.
# Needs START (the script's start, date +%s), BUDGET_S, LOG_DIR and SUMMARY set by the script.

elapsed() { echo $(( $(date +%s) - START )); }
# Seconds a step may take: its own cap, but never past the overall budget (minus 10 s to write up).
allow() { local left=$(( BUDGET_S - $(elapsed) - 10 )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
# run NAME CAP_S CMD...: run with a timeout (SIGINT first, so pytest still prints its summary), log it,
# and add one line to the summary.
run() {
  local name=$1 cap; cap=$(allow "$2"); shift 2
  echo "== $name (timeout ${cap}s): $*"
  local t0; t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$cap" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local last; last=$(grep -E "passed|failed|error|skipped|no tests ran" "$LOG_DIR/$name.log" | tail -n 1)
  [[ $rc == 124 ]] && last="TIMED OUT after ${cap}s; $last"
  printf '%-12s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$last" | tee -a "$SUMMARY"
  return "$rc"
}
