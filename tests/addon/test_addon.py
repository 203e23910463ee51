"""The add-on inside headless Blender, driven by tests/tests/addon.rs:

    blender -b --factory-startup --python-exit-code 1 -P test_addon.py -- ADDON_DIR WORK

with BLENDER_USER_SCRIPTS and BLENDER_USER_CONFIG in WORK, BLENDNET_DATA_DIR a node made by
`blendnet init` whose daemon is not running, and `blendnet` on PATH. Prints "ADDON TESTS PASSED"
at the end; any failure is an exception, so Blender exits non-zero.
"""

import importlib.util
import os
import sys
import time
import zipfile

import addon_utils
import bpy

ADDON_DIR, WORK = sys.argv[sys.argv.index("--") + 1:]
DATA_DIR = os.environ["BLENDNET_DATA_DIR"]


def step(text):
    print(f"addon test: {text}", flush=True)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def raise_error(e):
    raise e


def install_from_zip():
    """Zips the package and installs it with Blender's add-on installer."""
    path = os.path.join(WORK, "blendnet.zip")
    with zipfile.ZipFile(path, "w") as z:
        for root, _, files in os.walk(ADDON_DIR):
            for name in files:
                if name.endswith(".pyc"):
                    continue
                full = os.path.join(root, name)
                z.write(full, os.path.join("blendnet", os.path.relpath(full, ADDON_DIR)))
    bpy.ops.preferences.addon_install(filepath=path)
    installed = [m.__name__ for m in addon_utils.modules(refresh=True)]
    check("blendnet" in installed, f"the installer did not install blendnet: {installed}")


def enable():
    module = addon_utils.enable("blendnet", default_set=True, handle_error=raise_error)
    check(module is not None, "the add-on did not enable")
    check(hasattr(bpy.types, "BLENDNET_OT_render_frame"), "render_frame is not registered")
    check(hasattr(bpy.types.Scene, "blendnet"), "the scene settings are not registered")
    return sys.modules["blendnet.session"].SESSION


def disable():
    addon_utils.disable("blendnet", default_set=True, handle_error=raise_error)
    for name in ("BLENDNET_OT_render_frame", "BLENDNET_PT_render", "BLENDNET_PT_jobs"):
        check(not hasattr(bpy.types, name), f"{name} is still registered")
    check(not hasattr(bpy.types.Scene, "blendnet"), "the scene settings are still registered")


def answers():
    """Whether a daemon answers for DATA_DIR (asked with the add-on's own client)."""
    spec = importlib.util.spec_from_file_location("daemon_probe", os.path.join(ADDON_DIR, "daemon.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe.connect(DATA_DIR) is not None


def make_scene(path):
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = False
    scene.render.resolution_x = 64
    scene.render.resolution_y = 48
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = "//render/frame_"
    scene.frame_current = 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=path)


def operator_error(operator):
    """The error an operator reports (bpy.ops raises it as a RuntimeError), or None."""
    try:
        operator()
    except RuntimeError as e:
        return str(e)
    return None


def main():
    check(not answers(), "a daemon already runs for the test's data dir")
    install_from_zip()

    step("enabling the add-on starts the daemon")
    session = enable()
    check(session.wait(60), "the add-on's worker did not finish")
    check(session.error == "", f"error after enabling: {session.error}")
    check(answers(), "no daemon answers after enabling the add-on")

    step("disable and enable, twice")
    for _ in range(2):
        disable()
        session = enable()
        check(session.wait(60), "the add-on's worker did not finish")
        check(session.error == "", f"error after enabling again: {session.error}")

    step("render a frame on the mesh")
    scene_path = os.path.join(WORK, "scene", "shot.blend")
    make_scene(scene_path)
    check(operator_error(bpy.ops.blendnet.render_frame) is None, "render_frame failed")
    check(session.wait(180), "the submission did not finish")
    check(session.error == "", f"not submitted: {session.error}")
    check(session.selected, "no job after submitting")
    jobs = sys.modules["blendnet.daemon"].Client(DATA_DIR).jobs()
    names = [j["name"] for j in jobs if j["id"] == session.selected]
    check(names == ["shot/Scene"], f"the job is not named after the file and scene: {names}")
    check(not any(n.startswith(".shot.blendnet") for n in os.listdir(os.path.dirname(scene_path))),
          "the submitted copy was left beside the scene")
    frame = os.path.join(WORK, "scene", "render", "frame_0001.png")
    deadline = time.monotonic() + 240
    while not os.path.exists(frame) and time.monotonic() < deadline:
        time.sleep(0.5)
    check(os.path.exists(frame), f"no frame at {frame} (job {session.selected})")
    image = bpy.data.images.load(frame)
    check(tuple(image.size) == (64, 48), f"the frame is {tuple(image.size)}")

    step("a missing texture is reported with its path")
    texture = bpy.data.images.new("missing", 4, 4)
    texture.source = "FILE"
    texture.filepath = "//textures/missing.png"
    material = bpy.data.materials.new("textured")
    material.use_nodes = True
    node = material.node_tree.nodes.new("ShaderNodeTexImage")
    node.image = texture
    bpy.data.objects["Cube"].data.materials.append(material)
    bpy.ops.wm.save_mainfile()
    error = operator_error(bpy.ops.blendnet.render_frame)
    missing = os.path.join(WORK, "scene", "textures", "missing.png")
    check(error is not None and missing in error, f"the missing texture was not named: {error}")
    bpy.data.objects["Cube"].data.materials.clear()

    step("a wrong program path is a clear message")
    prefs = bpy.context.preferences.addons["blendnet"].preferences
    prefs.blendnet_path = os.path.join(WORK, "no-such-dir", "blendnet")
    error = operator_error(bpy.ops.blendnet.render_frame)
    check(error is not None and "was not found at" in error and prefs.blendnet_path in error,
          f"unclear error for a wrong program path: {error}")
    bpy.ops.blendnet.start_daemon()
    check(session.wait(30), "the add-on's worker did not finish")
    check("was not found at" in session.error, f"unclear start error: {session.error}")
    prefs.blendnet_path = ""

    disable()
    print("ADDON TESTS PASSED", flush=True)


main()
