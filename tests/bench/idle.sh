#!/usr/bin/env bash
# Benchmark (not a test): memory and CPU of one idle, initialized daemon.
#
#   tests/bench/idle.sh [SECONDS]      # default 60
#   PEERS=N tests/bench/idle.sh        # N idle members connected to it (default 2)
#
# Builds the release binary (or uses $BLENDNET_BIN), runs `blendnet init` and `blendnet up` on
# loopback (free ports, no mDNS) in a temporary data dir, joins $PEERS more daemons to it by
# invite (so gossip heartbeats and status messages are part of "idle"), lets it settle 5 s, then samples
# VmRSS (/proc/PID/status) every second and utime+stime (/proc/PID/stat) at both ends of the
# window. Prints peak and final RSS and CPU use as % of one core, with the aims beside them
# (under 30 MB, under 1 % of a core) as a reference, never as a pass/fail threshold. Stops the
# daemon with SIGTERM and reports how it exited.
set -euo pipefail

duration="${1:-60}"
peers="${PEERS:-2}"
settle=5
aim_rss_mb=30
aim_cpu_pct=1
[[ "$duration" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [SECONDS]" >&2; exit 2; }
[[ "$peers" =~ ^[0-9]+$ ]] || { echo "PEERS must be a number" >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if [[ -n "${BLENDNET_BIN:-}" ]]; then
    bin="$BLENDNET_BIN"
else
    echo "building: cargo build --release --bin blendnet" >&2
    cargo build --release --bin blendnet
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    bin="$target_dir/release/blendnet"
fi
[[ -x "$bin" ]] || { echo "no blendnet binary at $bin" >&2; exit 1; }

work="$(mktemp -d -t blendnet-bench-idle-XXXXXX)"
data="$work/data"
mkdir "$data"
pid=""
peer_pids=()

cleanup() {
    if [[ -n "$pid" ]] && running; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    for p in "${peer_pids[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

"$bin" init --data-dir "$data" >/dev/null

"$bin" up --data-dir "$data" --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 --no-mdns \
    >"$work/up.stdout" 2>"$work/up.stderr" &
pid=$!

show_log() {
    echo "--- last lines of the daemon's stderr ---" >&2
    tail -n 40 "$work/up.stderr" >&2 || true
}

# Whether the daemon runs: a process that exited stays a zombie (and passes `kill -0`) until
# `wait` reaps it, so look at its state in /proc.
running() {
    local stat
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

# Wait (bounded) for the API, the sign that start-up is over.
for _ in $(seq 300); do
    [[ -s "$data/api.addr" ]] && break
    running || { echo "daemon exited during start-up" >&2; show_log; exit 1; }
    sleep 0.1
done
[[ -s "$data/api.addr" ]] || { echo "daemon wrote no api.addr within 30 s" >&2; show_log; exit 1; }

# Join the idle members, each with its own invite, and wait (bounded) until all are connected.
for i in $(seq "$peers"); do
    peer_data="$work/peer$i"
    mkdir "$peer_data"
    "$bin" join --data-dir "$peer_data" "$("$bin" invite --data-dir "$data")" >/dev/null
    "$bin" up --data-dir "$peer_data" --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 --no-mdns \
        >"$peer_data/up.stdout" 2>"$peer_data/up.stderr" &
    peer_pids+=("$!")
done
connected=0
for _ in $(seq 300); do
    connected="$("$bin" status --data-dir "$data" --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["peer_count"])')"
    ((connected == peers)) && break
    sleep 0.1
done
((connected == peers)) || { echo "only $connected of $peers members connected within 30 s" >&2; show_log; exit 1; }

echo "daemon pid $pid with $peers idle members, API on $(cat "$data/api.addr"); settling ${settle} s, then sampling ${duration} s" >&2
sleep "$settle"

clk_tck="$(getconf CLK_TCK)"

# utime+stime of $pid in clock ticks. Fields 14 and 15 of /proc/PID/stat, counted after the
# command name, which is in parentheses and may hold spaces: strip through the last ") ".
cpu_ticks() {
    local stat
    stat="$(cat "/proc/$pid/stat")"
    stat="${stat##*) }"
    awk '{ print $12 + $13 }' <<<"$stat"
}

rss_kb() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"
}

now() { date +%s.%N; }

alive() {
    running || { echo "daemon exited during the measurement" >&2; show_log; exit 1; }
}

alive
t0="$(now)"
ticks0="$(cpu_ticks)"
peak_kb="$(rss_kb)"
last_kb="$peak_kb"
for _ in $(seq "$duration"); do
    sleep 1
    alive
    last_kb="$(rss_kb)"
    if ((last_kb > peak_kb)); then peak_kb="$last_kb"; fi
done
ticks1="$(cpu_ticks)"
t1="$(now)"

awk -v peak="$peak_kb" -v last="$last_kb" -v dt0="$ticks0" -v dt1="$ticks1" -v hz="$clk_tck" \
    -v t0="$t0" -v t1="$t1" -v aim_mb="$aim_rss_mb" -v aim_cpu="$aim_cpu_pct" \
    -v settle="$settle" -v bin="$bin" -v peers="$peers" '
function verdict(v, aim) { return v < aim ? "within aim" : "OVER aim" }
BEGIN {
    wall = t1 - t0
    cpu_s = (dt1 - dt0) / hz
    pct = 100 * cpu_s / wall
    printf "idle daemon with %d connected members over %.1f s (after %s s settling), %s\n", peers, wall, settle, bin
    printf "  peak RSS   %7.1f MB   (aim < %d MB, %s)\n", peak / 1024, aim_mb, verdict(peak / 1024, aim_mb)
    printf "  final RSS  %7.1f MB   (aim < %d MB, %s)\n", last / 1024, aim_mb, verdict(last / 1024, aim_mb)
    printf "  CPU        %7.2f %%    of one core, %.2f s CPU (aim < %d %%, %s)\n", pct, cpu_s, aim_cpu, verdict(pct, aim_cpu)
}'

# Stop it as a user would and report how it went.
kill -TERM "$pid"
for _ in $(seq 100); do
    running || break
    sleep 0.1
done
if running; then
    echo "daemon still running 10 s after SIGTERM; killing it" >&2
    show_log
    exit 1
fi
set +e
wait "$pid"
rc=$?
set -e
pid=""
if ((rc != 0)); then
    echo "daemon exited with status $rc after SIGTERM (expected 0)" >&2
    show_log
    exit 1
fi
echo "daemon stopped cleanly"
