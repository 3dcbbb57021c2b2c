#!/usr/bin/env bash
# A SuperLink and three SuperNodes on 127.0.0.1, then two rounds with `flwr run`.
# Insecure (no TLS) and simulated instance keys: a first look only; see
# docs/deployment.md for TLS, SuperNode authentication and real instance keys.
# Every process is started here and stopped by its PID on exit.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$REPO/.venv/bin"
WORK="${WORK:-$(mktemp -d)}"
PORT="${PORT:-9500}"
export FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 PATH="$BIN:$PATH"
mkdir -p "$FLWR_HOME" "$WORK/logs"
cd "$REPO"  # relative paths in run-config.toml resolve here
if [ -e runs/deploy/state/state.json ]; then echo "runs/deploy holds an earlier run: move it away"; exit 1; fi
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT

cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local-deploy"

[superlink.local-deploy]
address = "127.0.0.1:$PORT"
insecure = true
TOML

flower-superlink --insecure --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$PORT" >"$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
sleep 5
for i in 0 1 2; do
  flower-supernode --insecure --superlink "127.0.0.1:$PORT" \
    --host 127.0.0.1 --port "$((PORT + 10 + i))" \
    --node-config "$(cat "$REPO/examples/deployment/node-$i.conf") state-dir=\"$WORK/instances\"" \
    >"$WORK/logs/node-$i.log" 2>&1 &
  PIDS+=($!)
done
sleep 5
RUN=$(flwr run "$REPO" local-deploy --format json \
  --run-config "$REPO/examples/deployment/run-config.toml" \
  | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["run-id"])')
echo "run $RUN started; logs in $WORK/logs"
for _ in $(seq 200); do
  status=$(flwr ls local-deploy --run-id "$RUN" --format json \
    | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
  case "$status" in finished*) break ;; esac
  sleep 3
done
echo "status: $status"
"$BIN/layerfed" audit verify "$REPO/runs/deploy/audit.jsonl" || true
echo "results in $REPO/runs/deploy: metrics.json, audit.jsonl, state/"
