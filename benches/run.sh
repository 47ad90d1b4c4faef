#!/usr/bin/env bash
# Runs the performance targets end to end and writes benches/results.md.
#
#   benches/run.sh            # every target (about 17 minutes on 2 cores)
#   benches/run.sh quick      # targets 1-3 only, smaller counts
#   benches/run.sh live       # targets 1-3 only, full counts (what intake and firing changes move)
#   benches/run.sh store      # targets 4-5 only (store size, restart, churn)
#   benches/run.sh jetstream  # targets 6-8 only (JetStream intake and delivery)
#   benches/run.sh cluster    # targets 9-10 only (replicated mode on a 3-node cluster, R3)
#   benches/run.sh recurring  # target 11 only (100 000 series of Sched-Every: 1s for a minute)
#
# It starts its own nats-server (from NATSCHED_NATS_SERVER, PATH or /usr/sbin) on a free
# loopback port and natsched (release build) on a temporary store, and drives them with
# `natsched bench`, the load generator, which talks to them only through NATS. Client, server
# and daemon share the machine's cores, as on a sidecar host. Needs python3 for the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}

cargo build --release --quiet
BIN=$PWD/target/release/natsched
NATS=${NATSCHED_NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=nats://127.0.0.1:$PORT
OUT=benches/results.md
NATSCHED_PID=
NATS_PID=

NATSCHED_PIDS=()
NODE_PIDS=()
cleanup() {
  [ -n "$NATSCHED_PID" ] && kill -9 "$NATSCHED_PID" 2>/dev/null || true
  for pid in "${NATSCHED_PIDS[@]}" "${NODE_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [ -n "$NATS_PID" ] && kill "$NATS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$NATS" -a 127.0.0.1 -p "$PORT" -js -sd "$WORK/js" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done

now_ms() { date +%s%3N; }
# CPU seconds a process has used so far (user + system), from /proc.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat"; }
json() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))" "$1" "$2"; }

start_natsched() { # start_natsched STORE_DIR [MORE_TOML]
  printf '[nats]\nurl = "%s"\n[store]\npath = "%s"\n%b' "$URL" "$1" "${2:-}" >"$WORK/natsched.toml"
  RUST_LOG=warn "$BIN" run --config "$WORK/natsched.toml" 2>>"$WORK/natsched.log" &
  NATSCHED_PID=$!
}
stop_natsched() {
  kill -TERM "$NATSCHED_PID"
  wait "$NATSCHED_PID" || true
  NATSCHED_PID=
}
bench() { "$BIN" bench --server "$URL" "$@" 2>/dev/null | tail -n 1; }
# Schedules one message 100 ms ahead until one is delivered (a request sent before natsched
# subscribes is lost); prints that run's report.
probe() {
  local r
  for _ in $(seq 100); do
    r=$(bench --count 1 --rate 1 --lead 100ms --grace 2s || true)
    [ -n "$r" ] && [ "$(json "$r" 'fired')" = 1 ] && { echo "$r"; return; }
  done
  echo "natsched never answered" >&2; exit 1
}
ready() { probe >/dev/null; }

rows=()
row() { rows+=("| $1 | $2 | $3 | $4 |"); echo "$1: $2 (goal $3) $4" >&2; }
verdict() { python3 -c "import sys; print('met' if $1 else 'not met')"; }

if [ "$MODE" != store ] && [ "$MODE" != jetstream ] && [ "$MODE" != cluster ] && [ "$MODE" != recurring ]; then
# Targets 1 and 2: intake and lateness at 10 000 fires/s, then lateness at 100 000 fires/s.
COUNT_10K=$([ "$MODE" = quick ] && echo 200000 || echo 600000)
COUNT_100K=$([ "$MODE" = quick ] && echo 500000 || echo 2000000)
start_natsched "$WORK/store1"; ready
# Firing starts only after intake has finished (leads sized for 50 000/s), so the two phases
# are measured apart.
r=$(bench --count "$COUNT_10K" --rate 10000 --lead "$(( COUNT_10K / 50000 + 3 ))s" --pid "$NATSCHED_PID" --label 10k)
echo "$r" >"$WORK/10k.json"
intake=$(json "$r" 'round(intake_per_sec)')
row "1. durable intake, acked after fsync (schedules/s)" "$intake" "≥ 150 000" "$(verdict "$intake >= 150000")"
l=$(json "$r" 'lateness_ms')
p50=$(json "$r" 'lateness_ms["p50"]'); p99=$(json "$r" 'lateness_ms["p99"]'); p999=$(json "$r" 'lateness_ms["p999"]')
row "2a. lateness at 10 000 fires/s, p50 / p99 / p99.9 (ms)" "$p50 / $p99 / $p999 (max $(json "$r" 'lateness_ms["max"]'); fired $(json "$r" 'fired'), missing $(json "$r" 'missing'), duplicates $(json "$r" 'duplicates'))" "≤ 1 / 5 / 10" "$(verdict "$p50 <= 1 and $p99 <= 5 and $p999 <= 10")"
r=$(bench --count "$COUNT_100K" --rate 100000 --lead "$(( COUNT_100K / 50000 + 3 ))s" --pid "$NATSCHED_PID" --label 100k)
echo "$r" >"$WORK/100k.json"
p99=$(json "$r" 'lateness_ms["p99"]')
row "2b. lateness at 100 000 fires/s, p50 / p99 (ms)" "$(json "$r" 'lateness_ms["p50"]') / $p99 (intake $(json "$r" 'round(intake_per_sec)')/s, due before ack $(json "$r" 'due_before_ack'); missing $(json "$r" 'missing'), duplicates $(json "$r" 'duplicates'))" "p99 ≤ 25" "$(verdict "$p99 <= 25")"
stop_natsched

# Target 3: a backlog of overdue schedules when natsched starts; the median of three runs in
# full mode (it is the target nearest the machine's limit, and the one that varies most).
BACKLOG=$([ "$MODE" = quick ] && echo 300000 || echo 1000000)
BACKLOG_RUNS=$([ "$MODE" = quick ] && echo 1 || echo 3)
rates=(); firsts=(); missing=0
for attempt in $(seq "$BACKLOG_RUNS"); do
  rm -rf "$WORK/store3"
  start_natsched "$WORK/store3"; ready
  lead=$(( BACKLOG / 40000 + 5 ))s
  r=$(bench --stage schedule --count "$BACKLOG" --rate 1000000 --lead "$lead")
  run=$(json "$r" 'run_id'); first=$(json "$r" 'first_due')
  stop_natsched
  while [ "$(now_ms)" -lt $(( first + 1500 )) ]; do sleep 0.2; done
  bench --stage receive --run-id "$run" --first-due "$first" --count "$BACKLOG" --rate 1000000 --grace 120s >"$WORK/backlog.json" &
  RECV=$!
  sleep 1
  t0=$(now_ms)
  start_natsched "$WORK/store3"
  wait $RECV
  r=$(cat "$WORK/backlog.json")
  rates+=("$(json "$r" 'round(fire_per_sec or 0)')")
  firsts+=("$(( $(json "$r" 'first_receipt_ms') - t0 ))")
  missing=$(( missing + $(json "$r" 'missing') ))
  stop_natsched
done
rate=$(printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(( (BACKLOG_RUNS + 1) / 2 ))p")
row "3. backlog drain, $BACKLOG overdue at start (fires/s)" "$rate (median of ${rates[*]}; first fire ${firsts[*]} ms after start; missing $missing)" "≥ 300 000" "$(verdict "$rate >= 300000 and $missing == 0")"
fi

if [ "$MODE" = full ] || [ "$MODE" = store ]; then
  # Target 4: 10 million pending over the next 30 days.
  PENDING=10000000
  start_natsched "$WORK/store4"; ready
  r=$(bench --stage schedule --count "$PENDING" --rate 4 --lead 1h --pid "$NATSCHED_PID")
  rss=$(json "$r" 'round(peak_rss_mib)')
  stop_natsched
  size=$(( $(du -sb "$WORK/store4" | cut -f1) / 1048576 ))
  t0=$(now_ms); start_natsched "$WORK/store4"
  r=$(probe)
  first_fire=$(( $(json "$r" 'first_receipt_ms') - t0 ))
  rss_after=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$NATSCHED_PID/status")
  row "4. 10 M pending over 30 days: peak RSS / store / restart to first fire" "$rss MiB (after restart $rss_after MiB) / $size MiB / $first_fire ms (a probe scheduled 100 ms ahead, retried until natsched answers)" "≤ 512 MiB / ≤ 2048 MiB / ≤ 5 s" "$(verdict "$rss <= 512 and $size <= 2048 and $first_fire <= 5000")"
  stop_natsched

  # Target 5: store size over 10 cycles of 1 M schedules in and fired out.
  start_natsched "$WORK/store5"; ready
  sizes=()
  for cycle in $(seq 10); do
    bench --count 1000000 --rate 200000 --grace 20s >/dev/null
    sleep 1.5 # fired schedules leave the store every 100 ms; sled flushes every 500 ms
    sizes+=($(( $(du -sb "$WORK/store5" | cut -f1) / 1048576 )))
  done
  # No growth across cycles: the largest of the last five at most twice the largest of the
  # first five, plus 64 MiB. (Maxima, because sled truncates its file once a cycle's
  # schedules are gone, and a sample may fall before or after that.)
  first=$(printf '%s\n' "${sizes[@]:0:5}" | sort -n | tail -1)
  last=$(printf '%s\n' "${sizes[@]:5:5}" | sort -n | tail -1)
  row "5. store size after each of 10 cycles of 1 M in and out (MiB)" "${sizes[*]}" "no growth across cycles" "$(verdict "$last <= 2 * $first + 64")"
  stop_natsched
fi

if [ "$MODE" = full ] || [ "$MODE" = jetstream ]; then
  # Target 6: JetStream intake, end to end: the load generator publishes into the intake
  # stream (the server's PubAck frees its slot) while natsched consumes; a request counts
  # once natsched has it stored (its pending grew by it).
  COUNT_JS=600000
  start_natsched "$WORK/store6" '[intake]\nmode = "jetstream"\n'; ready
  r=$(bench --count "$COUNT_JS" --rate 10000 --lead "$(( COUNT_JS / 30000 + 3 ))s" --jetstream-intake --grace 10s --pid "$NATSCHED_PID" --label js-intake)
  echo "$r" >"$WORK/js-intake.json"
  rate=$(json "$r" 'round(intake_per_sec)')
  row "6. JetStream intake, stored in natsched (schedules/s)" "$rate (fired $(json "$r" 'fired'), missing $(json "$r" 'missing'), duplicates $(json "$r" 'duplicates'))" "≥ 100 000" "$(verdict "$rate >= 100000 and $(json "$r" 'missing') == 0")"
  stop_natsched

  # Target 7: a backlog of 1 M overdue schedules delivered through JetStream into a file
  # stream (each PubAck awaited, Nats-Msg-Id set); the stream must hold each once.
  BACKLOG_JS=1000000
  rm -rf "$WORK/store7"
  start_natsched "$WORK/store7"; ready
  r=$(bench --stage schedule --count "$BACKLOG_JS" --rate 1000000 --lead "$(( BACKLOG_JS / 40000 + 5 ))s" --jetstream-delivery --stream BENCH)
  run=$(json "$r" 'run_id'); first=$(json "$r" 'first_due')
  stop_natsched
  while [ "$(now_ms)" -lt $(( first + 1500 )) ]; do sleep 0.2; done
  bench --stage receive --run-id "$run" --first-due "$first" --count "$BACKLOG_JS" --rate 1000000 --grace 120s --stream BENCH >"$WORK/js-backlog.json" &
  RECV=$!
  sleep 1
  start_natsched "$WORK/store7"
  wait $RECV
  r=$(cat "$WORK/js-backlog.json")
  rate=$(json "$r" 'round(fire_per_sec or 0)')
  gained=$(json "$r" 'stream_gained')
  row "7. JetStream delivery of $BACKLOG_JS overdue into a file stream (fires/s)" "$rate (stream gained $gained; missing $(json "$r" 'missing'))" "≥ 100 000, each once" "$(verdict "$rate >= 100000 and $gained == $BACKLOG_JS")"
  stop_natsched

  # Target 8: lateness at 10 000 fires/s delivered into a stream.
  start_natsched "$WORK/store8"; ready
  r=$(bench --count 300000 --rate 10000 --lead 9s --jetstream-delivery --stream BENCH --pid "$NATSCHED_PID" --label js-10k)
  p99=$(json "$r" 'lateness_ms["p99"]')
  row "8. lateness at 10 000 fires/s into a stream, p50 / p99 / p99.9 (ms)" "$(json "$r" 'lateness_ms["p50"]') / $p99 / $(json "$r" 'lateness_ms["p999"]') (stream gained $(json "$r" 'stream_gained'), missing $(json "$r" 'missing'))" "p99 ≤ 10" "$(verdict "$p99 <= 10 and $(json "$r" 'stream_gained') == 300000")"
  stop_natsched
fi

if [ "$MODE" = cluster ]; then
  # Targets 9-10: replicated mode. Three routed nats-server nodes with JetStream (the one
  # started above is not used), three natsched with `[cluster] mode = "replicated"` (log and
  # lease R3), and the load generator, all on this machine.
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  CPORTS=(); RPORTS=()
  for i in 0 1 2; do CPORTS+=("$(free_port)"); RPORTS+=("$(free_port)"); done
  ROUTES="nats://127.0.0.1:${RPORTS[0]},nats://127.0.0.1:${RPORTS[1]},nats://127.0.0.1:${RPORTS[2]}"
  for i in 0 1 2; do
    "$NATS" -a 127.0.0.1 -p "${CPORTS[$i]}" -n "n$i" -js -sd "$WORK/node$i" --cluster_name bench \
      --cluster "nats://127.0.0.1:${RPORTS[$i]}" --routes "$ROUTES" >"$WORK/node$i.log" 2>&1 &
    NODE_PIDS+=($!)
  done
  for i in 0 1 2; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/${CPORTS[$i]}") 2>/dev/null && break; sleep 0.05; done
  done
  URLS="nats://127.0.0.1:${CPORTS[0]},nats://127.0.0.1:${CPORTS[1]},nats://127.0.0.1:${CPORTS[2]}"
  for i in 0 1 2; do
    printf '[nats]\nurl = "%s"\n[store]\npath = "%s"\n[cluster]\nmode = "replicated"\n' \
      "$URLS" "$WORK/cstore$i" >"$WORK/natsched$i.toml"
    RUST_LOG=warn "$BIN" run --config "$WORK/natsched$i.toml" 2>>"$WORK/natsched$i.log" &
    NATSCHED_PIDS+=($!)
  done
  URL="nats://127.0.0.1:${CPORTS[0]}"
  ready
  # Target 9: intake acknowledged after the R3 log's PubAck; target 10: lateness at 10 000
  # fires/s once intake has finished.
  CLUSTER_COUNT=${CLUSTER_COUNT:-300000}
  r=$(bench --count "$CLUSTER_COUNT" --rate 10000 --lead 40s --label cluster-10k)
  for pid in "${NATSCHED_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${NATSCHED_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  NATSCHED_PIDS=()
  # The same workload on nats-server's own message schedules (2.12 or later), in an R3
  # stream on the same cluster, natsched stopped.
  n=""
  if "$NATS" --version | awk '{split(substr($2,2),v,"."); exit !(v[1]>2 || (v[1]==2 && v[2]>=12))}'; then
    n=$(bench --native NATIVE --native-replicas 3 --count "$CLUSTER_COUNT" --rate 10000 --lead 40s --label native-10k)
  fi
  intake=$(json "$r" 'round(intake_per_sec)')
  if [ -n "$n" ]; then
    native=$(json "$n" 'round(intake_per_sec)')
    row "9. replicated intake, acked after the R3 log's PubAck (schedules/s)" "$intake; native R3 schedules $native (refused $(json "$r" 'refused'), unanswered $(json "$r" 'unanswered'))" "≥ 1.5 × native" "$(verdict "$intake >= 1.5 * $native")"
  else
    row "9. replicated intake, acked after the R3 log's PubAck (schedules/s)" "$intake (refused $(json "$r" 'refused'), unanswered $(json "$r" 'unanswered'))" "≥ 1.5 × native" "nats-server < 2.12: no native schedules to compare"
  fi
  p99=$(json "$r" 'lateness_ms["p99"]')
  row "10. replicated, lateness at 10 000 fires/s, p50 / p99 / p99.9 (ms)" "$(json "$r" 'lateness_ms["p50"]') / $p99 / $(json "$r" 'lateness_ms["p999"]') (fired $(json "$r" 'fired'), missing $(json "$r" 'missing'), duplicates $(json "$r" 'duplicates'), due before ack $(json "$r" 'due_before_ack'))" "p99 ≤ 10" "$(verdict "$p99 <= 10 and $(json "$r" 'missing') == 0")"
  if [ -n "$n" ]; then
    row "10n. native R3 schedules, same load, p50 / p99 (ms)" "$(json "$n" 'lateness_ms["p50"]') / $(json "$n" 'lateness_ms["p99"]') (fired $(json "$n" 'fired'), missing $(json "$n" 'missing'))" "(for comparison)" ""
  fi
  for pid in "${NODE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
fi

if [ "$MODE" = full ] || [ "$MODE" = recurring ]; then
  # Target 11: SERIES series of `Sched-Every: 1s`, their starts spread over one second, so
  # SERIES fires a second, received for a minute; the store's size is sampled every 10 s
  # while they fire (a series is one record, rewritten at each occurrence).
  SERIES=${RECURRING_SERIES:-100000}
  start_natsched "$WORK/store11" "[wheel]\nmax_resident = ${RECURRING_RESIDENT:-250000}\n"; ready
  lead=$(( SERIES / 20000 + 5 ))
  FOR=${RECURRING_FOR:-60}
  bench --count "$SERIES" --rate "$SERIES" --every 1s --for "${FOR}s" --lead "${lead}s" --grace 5s --pid "$NATSCHED_PID" --label recurring >"$WORK/recurring.json" &
  BENCH=$!
  sleep $(( lead + 5 ))
  sizes=()
  cpu0=$(cpu_s "$NATSCHED_PID"); ncpu0=$(cpu_s "$NATS_PID"); t0=$(now_ms)
  for _ in $(seq $(( FOR / 10 ))); do
    sizes+=($(( $(du -sb "$WORK/store11" | cut -f1) / 1048576 )))
    sleep 10
  done
  # Cores each server process used while the series fired (the load generator has the rest).
  cores=$(python3 -c "t=($(now_ms)-$t0)/1000; print('natsched %.2f, nats-server %.2f' % (($(cpu_s "$NATSCHED_PID")-$cpu0)/t, ($(cpu_s "$NATS_PID")-$ncpu0)/t))")
  wait $BENCH
  r=$(cat "$WORK/recurring.json")
  p99=$(json "$r" 'lateness_ms["p99"]')
  missing=$(json "$r" 'missing'); dups=$(json "$r" 'duplicates'); early=$(json "$r" 'early')
  row "11. $SERIES series of Sched-Every: 1s for $FOR s: fires/s, p50 / p99 / p99.9 (ms), store MiB every 10 s" "$(json "$r" 'round(fire_per_sec or 0)') fires/s, $(json "$r" 'lateness_ms["p50"]') / $p99 / $(json "$r" 'lateness_ms["p999"]') (fired $(json "$r" 'fired') of $(json "$r" 'expected'), missing $missing, duplicates $dups, early $early; peak RSS $(json "$r" 'round(peak_rss_mib or 0)') MiB; cores used: $cores); store ${sizes[*]}" "≥ $SERIES fires/s, p99 ≤ 25 ms, store flat" "$(verdict "$p99 <= 25 and $missing == 0 and $early == 0 and ${sizes[-1]} <= ${sizes[0]} * 3 // 2 + 8")"
  stop_natsched
fi

{
  echo "Measured $(date -u +%Y-%m-%d) by \`benches/run.sh $MODE\` on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem/ {print $2}') GiB;"
  echo "nats-server $("$NATS" --version | awk '{print $2}'), client, server and natsched on the same machine."
  echo
  echo "| target | measured | goal | |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT"
