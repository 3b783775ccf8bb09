#!/usr/bin/env bash
# `make run`: the whole stack on fixed local ports, in the foreground.
#   Redis 127.0.0.1:6380 (data in .run/redis, AOF on), quota service :8081,
#   demo upstream :8082, Envoy :10000 (admin :9901) with envoy/envoy.yaml.
# Logs go to .run/logs/. Ctrl-C (or any process dying) stops everything.
# Expects the binaries built (`make build`); SLUICE_BIN overrides the service binary.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/.run
LOGS=$RUN/logs
SLUICE_BIN=${SLUICE_BIN:-$ROOT/target/debug/sluice}
ENVOY_BIN=$("$ROOT/scripts/envoy-bin.sh")

REDIS_PORT=6380
SERVICE_ADDR=127.0.0.1:8081
UPSTREAM_ADDR=127.0.0.1:8082
QUEUE_ADDR=127.0.0.1:8083
ENVOY_PORT=10000
ADMIN_PORT=9901

say() { printf 'run: %s\n' "$*" 2>/dev/null || true; }
die() { say "$*" >&2; exit 1; }

[ -x "$SLUICE_BIN" ] || die "$SLUICE_BIN is missing: run 'make build'"
[ -f "$ROOT/dist/sluice.wasm" ] || die "dist/sluice.wasm is missing: run 'make wasm'"
command -v redis-server >/dev/null || die "redis-server is missing: run 'make deps'"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$REDIS_PORT" 8081 8082 8083 "$ENVOY_PORT" "$ADMIN_PORT"; do
  port_busy "$port" && die "127.0.0.1:$port is already in use (another 'make run'?); stop it first"
done

mkdir -p "$RUN/redis" "$LOGS"
TOKEN_FILE=$RUN/admin-token
if [ ! -s "$TOKEN_FILE" ]; then
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TOKEN_FILE")
fi
ADMIN_TOKEN=$(cat "$TOKEN_FILE")

# Children and their names, in start order; stopped in reverse.
pids=()
names=()
stopping=0
stop_all() {
  [ "$stopping" = 1 ] && return
  [ "${#pids[@]}" -gt 0 ] || return 0
  stopping=1
  # Ignore further signals while stopping: `kill -TERM -- -<pgid>` reaches this
  # script twice (once directly, once forwarded by make), and a second one must
  # not cut the stop short and leave the children running.
  trap '' INT TERM HUP
  # Stop the children even if our terminal or pipe is gone (say would die of SIGPIPE).
  trap '' PIPE
  say "stopping..."
  local i pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[$i]}
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      say "${names[$i]} did not stop in 5 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  say "stopped"
}
trap stop_all EXIT
# Ctrl-C is how a user stops the stack: a clean stop, status 0. The handler
# ignores further signals before anything else: a second TERM (the group kill
# plus make's forward) arriving before stop_all's own `trap ''` used to run
# `exit` inside the EXIT trap and leave every child running.
on_signal() {
  trap '' INT TERM HUP
  stop_all
  exit 0
}
trap on_signal INT TERM HUP

# start NAME LOGFILE CMD...: runs CMD in the background with output to LOGFILE,
# in its own session so a terminal's Ctrl-C reaches only this script, which
# then stops the children in reverse start order.
start() {
  local name=$1 log=$2
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  pids+=("$!")
  names+=("$name")
}

# wait_for NAME CHECK...: polls CHECK for up to 30 s; fails if the last started child died.
wait_for() {
  local name=$1
  shift
  for _ in $(seq 300); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { tail -n 30 "$LOGS/$name.log" >&2; die "$name exited (log: .run/logs/$name.log)"; }
    sleep 0.1
  done
  tail -n 30 "$LOGS/$name.log" >&2
  die "$name did not become ready in 30 s (log: .run/logs/$name.log)"
}

say "starting redis on 127.0.0.1:$REDIS_PORT (data: .run/redis, AOF on)"
start redis "$LOGS/redis.log" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN/redis" \
  --appendonly yes --save "" --daemonize no --protected-mode no --logfile ""
wait_for redis redis-cli -p "$REDIS_PORT" ping

say "starting the quota service on $SERVICE_ADDR (queue listener $QUEUE_ADDR, upstreams envoy/upstreams.json)"
start sluice "$LOGS/sluice.log" "$SLUICE_BIN" serve --listen "$SERVICE_ADDR" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT/" --admin-token-file "$TOKEN_FILE" \
  --queue-listen "$QUEUE_ADDR" --upstreams envoy/upstreams.json --workers 2
wait_for sluice curl -fsS "http://$SERVICE_ADDR/healthz"

say "starting the demo upstream on $UPSTREAM_ADDR"
start demo-upstream "$LOGS/demo-upstream.log" "$SLUICE_BIN" demo-upstream --listen "$UPSTREAM_ADDR"
wait_for demo-upstream port_busy 8082

say "starting envoy on 127.0.0.1:$ENVOY_PORT (admin 127.0.0.1:$ADMIN_PORT)"
start envoy "$LOGS/envoy.log" "$ENVOY_BIN" -c envoy/envoy.yaml --concurrency 2 --disable-hot-restart
wait_for envoy bash -c "curl -fsS http://127.0.0.1:$ADMIN_PORT/ready | grep -qx LIVE && (exec 3<>/dev/tcp/127.0.0.1/$ENVOY_PORT)"

cat <<EOF

Sluice is up. Logs: .run/logs/   Ctrl-C stops everything.

  admin token (.run/admin-token): $ADMIN_TOKEN

  T=demo-\$(date +%s)    # a fresh free-tier tenant (100 requests an hour)
  # a request (cost 2: the chat policy)
  curl -i localhost:$ENVOY_PORT/v1/chat/completions -H "x-tenant-id: \$T" \\
       -H 'content-type: application/json' -d '{"model":"gpt-3.5-turbo","messages":[]}'
  # no tenant header: 401; exempt path: no quota
  curl -i localhost:$ENVOY_PORT/v1/models
  curl -i localhost:$ENVOY_PORT/healthz
  # flood a fresh free-tier tenant (100/hour): 100 admitted, then 429
  F=flood-\$(date +%s)
  for i in \$(seq 1 101); do curl -s -o /dev/null -w '%{http_code}\\n' localhost:$ENVOY_PORT/v1/models -H "x-tenant-id: \$F"; done | sort | uniq -c
  # admin: see and change a tenant
  curl -s localhost:8081/v1/admin/tenants/\$F -H "authorization: Bearer $ADMIN_TOKEN"
  curl -s -X PUT localhost:8081/v1/admin/tenants/\$F/tier -H "authorization: Bearer $ADMIN_TOKEN" \\
       -H 'content-type: application/json' -d '{"tier":"pro"}'
  # the gpu route has a capacity of 5 requests/s (envoy/upstreams.json): overflow waits in the queue
  for i in \$(seq 1 20); do curl -s -o /dev/null -w '%{http_code} %{time_total}s\\n' localhost:$ENVOY_PORT/v1/gpu/run -H "x-tenant-id: \$T" & done; wait
  # async: 202 + Location only for a request that overflows, so send it during a burst
  for i in \$(seq 1 20); do curl -s -o /dev/null localhost:$ENVOY_PORT/v1/gpu/run -H "x-tenant-id: \$T" & done
  sleep 0.5
  L=\$(curl -si localhost:$ENVOY_PORT/v1/gpu/run -H "x-tenant-id: \$T" -H 'prefer: respond-async' | tr -d '\\r' | sed -n 's/^location: //p')
  echo "\$L"; curl -s localhost:8081/v1/queue/stats; wait
  # the upstream's answer, x-sluice-queue-status: done (202: still queued, ask again;
  # empty \$L: admitted directly, rerun the 4 lines above; each round spends 21 of \$T's 100/hour)
  sleep 1; [ -n "\$L" ] && curl -si localhost:$ENVOY_PORT\$L -H "x-tenant-id: \$T"
  # filter counters
  curl -s localhost:$ADMIN_PORT/stats/prometheus | grep '^sluice_'

EOF

# Wait until a child exits (then stop the rest) or a signal arrives.
set +e
wait -n "${pids[@]}"
status=$?
set -e
if [ "$stopping" = 0 ]; then
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      say "${names[$i]} exited ($status); last lines of .run/logs/${names[$i]}.log:"
      tail -n 20 "$LOGS/${names[$i]}.log" >&2 || true
    fi
  done
  exit 1
fi
