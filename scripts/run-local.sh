#!/usr/bin/env bash
# `make run`: a local tickflow pipeline with a demo load.
#
# Builds release binaries, starts a redis-server on a free port unless REDIS_URL is set,
# loads the demo reference data, starts ingest, transform, engine and analytics and a
# demo load, prints where to look, and stops everything on Ctrl-C.
#
# On a Redis Cluster: TICKFLOW_REDIS_MODE=cluster with REDIS_URL listing seed nodes uses
# that cluster; TICKFLOW_REDIS_MODE=cluster without REDIS_URL starts a local one first
# (3 masters and 3 replicas on the first free ports from 7000, whose bus ports, +10000,
# are free too; redis-cli creates it).
#
# Overrides: REDIS_URL, TICKFLOW_REDIS_MODE, TICKFLOW_NAMESPACE, INGEST_HTTP (8080),
# TRANSFORM_HTTP (8081), ENGINE_HTTP (8082), ANALYTICS_HTTP (8083), INGEST_GRPC_PORT
# (50051), LOAD_RATE (200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run_dir=".run"
mkdir -p "$run_dir/logs"
pids=()
redis_pids=()

cleanup() {
    trap - INT TERM EXIT
    echo
    echo "stopping..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for pid in "${redis_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${redis_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    echo "stopped; logs are in $run_dir/logs"
}
trap cleanup INT TERM EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

echo "==> building release binaries"
cargo build --release -p ingest -p transform -p engine -p analytics -p tickflow

# A local Redis Cluster: six nodes, three masters with a replica each.
start_cluster() {
    local ports=() port=7000 node
    while [ "${#ports[@]}" -lt 6 ]; do
        if port_free "$port" && port_free $((port + 10000)); then ports+=("$port"); fi
        port=$((port + 1))
    done
    for port in "${ports[@]}"; do
        node="$PWD/$run_dir/cluster/$port"
        rm -rf "$node"
        mkdir -p "$node"
        redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file nodes.conf --cluster-node-timeout 5000 --save "" \
            --appendonly no --dir "$node" --logfile "$PWD/$run_dir/logs/redis-$port.log" &
        redis_pids+=($!)
    done
    for port in "${ports[@]}"; do
        for _ in $(seq 50); do
            redis-cli -p "$port" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 \
        --cluster-yes >"$run_dir/logs/cluster-create.log" 2>&1
    for port in "${ports[@]}"; do
        for _ in $(seq 100); do
            redis-cli -p "$port" cluster info 2>/dev/null | grep -q cluster_state:ok && break
            sleep 0.1
        done
    done
    REDIS_URL=$(printf 'redis://127.0.0.1:%s,' "${ports[@]}")
    export REDIS_URL="${REDIS_URL%,}"
    echo "==> started a Redis Cluster on ports ${ports[*]} (3 masters, 3 replicas)"
}

if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server is not installed: apt-get install redis-server, or set REDIS_URL" >&2
    exit 1
fi
if [ -z "${REDIS_URL:-}" ] && [ "${TICKFLOW_REDIS_MODE:-standalone}" = cluster ]; then
    start_cluster
elif [ -z "${REDIS_URL:-}" ]; then
    port=6380
    while ! port_free "$port"; do port=$((port + 1)); done
    mkdir -p "$run_dir/redis"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$run_dir/redis" --logfile "$PWD/$run_dir/logs/redis.log" &
    redis_pids+=($!)
    export REDIS_URL="redis://127.0.0.1:$port"
    for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "==> started redis-server on port $port"
fi
export TICKFLOW_NAMESPACE="${TICKFLOW_NAMESPACE:-tickflow}"
export RUST_LOG="${RUST_LOG:-info}"

bin=target/release
echo "==> loading reference data (demo/instruments.json)"
"$bin/transform" load-refdata demo/instruments.json

ingest_http="${INGEST_HTTP:-8080}"
grpc_port="${INGEST_GRPC_PORT:-50051}"
start() {
    local name=$1
    shift
    env "$@" "$bin/$name" >"$run_dir/logs/$name.log" 2>&1 &
    pids+=($!)
}
start transform HTTP_ADDR="127.0.0.1:${TRANSFORM_HTTP:-8081}" CONSUMER_NAME=transform-1
start engine HTTP_ADDR="127.0.0.1:${ENGINE_HTTP:-8082}" CONSUMER_NAME=engine-1
start analytics HTTP_ADDR="127.0.0.1:${ANALYTICS_HTTP:-8083}" CONSUMER_NAME=analytics-1
start ingest HTTP_ADDR="127.0.0.1:$ingest_http" GRPC_ADDR="127.0.0.1:$grpc_port" CONSUMER_NAME=ingest-1
sleep 1
"$bin/tickflow" load --grpc "http://127.0.0.1:$grpc_port" --rate "${LOAD_RATE:-200}" >"$run_dir/logs/load.log" 2>&1 &
pids+=($!)

cat <<INFO

tickflow is running (Redis: $REDIS_URL, ${TICKFLOW_REDIS_MODE:-standalone}; namespace: $TICKFLOW_NAMESPACE), with a demo load.

  send an order    curl -s -XPOST localhost:$ingest_http/v1/orders -H 'content-type: application/json' -d '{"symbol":"AAPL","side":"buy","type":"market","qty":5}'
  stats            curl -s localhost:${ANALYTICS_HTTP:-8083}/v1/symbols/AAPL/stats
  1 s bars         curl -s 'localhost:${ANALYTICS_HTTP:-8083}/v1/symbols/AAPL/bars?interval=1s'
  latency          curl -s localhost:${ANALYTICS_HTTP:-8083}/v1/latency
  stage status     curl -s localhost:${ENGINE_HTTP:-8082}/admin/status
  metrics          curl -s localhost:${TRANSFORM_HTTP:-8081}/metrics
  logs             tail -f $run_dir/logs/*.log

Ctrl-C stops everything.
INFO
wait "${pids[@]}"
