#!/usr/bin/env bash
# `make bench`: the benchmarks whose results BENCHMARKS.md records, in one run, with the
# tables of issues 19 (cost per event, latency in round trips) and 18 (Redis Cluster) at the
# end. 5-10 minutes on 2 cores once built (it prints how long it took); every pipeline run's JSON report is kept in
# $BENCH_OUT (default .run/bench/<UTC time>/).
#
# 1. One stage (read + ack-and-forward) against raw pipelined XADD, on a private
#    redis-server (crates/streams-core/examples/stage_bench.rs).
# 2. The whole pipeline, four service processes (`tickflow bench`), each run on a Redis of
#    its own, runs of one comparison alternated:
#    a. as fast as accepted at 16, 2,000 and 10,000 symbols (Zipf skew 1), $ROUNDS rounds
#       of $EVENTS events;
#    b. 10,000 symbols over 100,000 resting orders (deep books: peak memory);
#    c. at a fixed 10,000 events/s with 16 and with 1 partition, $ROUNDS rounds of
#       $RATE_EVENTS events;
#    d. as fast as accepted on a redis-server and on a 3-master cluster (a replica each),
#       $CLUSTER_ROUNDS rounds of $EVENTS events;
#    e. on the cluster at 10,000 events/s, TICKFLOW_WAIT_REPLICAS 0 and 1, $CLUSTER_ROUNDS
#       rounds of $WAIT_EVENTS events;
#    f. with tracing at 1 % and 100 % ($EVENTS events each).
# 3. redis-benchmark XADD on a redis-server of its own, for scale, and what one short script
#    call costs Redis back to back and after a short idle (the VM's wake-up cost).
# 4. The engine's takeover of a partition with deep books, if its example exists.
# 5. The tables, from the JSON reports of 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EVENTS="${EVENTS:-100000}"
RATE_EVENTS="${RATE_EVENTS:-100000}"
WAIT_EVENTS="${WAIT_EVENTS:-50000}"
ROUNDS="${ROUNDS:-3}"
CLUSTER_ROUNDS="${CLUSTER_ROUNDS:-3}"
RESTING="${RESTING:-100000}"
OUT="${BENCH_OUT:-.run/bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
started=$(date +%s)

echo "== machine"
echo "nproc=$(nproc)  cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\"  $(redis-server --version | cut -d' ' -f1-3)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
# On a VM, guest halt-polling decides what waking an idle vCPU costs (see the idle-cost
# figures at the end): 0 means every wake-up goes through the host.
echo "guest_halt_poll_ns: $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo 'n/a (no haltpoll driver)')"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
echo "reports: $OUT"

cargo build --release -p tickflow -p streams-core --features tickflow/local-bench,streams-core/test-util --bins --example stage_bench

echo
echo "== one stage (cargo run --release -p streams-core --features test-util --example stage_bench -- --batch 64,256,1024)"
target/release/examples/stage_bench --batch 64,256,1024 2>/dev/null

# One line per run, from its JSON report.
summary() {
    python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l, rtt = r["latency_us"], r["redis_rtt_us"]
rss = max((s["peak_rss_mib"] for s in r.get("services", {}).values()), default=0)
print(f'   {r["events_per_sec"]:8.0f} events/s  p50 {l["p50"]} µs = {r["latency_rtt"]["p50"]:.1f} RTT, '
      f'p99 {l["p99"]} µs = {r["latency_rtt"]["p99"]:.1f} RTT (RTT {rtt["p50"]:.0f} µs)  '
      f'Redis {r["redis_cpu_us_per_event"]:.1f} µs, {r["redis_commands_per_event"]:.1f} commands/event  '
      f'peak RSS {rss:.1f} MiB  lost {r["lost"]} dup {r["duplicated"]}')
PY
}

# bench NAME ARGS…: one `tickflow bench ARGS --json`, its report in $OUT/NAME.json.
bench() {
    local name=$1
    shift
    echo "-- $name: tickflow bench $*"
    target/release/tickflow bench "$@" --json >"$OUT/$name.json"
    summary "$OUT/$name.json"
}

echo
echo "== pipeline, as fast as accepted, by symbols (tickflow bench --events $EVENTS --symbols N), alternated"
for round in $(seq "$ROUNDS"); do
    for symbols in 16 2000 10000; do
        bench "symbols-$symbols-$round" --events "$EVENTS" --symbols "$symbols"
    done
done

echo
echo "== deep books (tickflow bench --events $EVENTS --symbols 10000 --resting $RESTING)"
bench "deep-10000" --events "$EVENTS" --symbols 10000 --resting "$RESTING"

echo
echo "== pipeline at a fixed 10,000 events/s, 16 and 1 partitions (tickflow bench --events $RATE_EVENTS --rate 10000 --partitions N), alternated"
for round in $(seq "$ROUNDS"); do
    for partitions in 16 1; do
        bench "rate-p$partitions-$round" --events "$RATE_EVENTS" --rate 10000 --partitions "$partitions"
    done
done

echo
echo "== standalone and a 3-master cluster, as fast as accepted (tickflow bench --events $EVENTS --redis-mode MODE), alternated"
for round in $(seq "$CLUSTER_ROUNDS"); do
    for mode in standalone cluster; do
        bench "mode-$mode-$round" --events "$EVENTS" --redis-mode "$mode"
    done
done

echo
echo "== the cluster at 10,000 events/s, WAIT 0 and 1 (tickflow bench --events $WAIT_EVENTS --rate 10000 --redis-mode cluster --wait-replicas N), alternated"
for round in $(seq "$CLUSTER_ROUNDS"); do
    for wait in 0 1; do
        bench "wait-$wait-$round" --events "$WAIT_EVENTS" --rate 10000 --redis-mode cluster --wait-replicas "$wait"
    done
done

for ratio in 0.01 1; do
    echo
    echo "== pipeline with tracing, sampling $ratio (tickflow bench --events $EVENTS --trace-ratio $ratio)"
    bench "trace-$ratio" --events "$EVENTS" --trace-ratio "$ratio"
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

echo
echo "== engine takeover of a partition with deep books"
# HOOK (issue 19's takeover row): the engine's own example, written separately; runs when
# it exists and prints its own figures.
if [ -f services/engine/examples/takeover_bench.rs ]; then
    echo "(cargo run --release -p engine --example takeover_bench)"
    cargo run --release -p engine --example takeover_bench
else
    echo "not measured: services/engine/examples/takeover_bench.rs does not exist yet"
fi

echo
python3 - "$OUT" "$ROUNDS" "$CLUSTER_ROUNDS" <<'PY'
import glob, json, os, statistics, sys

out, rounds, cluster_rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(f"{out}/*.json")}

def series(prefix, count):
    return [runs[f"{prefix}-{i}"] for i in range(1, count + 1) if f"{prefix}-{i}" in runs]

def med(values):
    values = list(values)
    return statistics.median(values) if values else float("nan")

def each(values, fmt="{:.0f}"):
    return " / ".join(fmt.format(v) for v in values)

sym = {s: series(f"symbols-{s}", rounds) for s in (16, 2000, 10000)}
eps = {s: med(r["events_per_sec"] for r in sym[s]) for s in sym}
# Ratios per round (the runs of one round are minutes apart), then their median.
def ratio(s):
    return med(a["events_per_sec"] / b["events_per_sec"] for a, b in zip(sym[s], sym[16]))
cpu = {s: med(r["redis_cpu_us_per_event"] for r in sym[s]) for s in sym}
cmds = {s: med(r["redis_commands_per_event"] for r in sym[s]) for s in sym}
p16, p1 = series("rate-p16", rounds), series("rate-p1", rounds)
rtt = med(r["redis_rtt_us"]["p50"] for r in p16)
deep = runs.get("deep-10000")
rss_runs = sym[10000] + ([deep] if deep else [])
rss = {name: max(r["services"][name]["peak_rss_mib"] for r in rss_runs)
       for name in ("ingest", "transform", "engine", "analytics")} if rss_runs else {}
lost = sum(r["lost"] for r in runs.values())
dup = sum(r["duplicated"] for r in runs.values())

print(f"== issue 19: cost that does not grow with the work (medians of {rounds} alternated rounds; reports in {out})")
rows = [
    ("events/s, 16 / 2,000 / 10,000 symbols (skew 1)", f"{eps[16]:.0f} / {eps[2000]:.0f} / {eps[10000]:.0f} "
     f"(runs: {each(r['events_per_sec'] for r in sym[16])}; {each(r['events_per_sec'] for r in sym[2000])}; "
     f"{each(r['events_per_sec'] for r in sym[10000])})", "-"),
    ("events/s, 2,000 symbols ÷ 16 symbols", f"{ratio(2000):.2f}", "≥ 0.8"),
    ("events/s, 10,000 symbols ÷ 16 symbols", f"{ratio(10000):.2f}", "≥ 0.7"),
    ("Redis CPU µs per event, 16 / 2,000 / 10,000 symbols", f"{cpu[16]:.1f} / {cpu[2000]:.1f} / {cpu[10000]:.1f}", "≤ 10 / - / ≤ 12"),
    ("Redis commands per event, 16 / 2,000 / 10,000 symbols", f"{cmds[16]:.1f} / {cmds[2000]:.1f} / {cmds[10000]:.1f}", "-"),
    ("p50 / p99 at 10k events/s, 16 partitions, in Redis RTTs",
     f"{med(r['latency_rtt']['p50'] for r in p16):.1f} / {med(r['latency_rtt']['p99'] for r in p16):.1f} "
     f"(p50 {med(r['latency_us']['p50'] for r in p16):.0f} µs, p99 {med(r['latency_us']['p99'] for r in p16):.0f} µs; RTT p50 {rtt:.0f} µs)",
     "≤ 10 / ≤ 25"),
    ("p50 at 10k events/s, 16 partitions ÷ 1 partition",
     f"{med(a['latency_us']['p50'] / b['latency_us']['p50'] for a, b in zip(p16, p1)):.2f} "
     f"(p50 {each(r['latency_us']['p50'] for r in p16)} µs against {each(r['latency_us']['p50'] for r in p1)} µs)",
     "≤ 1.2"),
    ("engine takeover of a partition with 100,000 resting orders", "see \"engine takeover\" above", "pause ≤ 1 s"),
    (f"peak RSS per service, 10,000 symbols (and {deep['resting'] if deep else 0} resting orders), MiB",
     ", ".join(f"{k} {v:.1f}" for k, v in rss.items()), "≤ 64"),
    (f"lost / duplicated, all {len(runs)} runs", f"{lost} / {dup}", "0 / 0"),
]
w = max(len(r[0]) for r in rows)
for name, value, target in rows:
    print(f"  {name:<{w}}  {value}  [target {target}]")

standalone, cluster = series("mode-standalone", cluster_rounds), series("mode-cluster", cluster_rounds)
wait0, wait1 = series("wait-0", cluster_rounds), series("wait-1", cluster_rounds)
print()
print(f"== issue 18: standalone and a 3-master cluster (medians of {cluster_rounds} alternated rounds)")
def mode_row(name, rs):
    if not rs:
        return
    replica = med(r["redis"]["replica_cpu_seconds"] * 1e6 / max(r["accepted"], 1) for r in rs)
    print(f"  {name:<24} {med(r['events_per_sec'] for r in rs):8.0f} events/s   "
          f"Redis {med(r['redis_cpu_us_per_event'] for r in rs):5.1f} µs/event (replicas {replica:.1f}), "
          f"{med(r['redis_commands_per_event'] for r in rs):.1f} commands/event   "
          f"p50 {med(r['latency_us']['p50'] for r in rs):.0f} µs, p99 {med(r['latency_us']['p99'] for r in rs):.0f} µs "
          f"({med(r['latency_rtt']['p50'] for r in rs):.1f} / {med(r['latency_rtt']['p99'] for r in rs):.1f} RTT)")
mode_row("standalone, max", standalone)
mode_row("cluster, max", cluster)
mode_row("standalone, 10k/s", p16)
mode_row("cluster, 10k/s, WAIT 0", wait0)
mode_row("cluster, 10k/s, WAIT 1", wait1)
if wait0 and wait1:
    print(f"  WAIT 1 against WAIT 0 at 10k/s: p50 {med(r['latency_us']['p50'] for r in wait1) - med(r['latency_us']['p50'] for r in wait0):+.0f} µs, "
          f"p99 {med(r['latency_us']['p99'] for r in wait1) - med(r['latency_us']['p99'] for r in wait0):+.0f} µs")
for name, rs in (("standalone", standalone), ("cluster", cluster)):
    if not rs:
        continue
    r = rs[-1]
    print(f"  per node, {name}, as fast as accepted (last round: {r['events_per_sec']:.0f} events/s in {r['seconds']:.2f} s):")
    busiest = 0.0
    for n in r["redis"]["nodes"]:
        busy = n["cpu_seconds"] / r["seconds"]
        if n["role"] != "replica":
            busiest = max(busiest, n["cpu_seconds"] * 1e6 / max(r["accepted"], 1))
        served = "" if n["role"] == "replica" else \
            f"  partitions {len(n['partitions'])}  stream entries {n['stream_entries']}"
        print(f"    {n['addr']:<21} {n['role']:<7} {n['ops_per_sec']:9.0f} ops/s  cpu {n['cpu_seconds']:.2f} s "
              f"({busy:.0%} of a core){served}  keys {n['keys']}")
    if busiest > 0:
        who = "the busiest master" if name == "cluster" else "the server"
        print(f"    {who}: {busiest:.1f} µs of CPU per event; on a core of its own"
              f"{' each' if name == 'cluster' else ''}, Redis would cap the pipeline at "
              f"~{1e6 / busiest:.0f} events/s (10^6 ÷ that), if the services kept up")
PY
echo "(make bench: $(( $(date +%s) - started )) s in all, the build included)"
