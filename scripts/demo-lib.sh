# Shared by the demo scripts (sourced, not run): stopping everything a demo started, by
# pid, on exit or Ctrl-C, and the step headings.
# Needs RUN_DIR (logs) and PIDS (started processes); a demo whose helper processes start
# more sets PID_FILE, one pid per line.

cleanup() {
    local pid
    if [[ -n "${PID_FILE:-}" && -f "${PID_FILE}" ]]; then
        mapfile -t -O "${#PIDS[@]}" PIDS <"${PID_FILE}" || true
    fi
    for pid in "${PIDS[@]}"; do kill "${pid}" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -9 "${pid}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "demo: stopped ${#PIDS[@]} processes; logs were in ${RUN_DIR}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n==> %s\n' "$*"; }
