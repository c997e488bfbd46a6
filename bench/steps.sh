# Sourced by the bench scripts that run their checks as logged steps. The script sets `logdir`
# (where each step's output goes, as NAME.log) and `status=0`; `step NAME COMMAND...` runs the
# command, prints its exit status, time and last lines (TAIL, default 25), and keeps the status
# of the first step that failed in `status`.
step() {
    local name=$1
    shift
    local started=$SECONDS
    echo "== $name: $*"
    "$@" >"$logdir/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - started)) s"
    tail -n "${TAIL:-25}" "$logdir/$name.log"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}
