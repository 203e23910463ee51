"""The add-on and the file collector on another Blender, run by tests/addon/bpy_versions.sh:

    PYTHON bpy_check.py [ADDON_DIR]

with PYTHON a Python 3.11 that has the `bpy` wheel (Blender as a Python module). It also runs
inside a Blender program (3.4 and later):

    blender -b --factory-startup --python-exit-code 1 -P bpy_check.py [-- ADDON_DIR]

ADDON_DIR defaults to addon/blendnet of this checkout. Everything it writes is in a temporary
folder: BLENDER_USER_SCRIPTS, BLENDER_USER_CONFIG and BLENDER_USER_EXTENSIONS point there (set
before bpy starts when bpy is a module), and so does BLENDNET_DATA_DIR, an empty folder, so the
add-on's session fails to find a daemon with a message and starts nothing.

Prints one line per check ("PASS name" or "FAIL name: why"), "NOTE ..." for what is worth
knowing but no failure, "RESULT register PASS|FAIL" and "RESULT collect PASS|FAIL", and last
"OK <bpy version>" or "FAILED <bpy version>"; the exit status is non-zero on any failure.
"""

import os
import shutil
import stat
import sys
import tempfile
import time
import traceback
import zipfile

sys.dont_write_bytecode = True  # no __pycache__ in the checkout's add-on

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
if "bpy" in sys.modules:  # inside a Blender program: its own arguments come before "--"
    ARGS = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
ADDON_DIR = os.path.abspath(
    ARGS[0] if ARGS else os.path.join(HERE, "..", "..", "addon", "blendnet"))

WORK = tempfile.mkdtemp(prefix="blendnet-bpy-check-")
SCRIPTS = os.path.join(WORK, "scripts")
CONFIG = os.path.join(WORK, "config")
EXTENSIONS = os.path.join(WORK, "extensions")
DATA_DIR = os.path.join(WORK, "node")
FAKE_BIN = os.path.join(WORK, "bin")
FAKE_RAN = os.path.join(WORK, "fake-blendnet-ran")
for folder in (SCRIPTS, CONFIG, EXTENSIONS, DATA_DIR, FAKE_BIN):
    os.makedirs(folder)

# A `blendnet` that must never run: with an empty data dir the add-on gives up before starting
# the daemon. Were it run, it leaves a mark and fails.
FAKE = os.path.join(FAKE_BIN, "blendnet")
with open(FAKE, "w", encoding="utf-8") as f:
    f.write(f"#!/bin/sh\ntouch '{FAKE_RAN}'\necho 'error: the fake blendnet ran' >&2\nexit 3\n")
os.chmod(FAKE, os.stat(FAKE).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

# PATH without any real `blendnet`, so nothing of the developer's is started.
PATH_WITHOUT = os.pathsep.join(
    d for d in os.environ.get("PATH", "").split(os.pathsep)
    if d and not os.access(os.path.join(d, "blendnet"), os.X_OK))
PATH_WITH_FAKE = FAKE_BIN + os.pathsep + PATH_WITHOUT

os.environ.update({
    "BLENDER_USER_SCRIPTS": SCRIPTS,
    "BLENDER_USER_CONFIG": CONFIG,
    "BLENDER_USER_EXTENSIONS": EXTENSIONS,
    "BLENDNET_DATA_DIR": DATA_DIR,
    "PATH": PATH_WITHOUT,
})

import bpy  # noqa: E402  (after the environment: bpy reads it when it starts)
import addon_utils  # noqa: E402  (on sys.path once bpy started)

VERSION = bpy.app.version_string
FAILED = []


def check(name, ok, why=""):
    print(f"PASS {name}" if ok else f"FAIL {name}: {why}", flush=True)
    if not ok:
        FAILED.append(name)
    return ok


def note(text):
    print(f"NOTE {text}", flush=True)


def raise_error(e):
    raise e


def section(name, run):
    """Runs one part; an exception is a failure with its traceback."""
    before = len(FAILED)
    print(f"== {name} (Blender {VERSION})", flush=True)
    try:
        run()
    except Exception as e:
        traceback.print_exc()
        sys.stderr.flush()
        check(f"{name} ran to the end", False, f"{type(e).__name__}: {e}")
    print(f"RESULT {name} {'PASS' if len(FAILED) == before else 'FAIL'}", flush=True)


# (1) Register and unregister.

NAMES = ("BLENDNET_OT_render_frame", "BLENDNET_OT_render_animation", "BLENDNET_PT_render",
         "BLENDNET_PT_peers", "BLENDNET_PT_jobs")
# The add-on's session has no node to talk to: which message, by what is on PATH.
NO_PROGRAM = "not on PATH"
NO_NODE = "holds no BlendNet node yet"


def registered():
    return [n for n in NAMES if hasattr(bpy.types, n)], hasattr(bpy.types.Scene, "blendnet")


def session_error(module, expected, label):
    session = sys.modules[f"{module}.session"].SESSION
    check(f"{label}: the session's worker finished", session.wait(30), "still busy after 30 s")
    error = session.error
    clear = (expected in error and "Traceback" not in error
             and not error.startswith("BlendNet: "))  # how session.py words an exception
    check(f"{label}: clear session message ({expected!r})", clear, repr(error))
    print(f"     message: {error}", flush=True)
    # The tick timer (not fired in background) must not raise either.
    check(f"{label}: the UI timer runs", sys.modules[f"{module}.ui"].tick() == 0.5,
          "tick() did not return 0.5")


def enable(module, label, path, expected):
    os.environ["PATH"] = path
    mod = addon_utils.enable(module, default_set=True, handle_error=raise_error)
    check(f"{label}: enabled", mod is not None, "addon_utils.enable returned None")
    names, prop = registered()
    check(f"{label}: classes registered", len(names) == len(NAMES),
          f"missing {sorted(set(NAMES) - set(names))}")
    check(f"{label}: Scene.blendnet registered", prop, "no bpy.types.Scene.blendnet")
    check(f"{label}: its preferences", bpy.context.preferences.addons[module].preferences
          is not None, f"no preferences under {module!r}")
    session_error(module, expected, label)


def disable(module, label):
    addon_utils.disable(module, default_set=True, handle_error=raise_error)
    names, prop = registered()
    check(f"{label}: classes unregistered", not names, f"still registered: {names}")
    check(f"{label}: Scene.blendnet unregistered", not prop, "bpy.types.Scene.blendnet is left")


def install_legacy():
    """As Blender's add-on installer does: a copy in the user scripts' addons folder."""
    target = os.path.join(SCRIPTS, "addons", "blendnet")
    shutil.copytree(ADDON_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bpy.utils.refresh_script_paths()  # the folder is new: on sys.path now, as the installer does
    found = [m.__name__ for m in addon_utils.modules(refresh=True)]
    check("legacy add-on: found in the user scripts", "blendnet" in found,
          f"addon_utils.paths() = {addon_utils.paths()}")


def install_extension():
    """As an extension (Blender 4.2+), from a zip with blender_manifest.toml."""
    path = os.path.join(WORK, "blendnet-extension.zip")
    with zipfile.ZipFile(path, "w") as z:
        for root, dirs, files in os.walk(ADDON_DIR):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if not name.endswith(".pyc"):
                    full = os.path.join(root, name)
                    z.write(full, os.path.relpath(full, ADDON_DIR))
    result = bpy.ops.extensions.package_install_files(
        filepath=path, repo="user_default", enable_on_install=False)
    check("extension: installed from its zip", result == {"FINISHED"}, str(result))


def register_test():
    check("the data dir is empty", not os.listdir(DATA_DIR), str(os.listdir(DATA_DIR)))
    install_legacy()
    # Twice, each way: no blendnet on PATH, then a blendnet but no node in the data dir.
    for round_ in (1, 2):
        for path, expected in ((PATH_WITHOUT, NO_PROGRAM), (PATH_WITH_FAKE, NO_NODE)):
            case = "no program" if path == PATH_WITHOUT else "no node"
            label = f"legacy add-on, round {round_}, {case}"
            enable("blendnet", label, path, expected)
            disable("blendnet", label)
    if bpy.app.version >= (4, 2, 0):
        install_extension()
        module = "bl_ext.user_default.blendnet"
        for round_ in (1, 2):
            label = f"extension, round {round_}"
            enable(module, label, PATH_WITH_FAKE, NO_NODE)
            disable(module, label)
    else:
        note(f"extensions start at Blender 4.2: not tried on {VERSION}")
    check("nothing was started", not os.path.exists(FAKE_RAN), "the add-on ran blendnet")
    check("the data dir is still empty", not os.listdir(DATA_DIR), str(os.listdir(DATA_DIR)))


# (2) The file collection.

PROJECT = os.path.join(WORK, "project")
SHOT = os.path.join(PROJECT, "shot", "shot.blend")
WOOD = os.path.join(PROJECT, "shot", "textures", "wood.png")
MISSING = os.path.join(PROJECT, "shot", "textures", "missing.png")
PROPS = os.path.join(PROJECT, "assets", "props.blend")
METAL = os.path.join(PROJECT, "assets", "tex", "metal.png")  # used by props.blend only
APPENDED = os.path.join(PROJECT, "assets", "appended.blend")  # only appended from


def write_png(path, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = bpy.data.images.new("png", 8, 8)
    image.pixels = list(color) * 64
    image.filepath_raw = path
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)
    check(f"wrote {os.path.basename(path)}", os.path.isfile(path), path)


def textured_material(name, image):
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):  # always node-based from 5.0, where use_nodes is deprecated
        material.use_nodes = True
    node = material.node_tree.nodes.new("ShaderNodeTexImage")
    node.image = image
    return material


def write_libraries():
    """props.blend: an object whose material uses assets/tex/metal.png (relative to the library);
    appended.blend: a material."""
    metal = bpy.data.images.load(METAL)
    mesh = bpy.data.meshes.new("PropMesh")
    mesh.from_pydata([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [], [(0, 1, 2)])
    mesh.materials.append(textured_material("Metal", metal))
    prop = bpy.data.objects.new("Prop", mesh)
    bpy.data.libraries.write(PROPS, {prop}, path_remap="RELATIVE_ALL", fake_user=True)
    painted = bpy.data.materials.new("Painted")
    bpy.data.libraries.write(APPENDED, {painted}, fake_user=True)
    metal_material = mesh.materials[0]
    bpy.data.objects.remove(prop)
    bpy.data.meshes.remove(mesh)
    bpy.data.materials.remove(metal_material)
    bpy.data.materials.remove(painted)
    bpy.data.images.remove(metal)


def add_unbaked_caches(scene, cube):
    """Caches Blender writes when absent: none is missing."""
    cloth = cube.modifiers.new("Cloth", "CLOTH")
    cloth.point_cache.use_disk_cache = True  # //blendcache_shot/, never baked
    plane = bpy.data.objects.new("Sea", bpy.data.meshes.new("Sea"))
    scene.collection.objects.link(plane)
    plane.modifiers.new("Ocean", "OCEAN")  # //cache_ocean, never baked
    smoke = bpy.data.objects.new("Smoke", bpy.data.meshes.new("Smoke"))
    scene.collection.objects.link(smoke)
    fluid = smoke.modifiers.new("Fluid", "FLUID")
    fluid.fluid_type = "DOMAIN"  # //cache_fluid_xxxx
    # Not evaluated here: the solver would run (and abort at exit), and write a config file.
    fluid.show_viewport = False
    if bpy.app.version >= (4, 1, 0):  # geometry-node bakes
        tree = bpy.data.node_groups.new("Baked", "GeometryNodeTree")
        tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
        tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
        group_in = tree.nodes.new("NodeGroupInput")
        group_out = tree.nodes.new("NodeGroupOutput")
        bake = tree.nodes.new("GeometryNodeBake")
        tree.links.new(group_in.outputs[0], bake.inputs[0])
        tree.links.new(bake.outputs[0], group_out.inputs[0])
        nodes = plane.modifiers.new("Baked", "NODES")
        nodes.node_group = tree
        nodes.bake_directory = "//bakes/"
        if hasattr(nodes, "bake_target"):  # 4.3+: packed by default
            nodes.bake_target = "DISK"


def activate_essentials_brush(cube):
    """From 4.3 the brush in use is linked from Blender's bundled Essentials assets."""
    if bpy.app.version < (4, 3, 0):
        note(f"brush assets start at Blender 4.3: not tried on {VERSION}")
        return None
    bpy.context.view_layer.objects.active = cube
    bpy.ops.object.mode_set(mode="SCULPT")
    bpy.ops.brush.asset_activate(
        asset_library_type="ESSENTIALS",
        relative_asset_identifier="brushes/essentials_brushes-mesh_sculpt.blend/Brush/Clay Strips")
    bpy.ops.object.mode_set(mode="OBJECT")
    linked = [lib.filepath for lib in bpy.data.libraries if "essentials_brushes" in lib.filepath]
    check("an Essentials brush is linked", bool(linked),
          f"libraries: {[lib.filepath for lib in bpy.data.libraries]}")
    return linked[0] if linked else None


def build_scene():
    write_png(WOOD, (0.6, 0.4, 0.2, 1.0))
    write_png(METAL, (0.7, 0.7, 0.8, 1.0))
    write_libraries()
    scene = bpy.context.scene
    os.makedirs(os.path.dirname(SHOT), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=SHOT)
    cube = bpy.data.objects["Cube"]

    wood = bpy.data.images.load(WOOD)
    wood.filepath = "//textures/wood.png"
    cube.data.materials.append(textured_material("Wood", wood))
    missing = bpy.data.images.new("missing", 4, 4)
    missing.source = "FILE"
    missing.filepath = "//textures/missing.png"
    cube.data.materials.append(textured_material("Missing", missing))

    with bpy.data.libraries.load(PROPS, link=True, relative=True) as (_, data_to):
        data_to.objects = ["Prop"]
    check("linked the prop", data_to.objects and data_to.objects[0] is not None,
          str(data_to.objects))
    scene.collection.objects.link(data_to.objects[0])

    # Appended with "reuse data": the material keeps a weak reference to appended.blend.
    bpy.ops.wm.append(directory=APPENDED + "/Material/", filename="Painted", do_reuse_local_id=True)
    painted = bpy.data.materials.get("Painted")
    check("appended a material", painted is not None, "no material Painted")
    reference = getattr(painted, "library_weak_reference", None)
    if reference is None:
        note(f"no library_weak_reference on {VERSION}")
    else:
        print(f"     weak reference: {reference.filepath}", flush=True)
    cube.data.materials.append(painted)

    add_unbaked_caches(scene, cube)
    brush_library = activate_essentials_brush(cube)

    scene.render.engine = "CYCLES"
    scene.cycles.samples = 16
    scene.render.filepath = "//render/frame_"
    scene.frame_start, scene.frame_end = 1, 12
    bpy.ops.wm.save_mainfile()
    return brush_library


def check_collected(label, collect, brush_library):
    """The files and the missing paths."""
    there = os.path.exists(APPENDED)
    label = f"{label}, appended.blend {'there' if there else 'deleted'}"
    files, missing = collect.collect_files()
    print(f"     files: {files}\n     missing: {missing}", flush=True)
    for path in (WOOD, PROPS, METAL):
        check(f"{label}: {os.path.relpath(path, PROJECT)} in files", path in files, "not listed")
    check(f"{label}: the missing texture in missing", MISSING in missing, "not listed")
    check(f"{label}: the scene itself not in files", SHOT not in files, "listed")
    # Also in the session that appended (where the Library it came from stays in
    # bpy.data.libraries, with nothing linked from it, until the file is loaded again).
    check(f"{label}: the file appended from neither uploaded nor missing",
          APPENDED not in files + missing, "listed")
    wrong = [p for p in missing if p != MISSING]
    check(f"{label}: nothing else missing (unbaked caches, brushes)", not wrong, str(wrong))
    bundled = [p for p in files + missing if collect.is_inside(p, collect.bundled_folders())]
    check(f"{label}: none of Blender's bundled files", not bundled, str(bundled))
    if brush_library:
        brush = os.path.normpath(bpy.path.abspath(brush_library))
        check(f"{label}: the Essentials brush library neither uploaded nor missing",
              brush not in files and brush not in missing, brush)


def check_scene_info(collect):
    info = collect.scene_info(bpy.context.scene)
    print(f"     scene: {info}", flush=True)
    scene = bpy.context.scene
    major_minor = ".".join(str(n) for n in bpy.app.version[:2])
    check("scene_info: name, engine, frames", (info["name"], info["engine"], info["frame_start"],
          info["frame_end"], info["frame_step"]) == (scene.name, "CYCLES", 1, 12, 1), str(info))
    check("scene_info: samples and denoise", info["samples"] == 16
          and isinstance(info["denoise"], bool), str(info))
    check("scene_info: output made absolute",
          info["output"] == os.path.join(os.path.dirname(SHOT), "render", "frame_"), info["output"])
    check("scene_info: file format and movie", info["file_format"] == "PNG"
          and info["is_movie"] is False, str(info))
    check("scene_info: Blender version", info["blender"].startswith(major_minor + "."),
          f"{info['blender']} is not {major_minor}.x")
    check("scene_info: camera", info["camera"] is True, str(info))


def collect_test():
    os.environ["PATH"] = PATH_WITH_FAKE
    addon_utils.enable("blendnet", default_set=True, handle_error=raise_error)
    collect = sys.modules["blendnet.collect"]
    brush_library = build_scene()
    check_collected("live session", collect, brush_library)
    check_scene_info(collect)
    backup = APPENDED + ".kept"
    os.rename(APPENDED, backup)
    check_collected("live session", collect, brush_library)

    # What the render operator says about the missing texture.
    try:
        bpy.ops.blendnet.render_frame()
        error = None
    except RuntimeError as e:
        error = str(e)
    check("render_frame names the missing texture", error is not None and MISSING in error,
          repr(error))

    # As the daemon sees it: the file loaded again (`blender -b shot.blend -P collect.py`).
    os.rename(backup, APPENDED)
    bpy.ops.wm.open_mainfile(filepath=SHOT)
    references = [m.library_weak_reference.filepath for m in bpy.data.materials
                  if getattr(m, "library_weak_reference", None) is not None]
    if references:
        print(f"     weak references after loading: {references}", flush=True)
    else:
        note(f"loaded again: no weak reference kept on {VERSION}")
    check_collected("loaded again", collect, brush_library)
    os.remove(APPENDED)
    check_collected("loaded again", collect, brush_library)
    addon_utils.disable("blendnet", default_set=True, handle_error=raise_error)


def main():
    print(f"Blender {VERSION} ({bpy.app.binary_path or 'bpy module'}), add-on {ADDON_DIR}, "
          f"work {WORK}", flush=True)
    started = time.monotonic()
    section("register", register_test)
    section("collect", collect_test)
    print(f"     {time.monotonic() - started:.1f} s", flush=True)
    if os.environ.get("BLENDNET_KEEP_WORK"):
        print(f"     kept {WORK}", flush=True)
    else:
        shutil.rmtree(WORK, ignore_errors=True)
    if FAILED:
        print(f"FAILED {VERSION}: {len(FAILED)} check(s): {', '.join(FAILED)}", flush=True)
        return 1
    print(f"OK {VERSION}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    if "bpy" in sys.modules and bpy.app.binary_path:  # inside Blender: --python-exit-code
        if code:
            raise SystemExit(code)
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(code)
