"""BlendNet's render worker, run inside Blender:

    blender -b -Y scene.blend -P worker.py

It answers on stdout with lines starting "@blendnet " (JSON), reads tasks as JSON lines on
stdin, and keeps the scene loaded between tasks (render.use_persistent_data). The protocol is
described in node/render/src/protocol.rs; this file is embedded in the blendnet binary.
"""

import glob
import json
import os
import sys
import time
import traceback

import bpy

PREFIX = "@blendnet "
ENGINES = {"CYCLES", "BLENDER_EEVEE", "BLENDER_EEVEE_NEXT", "BLENDER_WORKBENCH"}


def send(tag, /, **fields):
    sys.stdout.write(PREFIX + json.dumps({tag: fields}) + "\n")
    sys.stdout.flush()


def missing_files():
    """Absolute paths the scene refers to that are not there (sequences and UDIM tiles count
    as present when one of their files is)."""
    missing = []
    for path in bpy.utils.blend_paths(absolute=True, packed=False, local=False):
        if not path:
            continue
        if "<UDIM>" in path or "<UVTILE>" in path or "#" in path:
            pattern = path.replace("<UDIM>", "[0-9]" * 4).replace("<UVTILE>", "u*_v*")
            pattern = pattern.replace("#", "[0-9]")
            if glob.glob(pattern):
                continue
        elif os.path.exists(path):
            continue
        missing.append(path)
    return sorted(set(missing))


def ready():
    scene = bpy.context.scene
    send(
        "ready",
        blender=bpy.app.version_string.split(" ")[0],
        engine=scene.render.engine,
        has_camera=scene.camera is not None,
        sample_offset=hasattr(scene.cycles, "sample_offset"),
        frame_start=scene.frame_start,
        frame_end=scene.frame_end,
        missing=missing_files(),
        view_layers=[layer.name for layer in scene.view_layers],
    )


def fail(task_id, kind, message, files=()):
    send("error", id=task_id, kind=kind, message=message, files=list(files))


# The scene's own settings, read once: tasks change them on the loaded scene.
ORIGINAL = {}


def remember(scene):
    cycles = scene.cycles
    ORIGINAL["seed"] = cycles.seed
    ORIGINAL["denoise"] = cycles.use_denoising


def set_up_slice(scene, samples, offset):
    """Cycles renders samples [offset, offset + samples) of the frame with the scene's own
    seed, so merged slices equal one render of all samples. Returns True when this Blender has
    no sample_offset and a distinct seed stands in."""
    cycles = scene.cycles
    cycles.samples = samples
    cycles.use_adaptive_sampling = False
    # Denoising runs once, after the merge; keep the passes it needs.
    cycles.use_denoising = False
    if ORIGINAL["denoise"]:
        for layer in scene.view_layers:
            layer.cycles.denoising_store_passes = True
    if hasattr(cycles, "sample_offset"):
        cycles.sample_offset = offset
        return False
    cycles.seed = ORIGINAL["seed"] + offset
    cycles.use_animated_seed = False
    return True


def render(task):
    task_id = task["id"]
    scene = bpy.context.scene
    if scene.camera is None:
        return fail(task_id, "no_camera", f"scene {scene.name!r} has no camera")
    if scene.render.engine not in ENGINES:
        return fail(task_id, "engine_unsupported", f"render engine {scene.render.engine} is not supported")
    if not task.get("allow_missing"):
        missing = missing_files()
        if missing:
            return fail(task_id, "missing_files", f"{len(missing)} file(s) the scene uses are missing", missing)
    mode = task["mode"]
    if mode == "slice" and scene.render.engine != "CYCLES":
        return fail(task_id, "bad_request", f"sample slices need Cycles, not {scene.render.engine}")

    render_settings = scene.render
    render_settings.use_persistent_data = True
    seeded = False
    if mode == "slice":
        seeded = set_up_slice(scene, task["samples"], task["sample_offset"])
        render_settings.use_compositing = False
        render_settings.use_sequencer = False
    image = render_settings.image_settings
    image.file_format = "OPEN_EXR_MULTILAYER"
    image.color_depth = "32"
    image.exr_codec = "ZIP"
    render_settings.use_file_extension = False

    send("started", id=task_id)
    outputs = []
    started = time.monotonic()
    for frame in task["frames"]:
        path = os.path.join(task["output_dir"], "frame_%06d.exr" % frame)
        scene.frame_set(frame)
        render_settings.filepath = path
        try:
            bpy.ops.render.render(write_still=True)
        except MemoryError:
            return fail(task_id, "out_of_memory", f"out of memory rendering frame {frame}")
        except RuntimeError as e:
            kind = "out_of_memory" if "out of memory" in str(e).lower() else "render_failed"
            return fail(task_id, kind, f"frame {frame}: {e}")
        if not os.path.exists(path):
            return fail(task_id, "render_failed", f"Blender wrote no image for frame {frame}")
        outputs.append(path)
        send("progress", id=task_id, frame=frame)
    render_ms = int((time.monotonic() - started) * 1000)
    send("done", id=task_id, outputs=outputs, render_ms=render_ms, seeded=seeded)


def main():
    if not bpy.data.filepath:
        # Some Blenders go on with the startup scene when a file fails to load: never render that.
        fail(None, "scene_unreadable", "Blender did not load the scene file")
        return
    remember(bpy.context.scene)
    ready()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
        except ValueError as e:
            fail(None, "bad_request", f"not JSON: {e}")
            continue
        if "quit" in request:
            break
        task = request.get("render")
        if not isinstance(task, dict):
            fail(None, "bad_request", f"unknown request {line[:200]}")
            continue
        try:
            render(task)
        except Exception:
            fail(task.get("id"), "render_failed", traceback.format_exc(limit=5))


main()
