#!/usr/bin/env bash
# `make bench`: the benchmarks whose results BENCHMARKS.md records.
#
# 1. One stage (read + ack-and-forward) against raw pipelined XADD, on a private
#    redis-server (crates/streams-core/examples/stage_bench.rs).
# 2. The whole pipeline, four service processes on one redis-server (`tickflow bench`):
#    as fast as accepted, at a fixed 10,000 events/s, and with tracing at 1 % and 100 %.
# 3. redis-benchmark XADD on a redis-server of its own, for scale, and what one short script
#    call costs Redis back to back and after a short idle (the VM's wake-up cost).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EVENTS="${EVENTS:-200000}"

echo "== machine"
echo "nproc=$(nproc)  cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\"  $(redis-server --version | cut -d' ' -f1-3)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
# On a VM, guest halt-polling decides what waking an idle vCPU costs (see the idle-cost
# figures at the end): 0 means every wake-up goes through the host.
echo "guest_halt_poll_ns: $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo 'n/a (no haltpoll driver)')"

cargo build --release -p tickflow -p streams-core --features tickflow/local-bench,streams-core/test-util --bins --example stage_bench

echo
echo "== one stage (cargo run --release -p streams-core --features test-util --example stage_bench -- --batch 64,256,1024)"
target/release/examples/stage_bench --batch 64,256,1024 2>/dev/null

echo
echo "== pipeline, as fast as accepted (tickflow bench --events $EVENTS)"
target/release/tickflow bench --events "$EVENTS"
echo
echo "== pipeline at a fixed 10,000 events/s (tickflow bench --events 100000 --rate 10000)"
target/release/tickflow bench --events 100000 --rate 10000
for ratio in 0.01 1; do
    echo
    echo "== pipeline with tracing, sampling $ratio (tickflow bench --events 100000 --trace-ratio $ratio)"
    target/release/tickflow bench --events 100000 --trace-ratio "$ratio"
done

echo
echo "== redis-benchmark XADD (same machine, its own redis-server)"
port=6390
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
dir=$(mktemp -d)
redis-server --port "$port" --save "" --appendonly no --dir "$dir" --daemonize yes --logfile "$dir/log"
sleep 0.5
for args in "-c 1" "-c 50" "-c 50 -P 50"; do
    printf '%-14s' "$args:"
    # shellcheck disable=SC2086
    redis-benchmark -p "$port" -n 200000 $args -q XADD benchstream '*' f v | tr '\r' '\n' | tail -1
done

echo
echo "== idle cost: one short script call (one XADD) back to back and after 1 ms / 3 ms idle"
# Redis's own time per call (INFO commandstats), so the client's side is not in it.
sha=$(redis-cli -p "$port" SCRIPT LOAD "return redis.call('XADD', KEYS[1], '*', 'f', 'v')")
for gap in 0 0.001 0.003; do
    redis-cli -p "$port" CONFIG RESETSTAT >/dev/null
    redis-cli -p "$port" -r 2000 -i "$gap" EVALSHA "$sha" 1 idlestream >/dev/null
    usec=$(redis-cli -p "$port" INFO commandstats | tr -d '\r' |
        sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')
    printf 'gap %-6s s: %s µs per call\n' "$gap" "$usec"
done
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
rm -rf "$dir"
