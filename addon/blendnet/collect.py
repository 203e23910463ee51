"""BlendNet's scene collector: every file a scene needs, and a copy of the scene that finds them
on another machine. Run inside Blender on the submitting machine:

    blender -b -Y --factory-startup SCENE.blend -P collect.py -- COPY.blend

It answers on stdout with one line "@blendnet {"collected": {...}}" or
"@blendnet {"error": {"kind": KIND, "message": TEXT}}". The reply:

- "blend": the scene file, absolute.
- "files": every existing file the scene needs besides the .blend itself, absolute and sorted:
  images (every frame of a sequence and every tile of a UDIM set that exists), movie clips,
  sounds, fonts, linked libraries (indirect ones too) and what they use, volumes, cache files,
  point caches on disk, fluid caches, geometry-node bakes, and anything else that
  bpy.utils.blend_paths lists. Directories are expanded to their files. Not listed: packed files
  (inside the .blend), Blender's own bundled files, and the files appended data came from
  (weak references: rendering never reads them).
- "missing": the paths the scene needs that are not there, as the scene names them, made
  absolute. A sequence or UDIM set is missing only when none of its files exist. Caches that
  Blender writes when they are absent (unbaked point caches, fluid caches, geometry-node bakes,
  ocean caches) are never missing.
- "absolute": paths the copy still names absolutely, so a render peer looks for them at that
  path: paths inside linked libraries, and on Windows paths on another drive than the scene.
- "scene": name, engine, frame_start, frame_end, frame_step, samples (Cycles; null for other
  engines), denoise, output (render.filepath made absolute), file_format, is_movie, blender,
  camera.

COPY.blend is the scene saved with every path it names made relative to the ORIGINAL scene's
folder (relative_remap off), so the copy works once it sits where the original sits in the
project's layout; the original file is never written. Scripts in the scene do not run (-Y): the
paths a scene names do not depend on its drivers, and render peers load it with -Y too.

Embedded in the blendnet binary (node/render/src/collect.rs). The add-on imports this module
and calls collect_files() and scene_info() itself; save_copy() changes the loaded session's
paths, which suits a background Blender only.
"""

import glob
import json
import os
import re
import sys
import traceback

import bpy

PREFIX = "@blendnet "

# Tokens of a UDIM set's file name, and what stands in for each in a glob.
TILE_TOKENS = {"<UDIM>": "[0-9][0-9][0-9][0-9]", "<UVTILE>": "u*_v*"}


def send(tag, /, **fields):
    sys.stdout.write(PREFIX + json.dumps({tag: fields}) + "\n")
    sys.stdout.flush()


def fail(kind, message):
    send("error", kind=kind, message=message)
    sys.exit(0)


def absolute(path, library=None):
    """A path as the scene stores it, made absolute and normal. "//" is the folder of the
    .blend the data comes from: the library's for linked data (a library's own path is
    relative to the scene's folder, indirect libraries too: Blender rewrites them on load)."""
    return os.path.normpath(bpy.path.abspath(path, library=library))


def files_under(folder):
    """Every file in a folder and its subfolders."""
    found = []
    for parent, _dirs, names in os.walk(folder):
        found.extend(os.path.join(parent, name) for name in names)
    return found


def existing(path):
    """The files at a path: itself, or everything under it when it is a folder."""
    if os.path.isdir(path):
        return files_under(path)
    return [path] if os.path.isfile(path) else []


def sequence_files(path):
    """Every frame of the sequence `path` is a frame of. Blender numbers a sequence with the
    last run of digits before the file's extension, padded to at least the digits given."""
    folder, name = os.path.split(path)
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    match = re.match(r"^(.*?)([0-9]+)([^0-9]*)$", stem)
    if match is None or not os.path.isdir(folder):
        return existing(path)
    head, tail = match.group(1), match.group(3) + (dot + ext)
    frame = re.compile(re.escape(head) + "[0-9]+" + re.escape(tail) + "$")
    return [os.path.join(folder, n) for n in os.listdir(folder)
            if frame.match(n) and os.path.isfile(os.path.join(folder, n))]


def tile_files(path, numbers):
    """The files of a UDIM set's tiles (`image.tiles`) that exist."""
    found = []
    for number in numbers:
        u, v = (number - 1001) % 10 + 1, (number - 1001) // 10 + 1
        tile = path.replace("<UDIM>", str(number)).replace("<UVTILE>", f"u{u}_v{v}")
        if os.path.isfile(tile):
            found.append(tile)
    return found


def glob_tiles(path):
    """The files of a UDIM set whose tiles are not known: every tile number on disk."""
    pattern = glob.escape(path)
    for token, wildcard in TILE_TOKENS.items():
        pattern = pattern.replace(glob.escape(token), wildcard)
    return [f for f in glob.glob(pattern) if os.path.isfile(f)]


def bundled_folders():
    """Blender's own resources (from 4.3, brushes used in a scene are linked from the Essentials
    assets in datafiles/assets): every Blender has its own, so they are neither uploaded nor
    missing."""
    folders = [bpy.utils.resource_path(kind) for kind in ("LOCAL", "SYSTEM")]
    folders.append(bpy.utils.system_resource("DATAFILES") or "")
    return [os.path.normpath(folder) for folder in folders if folder]


def is_inside(path, folders):
    return any(path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
               for folder in folders)


class Needs:
    """What a scene needs: each path as the scene names it, with the files found for it."""

    def __init__(self):
        self.files = set()
        self.found = {}
        self.ignored = set()
        self.bundled = bundled_folders()

    def need(self, path, files):
        """A path the scene needs, found when some of `files` (existing files) are there."""
        if is_inside(path, self.bundled):
            self.found[path] = True
            return
        files = list(files)
        self.files.update(files)
        self.found[path] = self.found.get(path, False) or bool(files)

    def maybe(self, path, files):
        """A path Blender writes when it is absent (a cache): never missing."""
        if not is_inside(path, self.bundled):
            self.files.update(files)
        self.found[path] = True

    def ignore(self, path):
        """A path Blender lists that rendering never reads."""
        self.ignored.add(path)

    def known(self, path):
        return path in self.found or path in self.ignored

    def missing(self):
        return sorted(path for path, found in self.found.items() if not found)


def is_packed(datablock):
    return (getattr(datablock, "packed_file", None) is not None
            or len(getattr(datablock, "packed_files", ())) > 0)


def collect_images(needs):
    for image in bpy.data.images:
        if image.source not in {"FILE", "SEQUENCE", "TILED", "MOVIE"}:
            continue
        if not image.filepath or is_packed(image):
            continue
        path = absolute(image.filepath, image.library)
        if image.source == "SEQUENCE":
            needs.need(path, sequence_files(path))
        elif image.source == "TILED" and any(t in path for t in TILE_TOKENS):
            needs.need(path, tile_files(path, [tile.number for tile in image.tiles]))
        else:
            needs.need(path, existing(path))


def collect_sequences(needs):
    """Movie clips, volumes and cache files that are sequences of numbered files."""
    sequences = [(clip, clip.source == "SEQUENCE") for clip in bpy.data.movieclips]
    sequences += [(volume, volume.is_sequence) for volume in bpy.data.volumes]
    sequences += [(cache, cache.is_sequence) for cache in bpy.data.cache_files]
    for datablock, is_sequence in sequences:
        if not is_sequence or not datablock.filepath or is_packed(datablock):
            continue
        path = absolute(datablock.filepath, datablock.library)
        needs.need(path, sequence_files(path))


def cache_file_prefixes(cache, owner):
    """How Blender names a point cache's files: "<name>_<frame>_<index>.<ext>", where an
    unnamed cache's name is its owner's name in hexadecimal, one "%02X" per C char (a signed
    char on most machines, so a non-ASCII byte may come out as FFFFFFxx)."""
    if cache.name:
        return [cache.name]
    raw = owner.name.encode("utf-8")
    unsigned = "".join(f"{b:02X}" for b in raw)
    signed = "".join(f"{b:02X}" if b < 128 else f"{b | 0xFFFFFF00:08X}" for b in raw)
    return sorted({unsigned, signed})


def point_caches():
    """Every point cache of an object (cloth, soft body, particles, dynamic paint), with its
    object."""
    for ob in bpy.data.objects:
        for mod in ob.modifiers:
            cache = getattr(mod, "point_cache", None)
            if cache is not None:
                yield ob, cache
            canvas = getattr(mod, "canvas_settings", None)
            if mod.type == "DYNAMIC_PAINT" and canvas is not None:
                for surface in canvas.canvas_surfaces:
                    yield ob, surface.point_cache
        for system in ob.particle_systems:
            yield ob, system.point_cache


def collect_point_caches(needs):
    for ob, cache in point_caches():
        if cache.filepath and not cache.use_external:
            # A folder left from when the cache was external: Blender does not read it.
            needs.maybe(absolute(cache.filepath, ob.library), [])
        if cache.use_external:
            # Made by another program: the scene cannot render without it.
            if cache.filepath:
                folder = absolute(cache.filepath, ob.library)
                needs.need(folder, cache_files_in(folder, [cache.name], cache.index))
            continue
        if not cache.use_disk_cache:
            continue
        # "//blendcache_<file name without .blend>/" beside the .blend the object comes from.
        blend = absolute(ob.library.filepath) if ob.library else bpy.data.filepath
        stem = os.path.basename(blend)
        stem = stem[:-len(".blend")] if stem.endswith(".blend") else stem
        folder = os.path.join(os.path.dirname(blend), "blendcache_" + stem)
        needs.maybe(folder, cache_files_in(folder, cache_file_prefixes(cache, ob), cache.index))


def cache_files_in(folder, prefixes, index):
    if not os.path.isdir(folder):
        return []
    names = "|".join(re.escape(p) for p in prefixes if p)
    if not names:
        return files_under(folder)
    pattern = re.compile(rf"^(?:{names})_[0-9]+(?:_([0-9]+))?\.")
    found = []
    for name in os.listdir(folder):
        match = pattern.match(name)
        if match is None or not os.path.isfile(os.path.join(folder, name)):
            continue
        if index >= 0 and match.group(1) is not None and int(match.group(1)) != index:
            continue
        found.append(os.path.join(folder, name))
    return found


def collect_modifier_caches(needs):
    """Fluid caches, ocean caches and geometry-node bakes: folders Blender reads when they hold
    a bake and writes when they do not."""
    for ob in bpy.data.objects:
        for mod in ob.modifiers:
            if mod.type == "FLUID" and mod.fluid_type == "DOMAIN" and mod.domain_settings:
                folder = mod.domain_settings.cache_directory
                if folder:
                    folder = absolute(folder, ob.library)
                    needs.maybe(folder, existing(folder))
            elif mod.type == "OCEAN" and mod.filepath:
                folder = absolute(mod.filepath, ob.library)
                # The default cache folder is in Blender's temporary folder, and is only read
                # once the ocean is baked.
                needs.maybe(folder, existing(folder) if mod.is_cached else [])
            elif mod.type == "NODES" and hasattr(mod, "bakes"):
                collect_node_bakes(needs, ob, mod)


def collect_node_bakes(needs, ob, mod):
    """Geometry-node bakes (Blender 4.1+): a bake's files are in its own folder when it has a
    custom path, else in "<modifier bake folder>/<bake id>"; packed ones (4.3+) are inside the
    .blend."""
    for bake in mod.bakes:
        target = getattr(bake, "bake_target", "DISK")
        if target == "INHERIT":
            target = getattr(mod, "bake_target", "DISK")
        if target == "PACKED":
            continue
        if bake.use_custom_path:
            folder = bake.directory
        elif mod.bake_directory:
            folder = os.path.join(mod.bake_directory, str(bake.bake_id))
        else:
            continue
        if folder:
            folder = absolute(folder, ob.library)
            needs.maybe(folder, existing(folder))


def collect_libraries(needs):
    """Libraries something is linked from. An append leaves its source file among the
    libraries, with nothing linked from it, until the file is reopened: a render never reads
    that one, so it is neither uploaded nor missing."""
    used = {datablock.library.name for datablock in all_ids()
            if getattr(datablock, "library", None) is not None}
    for library in bpy.data.libraries:
        if library.filepath and not is_packed(library):
            path = absolute(library.filepath)
            if library.name in used:
                needs.need(path, existing(path))
            else:
                needs.ignore(path)


def all_ids():
    for prop in bpy.data.bl_rna.properties:
        if prop.type == "COLLECTION":
            yield from getattr(bpy.data, prop.identifier)


def ignore_weak_references(needs):
    """Data appended with "reuse data" remembers the file it came from (a weak reference, which
    blend_paths lists: Blender 5.0's startup file has one to its bundled Essentials brushes).
    Only a later append reads it; rendering never does, so it is neither uploaded nor missing."""
    for datablock in all_ids():
        reference = getattr(datablock, "library_weak_reference", None)
        if reference is not None and reference.filepath:
            needs.ignore(absolute(reference.filepath))


def collect_listed(needs):
    """Everything else Blender knows to be an external path (sounds, fonts, movie strips, mesh
    caches, ...), and each sequencer image strip's frames."""
    for path in bpy.utils.blend_paths(absolute=True, packed=False, local=False):
        if not path or path.startswith("<builtin>"):
            continue
        path = os.path.normpath(path)
        if needs.known(path):
            continue
        if any(token in path for token in TILE_TOKENS):
            needs.need(path, glob_tiles(path))
        else:
            needs.need(path, existing(path))


def collect_files():
    """The files the loaded scene needs: (files, missing), absolute and sorted."""
    needs = Needs()
    collect_images(needs)
    collect_sequences(needs)
    collect_point_caches(needs)
    collect_modifier_caches(needs)
    collect_libraries(needs)
    ignore_weak_references(needs)
    collect_listed(needs)
    blend = os.path.normpath(bpy.data.filepath)
    files = sorted(os.path.normpath(f) for f in needs.files)
    return [f for f in files if f != blend], needs.missing()


def asks_for_denoising(scene):
    """Whether Cycles denoises the scene's final render (some rendered view layer wants it)."""
    if scene.render.engine != "CYCLES" or not scene.cycles.use_denoising:
        return False
    return any(layer.use and layer.cycles.use_denoising for layer in scene.view_layers)


def scene_info(scene):
    render = scene.render
    is_movie = getattr(render, "is_movie_format", None)
    if is_movie is None:
        is_movie = render.image_settings.file_format in {"FFMPEG", "AVI_JPEG", "AVI_RAW"}
    return {
        "name": scene.name,
        "engine": render.engine,
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
        "frame_step": scene.frame_step,
        "samples": scene.cycles.samples if render.engine == "CYCLES" else None,
        "denoise": asks_for_denoising(scene),
        "output": bpy.path.abspath(render.filepath),
        "file_format": render.image_settings.file_format,
        "is_movie": bool(is_movie),
        "blender": bpy.app.version_string.split(" ")[0],
        "camera": scene.camera is not None,
    }


def save_copy(copy):
    """Saves the scene to `copy` with every path relative to the ORIGINAL scene's folder; returns
    the paths that stay absolute. Changes the loaded session's paths (not the file on disk)."""
    bpy.ops.file.make_paths_relative()
    ignored = set(bundled_folders())
    ignored.update(absolute(reference.filepath) for reference in (
        getattr(datablock, "library_weak_reference", None) for datablock in all_ids())
        if reference is not None and reference.filepath)
    absolute_paths = sorted({
        os.path.normpath(path)
        for path in bpy.utils.blend_paths(absolute=False, packed=False, local=False)
        if path and not path.startswith("//") and not path.startswith("<builtin>")
        and not is_inside(os.path.normpath(path), ignored)
    })
    # No COPY.blend1 when COPY exists.
    bpy.context.preferences.filepaths.save_version = 0
    # relative_remap=False keeps "//" relative to the original's folder (the default would
    # rewrite them relative to the copy's); copy=True leaves the session on the original.
    bpy.ops.wm.save_as_mainfile(filepath=copy, copy=True, relative_remap=False)
    return absolute_paths


def scene_argument():
    """The scene Blender was asked to open: the argument before "-P" on its command line."""
    args = sys.argv[: sys.argv.index("--")] if "--" in sys.argv else sys.argv
    for flag in ("-P", "--python"):
        if flag in args and args.index(flag) > 0:
            return args[args.index(flag) - 1]
    return "the scene"


def utf8(paths):
    """The paths, refused with a clear error when one cannot be said in JSON's UTF-8."""
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            fail("unsupported_path", f"a file name is not valid UTF-8: {path!r}")
    return paths


def main(argv):
    if len(argv) != 1:
        fail("bad_request", "usage: collect.py -- COPY.blend")
    copy = os.path.abspath(argv[0])
    if not bpy.data.filepath:
        fail("scene_unreadable", f"Blender did not load {scene_argument()}")
    blend = os.path.normpath(bpy.data.filepath)
    if os.path.normcase(os.path.realpath(copy)) == os.path.normcase(os.path.realpath(blend)):
        fail("bad_request", f"the copy would overwrite the scene {blend}")
    files, missing = collect_files()
    info = scene_info(bpy.context.scene)
    try:
        absolute_paths = save_copy(copy)
    except RuntimeError as e:
        fail("copy_failed", f"cannot save the scene's copy to {copy}: {e}")
    send("collected", blend=blend, files=utf8(files), missing=utf8(missing),
         absolute=utf8(absolute_paths), scene=info)


if __name__ == "__main__":
    try:
        main(sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else [])
    except SystemExit:
        raise
    except Exception as e:
        traceback.print_exc()
        fail("collect_failed", f"collecting {scene_argument()} failed: {type(e).__name__}: {e}")
