"""The BlendNet add-on's panels in a real Blender window, saved as a PNG; run by screenshot.sh:

    blender --factory-startup --enable-event-simulate -p 0 0 W H \
        --python screenshot.py -- WORK OUT_PNG

under a virtual X screen, with BLENDER_USER_SCRIPTS (holding the add-on in addons/blendnet) and
BLENDER_USER_CONFIG in WORK, BLENDNET_DATA_DIR a running node of a two-node mesh, and
BLENDNET_BIN its program. It builds a small scene, submits it with the add-on's own operator,
waits until the panels show both peers, the running job and its live preview, then takes the
screenshot and quits (at once, with exit status 1, on an error).

Tunables (environment): BLENDNET_SHOT_SAMPLES (2000), BLENDNET_SHOT_WAIT (seconds at most before
the shot is taken anyway, 180).
"""

import os
import sys
import time
import traceback

import addon_utils
import bpy

WORK, OUT = sys.argv[sys.argv.index("--") + 1:]
SAMPLES = int(os.environ.get("BLENDNET_SHOT_SAMPLES", "2000"))
MAX_WAIT = float(os.environ.get("BLENDNET_SHOT_WAIT", "180"))
# The share of the window's width the preview gets; the Properties editor has the rest.
IMAGE_SHARE = 0.5
# Seconds the shot waits, once everything shows, for the job to get on.
SETTLE = 90
# The Outliner's height above the Properties editor, in pixels.
OUTLINER_HEIGHT = 140


def say(text):
    print(f"screenshot: {text}", flush=True)


def raise_error(e):
    raise e


# The add-on, in the throwaway profile.

def enable():
    """Enables the add-on (screenshot.sh copied it into the profile's add-ons)."""
    addon_utils.enable("blendnet", default_set=True, handle_error=raise_error)
    prefs = bpy.context.preferences.addons["blendnet"].preferences
    prefs.blendnet_path = os.environ.get("BLENDNET_BIN", "")
    return sys.modules["blendnet.session"].SESSION


# A small scene worth looking at: a monkey on a floor, in Cycles, long enough to render that the
# job still runs when the shot is taken.

def material(name, color, roughness=0.5):
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    bsdf = mat.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*color, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    return mat


def make_scene():
    for obj in list(bpy.data.objects):
        if obj.type == "MESH":
            bpy.data.objects.remove(obj)
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_monkey_add(size=1.6, location=(0, 0, 1.0), rotation=(0.35, 0, 0.6))
    monkey = bpy.context.active_object
    monkey.name = "Suzanne"
    monkey.modifiers.new("Subdivision", "SUBSURF").levels = 2
    bpy.ops.object.shade_smooth()
    monkey.data.materials.append(material("Orange", (0.8, 0.25, 0.05), 0.35))
    bpy.ops.mesh.primitive_plane_add(size=30, location=(0, 0, 0))
    floor = bpy.context.active_object
    floor.data.materials.append(material("Floor", (0.55, 0.6, 0.7), 0.8))
    floor.select_set(False)
    monkey.select_set(True)
    bpy.context.view_layer.objects.active = monkey
    camera = bpy.data.objects["Camera"]
    camera.location = (4.2, -5.6, 3.2)
    direction = monkey.location - camera.location
    camera.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()
    light = bpy.data.objects["Light"]
    light.data.type = "SUN"
    light.data.energy = 4.0
    light.rotation_euler = (0.6, 0.2, 0.9)
    scene.world.use_nodes = True
    scene.world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.3, 0.4, 0.55, 1)

    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = SAMPLES
    scene.cycles.use_adaptive_sampling = False
    scene.cycles.use_denoising = False
    scene.render.resolution_x = 320
    scene.render.resolution_y = 240
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = "//render/frame_"
    scene.frame_current = 1
    scene.blendnet.samples = SAMPLES
    path = os.path.join(WORK, "scene", "suzanne.blend")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=path)


# The layout: the preview in an Image Editor on the left, the Properties editor on the Render
# tab on the right, over the whole height but the timeline.

def window():
    return bpy.context.window_manager.windows[0]


def area_of(kind):
    return next((a for a in window().screen.areas if a.type == kind), None)


def move_edge(x, y, delta):
    """Moves the edge between two areas through the window point (x, y) by `delta` pixels.
    (Its poll wants no region under the mouse: Blender runs with --enable-event-simulate, so
    the X pointer is not seen.)"""
    win = window()
    with bpy.context.temp_override(window=win, screen=win.screen):
        bpy.ops.screen.area_move(x=x, y=y, delta=delta)


def arrange():
    win = window()
    props, outliner, view3d = area_of("PROPERTIES"), area_of("OUTLINER"), area_of("VIEW_3D")
    # The column of the Outliner and the Properties editor, wider.
    edge_x = props.x - 1
    move_edge(edge_x, props.y + props.height // 2, int(win.width * IMAGE_SHARE) - edge_x)
    # The Outliner, smaller: its edge with the Properties editor up (window y counts upwards).
    if outliner is not None:
        move_edge(props.x + props.width // 2, props.y + props.height,
                  outliner.height - OUTLINER_HEIGHT)
    props.spaces.active.context = "RENDER"
    view3d.type = "IMAGE_EDITOR"
    image_editor = view3d
    image_editor.spaces.active.show_region_toolbar = False
    say("areas: " + ", ".join(f"{a.type} {a.x},{a.y} {a.width}x{a.height}"
                              for a in win.screen.areas))
    return props, image_editor


def scroll_to_bottom(area):
    """Scrolls the Properties editor to its end: the add-on's panels come last but for three
    closed ones (Grease Pencil, Freestyle, Color Management)."""
    region = next(r for r in area.regions if r.type == "WINDOW")
    with bpy.context.temp_override(window=window(), area=area, region=region):
        for _ in range(20):
            bpy.ops.view2d.scroll_down(page=True)


def show_preview(area):
    image = bpy.data.images.get("BlendNet Preview")
    if image is None:
        return False
    space = area.spaces.active
    if space.image != image:
        space.image = image
    region = next(r for r in area.regions if r.type == "WINDOW")
    with bpy.context.temp_override(window=window(), area=area, region=region):
        bpy.ops.image.view_all(fit_view=True)
    return True


# The steps, on a timer: Blender draws the window between them.

class Shot:
    def __init__(self, session):
        self.session = session
        self.started = time.monotonic()
        self.props = self.image_editor = None
        self.submitted = False
        self.ready_at = None
        self.shot_at = None

    def tick(self):
        try:
            return self.step()
        except Exception:
            traceback.print_exc()
            say("FAILED")
            os._exit(1)

    def ready(self):
        """Both peers, the job running with work done, and its preview."""
        session = self.session
        job = session.job or {}
        summary = job.get("summary", {})
        online = [p for p in session.peers if p.get("online")]
        done = sum(f.get("samples_done", 0) for f in job.get("frames", []))
        return (len(online) >= 2 and str(summary.get("status")).lower() == "active" and done > 0
                and bpy.data.images.get("BlendNet Preview") is not None)

    def step(self):
        session = self.session
        elapsed = time.monotonic() - self.started
        if self.props is None:
            self.props, self.image_editor = arrange()
            return 0.5
        if not self.submitted:
            if session.status is None:
                if elapsed > 60:
                    raise RuntimeError(f"no daemon after 60 s: {session.error}")
                return 0.5
            win = window()
            with bpy.context.temp_override(window=win, area=self.props):
                result = bpy.ops.blendnet.render_frame("EXEC_DEFAULT")
            say(f"submitted: {result}")
            self.submitted = True
            return 0.5
        if self.shot_at is None:
            show_preview(self.image_editor)
            peers = len(session.peers)
            job = (session.job or {}).get("summary", {})
            say(f"{elapsed:5.1f} s: {peers} peers, job {job.get('id', '-')[:8]} "
                f"{job.get('status', '-')} {job.get('done_units', 0)}/{job.get('total_units', 0)}"
                f"{', error: ' + session.error if session.error else ''}")
            if self.ready():
                self.ready_at = self.ready_at or time.monotonic()
            # Once ready, until a tenth of the samples are done (the preview then shows more than
            # the first slices' noise, the ETA is steadier), or for SETTLE seconds at most.
            progress = job.get("done_units", 0) / max(job.get("total_units", 0), 1)
            late = self.ready_at is not None and (
                progress >= 0.1 or time.monotonic() - self.ready_at > SETTLE)
            if late or elapsed > MAX_WAIT:
                if self.ready_at is None:
                    say(f"not everything showed within {MAX_WAIT:.0f} s: taking the shot anyway")
                show_preview(self.image_editor)
                scroll_to_bottom(self.props)
                self.shot_at = time.monotonic()
            return 1.0
        win = window()
        with bpy.context.temp_override(window=win, area=self.props):
            bpy.ops.screen.screenshot(filepath=OUT)
        say(f"saved {OUT}")
        bpy.ops.wm.quit_blender()
        return None


def main():
    bpy.context.preferences.view.show_splash = False
    session = enable()
    make_scene()
    shot = Shot(session)
    bpy.app.timers.register(shot.tick, first_interval=1.0)


main()
