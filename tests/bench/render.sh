#!/usr/bin/env bash
# Benchmark (not a test): how much of two cores the mesh turns into rendering, against Blender
# rendering directly with the same two cores, measured in the same run.
#
#   tests/bench/render.sh [SAMPLES] [FRAMES]     # defaults: 512 samples for the still, 8 frames
#
# Two nodes on loopback, each rendering with one thread (`--render-threads 1`), against
# `blender -b -t 2`:
# 1. a still of SAMPLES samples, split into slices across both nodes (`blendnet render --split
#    samples --wait`, merge and finish included) vs `blender -b -t 2 -f 1`;
# 2. FRAMES animation frames split by frames vs `blender -b -t 2 -f 1..FRAMES`.
# Prints each time and the efficiency (direct time / mesh time; aims: 0.9 for the still, 0.95
# for the animation). The mesh time runs from `blendnet render` to its last frame delivered,
# so it includes collecting the scene, Blender's start on each node and the merge. Uses the
# release binary (or $BLENDNET_BIN) and Blender on PATH (or $BLENDNET_BLENDER). Everything
# runs in a temporary directory, removed at the end (BENCH_KEEP=1 keeps it).
set -euo pipefail

samples="${1:-512}"
frames="${2:-8}"
[[ "$samples" =~ ^[1-9][0-9]*$ && "$frames" =~ ^[1-9][0-9]*$ ]] || {
    echo "usage: $0 [SAMPLES] [FRAMES]" >&2
    exit 2
}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
if [[ -n "${BLENDNET_BIN:-}" ]]; then
    bin="$BLENDNET_BIN"
else
    cargo build --release --bin blendnet >&2
    bin="$root/target/release/blendnet"
fi
blender="${BLENDNET_BLENDER:-blender}"
work="$(mktemp -d -t blendnet-bench-render-XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ -n "${BENCH_KEEP:-}" ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

now() { date +%s.%N; }

start_node() { # name
    local dir="$work/$1"
    RUST_LOG="${RUST_LOG:-warn}" "$bin" up --data-dir "$dir" --listen /ip4/127.0.0.1/tcp/0 \
        --api 127.0.0.1:0 --no-mdns --blender "$blender" --render-threads 1 >"$dir.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 300); do
        "$bin" status --data-dir "$dir" --json >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "node $1 did not start; its log:" >&2
    tail -20 "$dir.log" >&2
    exit 1
}

renderers() { # how many online peers A sees that render, itself included
    "$bin" peers --data-dir "$work/a" --json | python3 -c '
import json, sys
print(sum(1 for p in json.load(sys.stdin)
          if p["online"] and (p.get("capabilities") or {}).get("render")
          and (p.get("capabilities") or {}).get("blender")))'
}

echo "starting two nodes, one render thread each" >&2
mkdir -p "$work/a"
"$bin" init --data-dir "$work/a" >/dev/null 2>&1
start_node a
code="$("$bin" invite --data-dir "$work/a")"
mkdir -p "$work/b"
"$bin" join --data-dir "$work/b" "$code" >/dev/null
start_node b
for _ in $(seq 600); do
    [[ "$(renderers)" == 2 ]] && break
    sleep 0.1
done
[[ "$(renderers)" == 2 ]] || { echo "the nodes did not come up ready to render" >&2; exit 1; }

echo "making the scene" >&2
mkdir -p "$work/scene"
"$blender" -b --factory-startup --python-exit-code 1 --python-expr "
import bpy
scene = bpy.context.scene
scene.render.engine = 'CYCLES'
scene.cycles.device = 'CPU'
scene.cycles.samples = $samples
scene.cycles.use_adaptive_sampling = False
scene.cycles.use_denoising = False
scene.render.resolution_x = 320
scene.render.resolution_y = 240
scene.render.resolution_percentage = 100
scene.render.image_settings.file_format = 'PNG'
scene.render.filepath = '//render/bench_'
scene.frame_start = 1
scene.frame_end = $frames
cube = bpy.data.objects['Cube']
cube.location.x = -1.5
cube.keyframe_insert('location', frame=1)
cube.location.x = 1.5
cube.keyframe_insert('location', frame=$frames)
bpy.ops.wm.save_as_mainfile(filepath='$work/scene/bench.blend')
" >"$work/make.log" 2>&1

mesh_render() { # out-dir frames split: prints the seconds from submit to the last frame
    local start end
    start="$(now)"
    "$bin" render --data-dir "$work/a" "$work/scene/bench.blend" --frames "$2" --split "$3" \
        --out "$1" --wait --json >"$1.json"
    end="$(now)"
    python3 -c "print(f'{$end - $start:.2f}')"
}

direct_render() { # frames (Blender's -f syntax): prints the seconds
    local start end
    start="$(now)"
    "$blender" -b "$work/scene/bench.blend" -t 2 -o "$work/direct/bench_####" -f "$1" \
        >"$work/direct.log" 2>&1
    end="$(now)"
    python3 -c "print(f'{$end - $start:.2f}')"
}

mkdir -p "$work/direct"
echo "still: $samples samples" >&2
still_direct="$(direct_render 1)"
still_mesh="$(mesh_render "$work/still" 1 samples)"
echo "animation: $frames frames" >&2
anim_direct="$(direct_render "1..$frames")"
anim_mesh="$(mesh_render "$work/anim" "1-$frames" frames)"

python3 - "$still_direct" "$still_mesh" "$anim_direct" "$anim_mesh" "$samples" "$frames" <<'PY'
import sys
sd, sm, ad, am = map(float, sys.argv[1:5])
samples, frames = sys.argv[5], sys.argv[6]
print(f"still, {samples} samples:   blender -b -t 2 {sd:7.2f} s | mesh of 2 x 1 thread {sm:7.2f} s"
      f" | efficiency {sd / sm:.2f} (aim 0.9)")
print(f"animation, {frames} frames: blender -b -t 2 {ad:7.2f} s | mesh of 2 x 1 thread {am:7.2f} s"
      f" | efficiency {ad / am:.2f} (aim 0.95)")
PY
