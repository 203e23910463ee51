#!/usr/bin/env bash
# Takes docs/addon-panels.png: the BlendNet add-on's panels in a real Blender window, under a
# virtual X screen, on a two-node mesh of this machine rendering a small scene. Run on demand
# (not in CI), after a release build:
#
#   tests/addon/screenshot.sh [OUT.png]
#
# Needs xvfb-run (apt-get install xvfb) and Blender on PATH. Environment:
#   BLENDNET_BIN           the blendnet program (default: target/release/blendnet)
#   BLENDER                the Blender program (default: blender)
#   BLENDNET_SHOT_SAMPLES  samples of the scene rendered on the mesh (default: 2000)
#   BLENDNET_SHOT_WAIT     seconds at most before the shot is taken anyway (default: 180)
#   BLENDNET_SHOT_THREADS  render threads of each node (default: 1)
#   BLENDNET_SHOT_KEEP     1: keep the work folder (the nodes' logs) for a look afterwards
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${BLENDNET_BIN:-$root/target/release/blendnet}
blender=${BLENDER:-blender}
out=${1:-$root/docs/addon-panels.png}
threads=${BLENDNET_SHOT_THREADS:-1}
width=1600
height=1000

die() {
    echo "screenshot.sh: $*" >&2
    exit 1
}

[[ -x $bin ]] || die "no blendnet program at $bin (build it, or set BLENDNET_BIN)"
command -v "$blender" >/dev/null || die "no Blender at '$blender' (set BLENDER)"
command -v xvfb-run >/dev/null || die "xvfb-run is missing (apt-get install xvfb)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
blender=$(command -v "$blender")
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")

work=$(mktemp -d -t blendnet-shot-XXXXXX)
pids=()

cleanup() {
    local pid
    # The daemons: the add-on's daemon outlives Blender by design, so they are stopped here.
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${BLENDNET_SHOT_KEEP:-0} == 1 ]]; then
        echo "screenshot.sh: the work folder is $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# A node of the mesh in folder $1, listening on loopback only, with no LAN discovery.
configure() {
    printf 'listen = ["/ip4/127.0.0.1/tcp/0"]\nmdns = false\n' >"$1/blendnet.toml"
}

# Starts the daemon of folder $1 in the background.
start() {
    BLENDNET_BLENDER=$blender "$bin" up --data-dir "$1" --render-threads "$threads" \
        >"$1.log" 2>&1 &
    pids+=("$!")
}

# Waits until the command "$2" "$3"... succeeds, for at most $1 seconds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out waiting for: $*"
        sleep 0.5
    done
}

# Whether the daemon of folder $1 answers.
answers() {
    "$bin" status --data-dir "$1" >/dev/null 2>&1
}

# Whether both nodes see both members online.
meshed() {
    local folder seen
    for folder in "$a" "$b"; do
        seen=$("$bin" peers --data-dir "$folder" 2>/dev/null | grep -c ' online ' || true)
        ((seen >= 2)) || return 1
    done
}

a=$work/node-a
b=$work/node-b

echo "screenshot.sh: a two-node mesh in $work"
"$bin" init --data-dir "$a" >/dev/null
configure "$a"
start "$a"
wait_for 30 answers "$a"
code=$("$bin" invite --data-dir "$a")
"$bin" join --data-dir "$b" "$code" >/dev/null
configure "$b"
start "$b"
wait_for 60 meshed

echo "screenshot.sh: Blender, with the add-on on node A"
mkdir -p "$work/scripts/addons" "$work/config" "$work/tmp"
cp -r "$root/addon/blendnet" "$work/scripts/addons/blendnet"
rm -rf "$work/scripts/addons/blendnet/__pycache__"
BLENDER_USER_SCRIPTS=$work/scripts \
    BLENDER_USER_CONFIG=$work/config \
    BLENDNET_DATA_DIR=$a \
    BLENDNET_BIN=$bin \
    TMPDIR=$work/tmp \
    PATH=$(dirname "$bin"):$PATH \
    timeout 600 xvfb-run -a -s "-screen 0 ${width}x${height}x24" \
    "$blender" --factory-startup --enable-event-simulate -p 0 0 "$width" "$height" \
    --python "$root/tests/addon/screenshot.py" -- "$work" "$work/shot.png"

[[ -s $work/shot.png ]] || die "Blender saved no screenshot"
cp "$work/shot.png" "$out"
echo "screenshot.sh: saved $out"
