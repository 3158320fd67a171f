#!/usr/bin/env bash
# Autobahn TestSuite conformance of rtcore's WebSocket transport.
#
# Starts tests/autobahn/echo_server.py (same serve()/transport code as /v1/ws,
# limits raised only where the cases need it, see its docstring) on a free
# port, runs all 517 cases with kosoku (the Autobahn fuzzing client, no
# docker), and exits non-zero when any case fails (kosoku counts NON-STRICT,
# UNIMPLEMENTED and FAILED as failures) or the server dies.
#
# Usage: tests/autobahn/run.sh [extra kosoku args, e.g. -i '9.*']
# Env:   PYTHON (default: python3 on PATH, e.g. the activated venv)
#        AUTOBAHN_PARALLELISM (default 2), AUTOBAHN_REPORTS (default: a temp dir)
set -euo pipefail

KOSOKU_VERSION="0.1.0"  # pinned: case files and verdicts change between releases

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
parallelism="${AUTOBAHN_PARALLELISM:-2}"
reports="${AUTOBAHN_REPORTS:-$(mktemp -d -t autobahn-reports.XXXXXX)}"
mkdir -p "$reports"

installed="$("$python" -c 'import importlib.metadata as m; print(m.version("kosoku"))' 2>/dev/null || true)"
if [[ "$installed" != "$KOSOKU_VERSION" ]]; then
    "$python" -m pip install --quiet "kosoku==$KOSOKU_VERSION"
fi
kosoku="$(dirname "$("$python" -c 'import sys; print(sys.executable)')")/kosoku"
[[ -x "$kosoku" ]] || kosoku="$(command -v kosoku)"

log="$(mktemp -t autobahn-server.XXXXXX.log)"
(cd "$root" && exec "$python" "$here/echo_server.py" --host 127.0.0.1 --port 0) >"$log" 2>&1 &
server_pid=$!
cleanup() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT

port=""
for _ in $(seq 1 100); do
    port="$(awk '/^LISTENING /{print $2; exit}' "$log")"
    [[ -n "$port" ]] && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "echo server exited before listening:" >&2
        cat "$log" >&2
        exit 2
    fi
    sleep 0.1
done
if [[ -z "$port" ]]; then
    echo "echo server did not start listening within 10 s" >&2
    cat "$log" >&2
    exit 2
fi

echo "autobahn: echo server on 127.0.0.1:$port, kosoku $KOSOKU_VERSION -p $parallelism, reports in $reports"
status=0
(cd "$reports" && "$kosoku" -p "$parallelism" -o "$reports" "$@" "127.0.0.1:$port") || status=$?

if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "autobahn: the echo server died during the run" >&2
    cat "$log" >&2
    status=3
fi
if grep -q "Traceback" "$log"; then
    echo "autobahn: the echo server logged errors:" >&2
    cat "$log" >&2
    if [[ "$status" -eq 0 ]]; then status=4; fi
fi
if [[ "$status" -eq 0 ]]; then
    echo "autobahn: all cases passed"
else
    echo "autobahn: FAILED (status $status)" >&2
fi
exit "$status"
