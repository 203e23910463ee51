"""BlendNet's render worker, run inside Blender:

    blender -b -Y scene.blend -P worker.py

It answers on stdout with lines starting "@blendnet " (JSON), reads tasks as JSON lines on
stdin, and keeps the scene loaded between tasks (render.use_persistent_data). The protocol is
described in node/render/src/protocol.rs; this file is embedded in the blendnet binary.

A task renders in one of two modes:

- "slice": samples [offset, offset + samples) of a Cycles frame, as a multilayer 32-bit EXR
  `frame_NNNNNN.exr` with every enabled pass; adaptive sampling, denoising (its passes kept),
  compositor and sequencer off. Slices are merged and finished elsewhere (finish.py).
- "frames": whole frames, each written as `blender -b scene.blend -f N` writes it: the scene's
  own samples (or, for Cycles, the task's `samples` when above 0: the job's sample count),
  denoising, compositor, sequencer, output format and color management, named
  as Blender names frames (the file name of the scene's output path with the frame number and
  extension), in the task's output directory.

Each task changes the loaded scene; every task starts from the scene's own settings, read when
it was loaded (remember, restore), so nothing one task sets leaks into the next.
"""

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
    """Absolute paths the scene needs that are not there, by the rules the submitting side
    used (the add-on's collect.py, written beside this script): caches Blender writes when
    they are absent, weak references and Blender's bundled files are never missing."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from blendnet_collect import collect_files
    finally:
        sys.path.pop(0)
    return collect_files()[1]


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
        denoise=asks_for_denoising(scene),
    )


def fail(task_id, kind, message, files=()):
    send("error", id=task_id, kind=kind, message=message, files=list(files))


# The scene's own settings, read once at load: tasks change them on the loaded scene.
ORIGINAL = {}

# What a task may change, restored before every task. Image format settings are kept whole
# (see plain_values) because setting file_format adjusts color_mode and color_depth.
CYCLES_SETTINGS = ("samples", "use_adaptive_sampling", "use_denoising", "seed",
                   "use_animated_seed", "sample_offset")
RENDER_SETTINGS = ("filepath", "use_compositing", "use_sequencer", "use_file_extension")


def plain_values(struct):
    """The writable values of an RNA struct that are not pointers or collections."""
    values = {}
    for prop in struct.bl_rna.properties:
        if prop.is_readonly or prop.type in {"POINTER", "COLLECTION"}:
            continue
        value = getattr(struct, prop.identifier)
        if prop.type != "STRING" and getattr(prop, "is_array", False):
            value = tuple(value)
        values[prop.identifier] = value
    return values


def remember(scene):
    cycles, render_settings = scene.cycles, scene.render
    ORIGINAL["cycles"] = {name: getattr(cycles, name) for name in CYCLES_SETTINGS
                          if hasattr(cycles, name)}
    ORIGINAL["render"] = {name: getattr(render_settings, name) for name in RENDER_SETTINGS}
    ORIGINAL["image"] = plain_values(render_settings.image_settings)
    ORIGINAL["store_passes"] = {layer.name: layer.cycles.denoising_store_passes
                                for layer in scene.view_layers}


def restore(scene):
    """Puts back every setting a task changes, as the scene had it when it was loaded."""
    cycles, render_settings = scene.cycles, scene.render
    for name, value in ORIGINAL["cycles"].items():
        setattr(cycles, name, value)
    for name, value in ORIGINAL["render"].items():
        setattr(render_settings, name, value)
    image = render_settings.image_settings
    image.file_format = ORIGINAL["image"]["file_format"]
    for name, value in ORIGINAL["image"].items():
        setattr(image, name, value)
    for layer in scene.view_layers:
        if layer.name in ORIGINAL["store_passes"]:
            layer.cycles.denoising_store_passes = ORIGINAL["store_passes"][layer.name]


def exact_slices(scene, total):
    """Whether slices of a `total`-sample frame render exactly the samples one render of it
    does, so that merged they equal it pixel for pixel. Cycles' sampling pattern must not depend
    on the sample count, and it does in some. Measured (slices of 2 to 4 merged against one
    render): Blender 3.4's Sobol exact at every count tried; its progressive multi-jitter (3.4's
    default) exact up to 256 samples and not at 512; 4.2's default tabulated Sobol exact at
    none (32 to 512)."""
    pattern = getattr(scene.cycles, "sampling_pattern", "")
    if pattern == "SOBOL":
        return True
    if pattern == "PROGRESSIVE_MULTI_JITTER":
        return 0 < total <= 256
    return False


def set_up_slice(scene, samples, offset, total):
    """Cycles renders samples [offset, offset + samples) of the frame with the scene's own
    seed, so merged slices equal one render of all `total` samples where the sampling pattern
    allows (`exact_slices`); compositor and sequencer off, and a multilayer 32-bit EXR with
    every pass. Returns True when the slice is not exact: the pattern does not allow it, or
    this Blender has no sample_offset and a distinct seed stands in."""
    cycles = scene.cycles
    cycles.samples = samples
    cycles.use_adaptive_sampling = False
    # Denoising runs once, after the merge; keep the passes it needs.
    cycles.use_denoising = False
    if ORIGINAL["cycles"]["use_denoising"]:
        for layer in scene.view_layers:
            layer.cycles.denoising_store_passes = True
    render_settings = scene.render
    render_settings.use_compositing = False
    render_settings.use_sequencer = False
    image = render_settings.image_settings
    image.file_format = "OPEN_EXR_MULTILAYER"
    image.color_mode = "RGBA"
    image.color_depth = "32"
    image.exr_codec = "ZIP"
    render_settings.use_file_extension = False
    if hasattr(cycles, "sample_offset"):
        cycles.sample_offset = offset
        return not exact_slices(scene, total)
    cycles.seed = ORIGINAL["cycles"]["seed"] + offset
    cycles.use_animated_seed = False
    return True


def slice_path(scene, output_dir, frame):
    return os.path.join(output_dir, "frame_%06d.exr" % frame)


def frame_path(scene, output_dir, frame):
    """Where `blender -b -f FRAME` would write the frame, moved into output_dir: the file name
    of the scene's output path with the frame number and the format's extension."""
    render_settings = scene.render
    name = os.path.basename(ORIGINAL["render"]["filepath"])
    render_settings.filepath = os.path.join(output_dir, name)
    return render_settings.frame_path(frame=frame)


def asks_for_denoising(scene):
    """Whether Cycles denoises the scene's final render (some rendered view layer wants it)."""
    if scene.render.engine != "CYCLES" or not scene.cycles.use_denoising:
        return False
    return any(layer.use and layer.cycles.use_denoising for layer in scene.view_layers)


def cannot_denoise(scene):
    """Why this Blender cannot denoise the scene as it asks, or None. Cycles falls back to
    OpenImageDenoise when the scene's denoiser cannot run (OptiX without an NVIDIA GPU), and a
    Blender built without it (Debian's 3.4) stops the render with "Build without
    OpenImageDenoiser"."""
    if not asks_for_denoising(scene):
        return None
    import _cycles

    if getattr(_cycles, "with_openimagedenoise", False):
        return None
    # The denoiser reads as "" when this Blender does not offer the scene's choice (Debian's
    # 3.4 offers none), so only an OptiX that is there counts.
    if scene.cycles.denoiser == "OPTIX":
        return None
    return "the scene asks for denoising, but this Blender has no OpenImageDenoise"


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
    if mode not in ("slice", "frames"):
        return fail(task_id, "bad_request", f"unknown mode {mode!r}")
    if mode == "slice" and scene.render.engine != "CYCLES":
        return fail(task_id, "bad_request", f"sample slices need Cycles, not {scene.render.engine}")

    restore(scene)
    render_settings = scene.render
    render_settings.use_persistent_data = True
    inexact = False
    if mode == "slice":
        inexact = set_up_slice(scene, task["samples"], task["sample_offset"],
                               task.get("frame_samples", 0))
        output_path = slice_path
    else:
        if render_settings.is_movie_format:
            return fail(task_id, "bad_request",
                        f"the scene's output is a movie ({render_settings.image_settings.file_format}); "
                        f"whole frames are rendered to image files: choose an image format")
        reason = cannot_denoise(scene)
        if reason:
            return fail(task_id, "denoiser_missing", reason)
        # The job's sample count (`render --samples`) over the scene's, for Cycles; 0 keeps
        # the scene's. Other engines' jobs carry no sample count of their own.
        if task.get("samples", 0) > 0 and scene.render.engine == "CYCLES":
            scene.cycles.samples = task["samples"]
        output_path = frame_path

    send("started", id=task_id)
    outputs = []
    started = time.monotonic()
    for frame in task["frames"]:
        path = output_path(scene, task["output_dir"], frame)
        scene.frame_set(frame)
        # A still render writes its path as given (no frame number): give it the full name.
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
    send("done", id=task_id, outputs=outputs, render_ms=render_ms, inexact=inexact)


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
