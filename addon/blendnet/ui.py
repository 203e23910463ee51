"""The add-on's preferences, operators and panels."""

import json
import os
import tempfile

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import collect, daemon
from .session import PREVIEW_IMAGE, SESSION

ADDON = __package__


def prefs(context=None):
    context = context or bpy.context
    return context.preferences.addons[ADDON].preferences


def data_dir(context=None):
    return bpy.path.abspath(prefs(context).data_dir) or daemon.default_data_dir()


def status_word(status):
    """"active", "done", "failed", "cancelled" from a job's status as the API gives it."""
    if isinstance(status, dict):
        status = next(iter(status), "")
    return str(status).lower()


# Preferences: the program, the node's data, the mesh.

class BLENDNET_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON

    blendnet_path: StringProperty(
        name="blendnet Program", subtype="FILE_PATH",
        description="The blendnet program (empty: blendnet on PATH)")
    data_dir: StringProperty(
        name="Data Folder", subtype="DIR_PATH",
        description="The node's data folder (empty: BLENDNET_DATA_DIR or the platform's)")
    join_code: StringProperty(name="Invite Code", description="A code from `blendnet invite`")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "blendnet_path")
        layout.prop(self, "data_dir")
        if SESSION.error:
            layout.label(text=SESSION.error, icon="ERROR")
        box = layout.box()
        box.label(text="Mesh")
        status = SESSION.status
        if status:
            box.label(text=f"This node: {status.get('fingerprint', '')}  mesh "
                           f"{str(status.get('mesh_id', ''))[:12]}  peers {status.get('peer_count', 0)}")
            row = box.row()
            row.operator(BLENDNET_OT_invite.bl_idname, icon="COPYDOWN")
            if SESSION.invite:
                row.label(text=SESSION.invite)
            for machine in SESSION.pending:
                row = box.row()
                row.label(text=f"Waiting on the LAN: {machine.get('fingerprint', '?')}")
                row.operator(BLENDNET_OT_admit.bl_idname).fingerprint = machine.get("fingerprint", "")
        else:
            box.operator(BLENDNET_OT_create_mesh.bl_idname, icon="ADD")
            row = box.row()
            row.prop(self, "join_code")
            row.operator(BLENDNET_OT_join_mesh.bl_idname)
            box.operator(BLENDNET_OT_start_daemon.bl_idname, icon="PLAY")


class BLENDNET_PG_render(bpy.types.PropertyGroup):
    samples: IntProperty(
        name="Samples", min=0, default=0,
        description="Samples per frame on the mesh (0: the scene's)")
    split: EnumProperty(
        name="Split", default="auto",
        items=[("auto", "Auto", "Sample slices for a Cycles still, frames otherwise"),
               ("samples", "Samples", "Slices of each frame's samples, merged exactly"),
               ("frames", "Frames", "Whole frames on each peer")])
    job: StringProperty(name="Job", description="The job shown in the panels and the preview")


# Operators.

def _run_cli_in_background(context, args, done):
    binary = prefs(context).blendnet_path
    folder = data_dir(context)

    def work():
        return daemon.run_cli(daemon.find_binary(binary), folder, args)
    SESSION.run(work, done)


class BLENDNET_OT_start_daemon(bpy.types.Operator):
    """Find this machine's BlendNet daemon, or start it"""
    bl_idname = "blendnet.start_daemon"
    bl_label = "Start Daemon"

    def execute(self, context):
        SESSION.start_daemon(prefs(context).blendnet_path, data_dir(context))
        return {"FINISHED"}


class BLENDNET_OT_create_mesh(bpy.types.Operator):
    """Create a new mesh with this machine as its first node"""
    bl_idname = "blendnet.create_mesh"
    bl_label = "Create a Mesh"

    def execute(self, context):
        binary, folder = prefs(context).blendnet_path, data_dir(context)

        def done(_, error):
            SESSION.error = error or ""
            if not error:
                SESSION.start_daemon(binary, folder)
        _run_cli_in_background(context, ["init"], done)
        return {"FINISHED"}


class BLENDNET_OT_join_mesh(bpy.types.Operator):
    """Join a mesh with an invite code"""
    bl_idname = "blendnet.join_mesh"
    bl_label = "Join"

    def execute(self, context):
        code = prefs(context).join_code.strip()
        if not code:
            self.report({"ERROR"}, "Paste an invite code (from `blendnet invite`) first")
            return {"CANCELLED"}
        binary, folder = prefs(context).blendnet_path, data_dir(context)

        def done(_, error):
            SESSION.error = error or ""
            if not error:
                SESSION.start_daemon(binary, folder)
        _run_cli_in_background(context, ["join", code], done)
        return {"FINISHED"}


class BLENDNET_OT_invite(bpy.types.Operator):
    """Make an invite code for another machine (valid for an hour), and copy it"""
    bl_idname = "blendnet.invite"
    bl_label = "Invite a Machine"

    def execute(self, context):
        folder = data_dir(context)

        def done(code, error):
            SESSION.error = error or ""
            if code:
                SESSION.invite = code
                bpy.context.window_manager.clipboard = code
        SESSION.run(lambda: daemon.Client(folder).invite(3600), done)
        return {"FINISHED"}


class BLENDNET_OT_admit(bpy.types.Operator):
    """Admit this machine, waiting on the LAN, into the mesh"""
    bl_idname = "blendnet.admit"
    bl_label = "Admit"

    fingerprint: StringProperty()

    def execute(self, context):
        folder, fingerprint = data_dir(context), self.fingerprint
        SESSION.run(lambda: daemon.Client(folder).admit(fingerprint))
        return {"FINISHED"}


def output_folder(scene):
    """The folder the scene's output path writes into, absolute."""
    path = bpy.path.abspath(scene.render.filepath)
    if path.startswith("//"):
        return None
    return path if path.endswith(("/", "\\")) else os.path.dirname(path)


def save_copy():
    """The current state of the file, saved as a copy the mesh can read: beside the file, so
    its relative paths resolve as in the original (in a temporary folder when that is not
    possible, with relative paths remapped)."""
    original = bpy.data.filepath
    if original:
        folder = os.path.dirname(original)
        stem = os.path.splitext(os.path.basename(original))[0]
        copy = os.path.join(folder, f".{stem}.blendnet-{os.getpid()}.blend")
        try:
            bpy.ops.wm.save_as_mainfile(filepath=copy, copy=True, relative_remap=False)
            return copy
        except RuntimeError:
            pass
    folder = tempfile.mkdtemp(prefix="blendnet-submit-")
    name = os.path.basename(original) if original else "untitled.blend"
    copy = os.path.join(folder, name)
    bpy.ops.wm.save_as_mainfile(filepath=copy, copy=True, relative_remap=True)
    return copy


class _Render:
    """Render on the mesh: save a copy of the current state, check its files, submit."""

    bl_options = {"REGISTER"}

    allow_missing: BoolProperty(
        name="Render Without the Missing Files", default=False, options={"SKIP_SAVE"})

    animation = False

    def invoke(self, context, event):
        _, missing = collect.collect_files()
        if missing and not self.allow_missing:
            self._missing = missing
            return context.window_manager.invoke_props_dialog(self, width=600)
        self._checked = True
        return self.execute(context)

    def draw(self, context):
        layout = self.layout
        missing = getattr(self, "_missing", [])
        layout.label(text=f"{len(missing)} file(s) the scene uses are missing:", icon="ERROR")
        for path in missing[:12]:
            layout.label(text=path)
        if len(missing) > 12:
            layout.label(text=f"... and {len(missing) - 12} more")
        layout.prop(self, "allow_missing")

    def execute(self, context):
        scene = context.scene
        try:
            binary = daemon.find_binary(prefs(context).blendnet_path)
        except daemon.DaemonError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        out = output_folder(scene)
        if out is None:
            self.report({"ERROR"}, "The output path is relative to a file never saved: save the "
                                   "file, or set an absolute output path")
            return {"CANCELLED"}
        if not self.allow_missing and not getattr(self, "_checked", False):
            _, missing = collect.collect_files()
            if missing:
                self.report({"ERROR"}, "Missing files (render anyway to go on without them): "
                                       + ", ".join(missing))
                return {"CANCELLED"}
        settings = scene.blendnet
        copy = save_copy()
        stem = os.path.splitext(os.path.basename(bpy.data.filepath))[0] or "untitled"
        args = ["render", copy, "--out", out, "--split", settings.split, "--json",
                "--name", f"{stem}/{scene.name}"]
        if not self.animation:
            args += ["--frames", str(scene.frame_current)]
        if settings.samples > 0:
            args += ["--samples", str(settings.samples)]
        if bpy.app.binary_path:
            args += ["--blender", bpy.app.binary_path]
        if self.allow_missing:
            args.append("--allow-missing")
        folder = data_dir(context)

        def work():
            try:
                status = daemon.ensure_running(binary, folder).status()
                return status, daemon.run_cli(binary, folder, args)
            finally:
                try:
                    os.remove(copy)
                except OSError:
                    pass

        def done(result, error):
            if error:
                SESSION.error = f"Not submitted: {error}"
                return
            SESSION.error = ""
            SESSION.status, output = result
            job = json.loads(output.strip().splitlines()[-1])["job"]
            SESSION.selected = job
            SESSION.message = f"Submitted job {job[:12]}; the frames go to {out}"
            try:
                bpy.context.scene.blendnet.job = job
            except AttributeError:
                pass
        SESSION.run(work, done)
        self.report({"INFO"}, "Submitting to the BlendNet mesh...")
        return {"FINISHED"}


class BLENDNET_OT_render_frame(_Render, bpy.types.Operator):
    """Render the current frame on the BlendNet mesh; it lands where the output path says"""
    bl_idname = "blendnet.render_frame"
    bl_label = "Render Frame on Mesh"


class BLENDNET_OT_render_animation(_Render, bpy.types.Operator):
    """Render the scene's frame range on the BlendNet mesh; frames land where the output path
    says"""
    bl_idname = "blendnet.render_animation"
    bl_label = "Render Animation on Mesh"
    animation = True


class BLENDNET_OT_select_job(bpy.types.Operator):
    """Show this job in the panels and the preview"""
    bl_idname = "blendnet.select_job"
    bl_label = "Show"

    job: StringProperty()

    def execute(self, context):
        SESSION.selected = self.job
        context.scene.blendnet.job = self.job
        SESSION.refresh(data_dir(context))
        return {"FINISHED"}


class BLENDNET_OT_cancel_job(bpy.types.Operator):
    """Cancel the job everywhere on the mesh"""
    bl_idname = "blendnet.cancel_job"
    bl_label = "Cancel Job"

    job: StringProperty()

    def execute(self, context):
        folder, job = data_dir(context), self.job
        SESSION.run(lambda: daemon.Client(folder).cancel(job))
        return {"FINISHED"}


class BLENDNET_OT_open_output(bpy.types.Operator):
    """Open the folder the job's frames go to"""
    bl_idname = "blendnet.open_output"
    bl_label = "Open Output Folder"

    folder: StringProperty()

    def execute(self, context):
        if not self.folder or not os.path.isdir(self.folder):
            self.report({"ERROR"}, f"The output folder {self.folder} does not exist yet")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=self.folder)
        return {"FINISHED"}


class BLENDNET_OT_show_log(bpy.types.Operator):
    """Put the logs of the job's tasks rendered on this machine in the text "BlendNet Log\""""
    bl_idname = "blendnet.show_log"
    bl_label = "Show Log"

    job: StringProperty()

    def execute(self, context):
        folder, job = data_dir(context), self.job

        def done(logs, error):
            if error:
                SESSION.error = error
                return
            text = bpy.data.texts.get("BlendNet Log") or bpy.data.texts.new("BlendNet Log")
            text.clear()
            for entry in logs or []:
                text.write(f"== {entry.get('task', '')}\n{entry.get('log', '')}\n")
            if not logs:
                text.write("No task of this job ran on this machine.\n")
            SESSION.message = "The job's logs are in the text \"BlendNet Log\""
        SESSION.run(lambda: daemon.Client(folder).logs(job), done)
        return {"FINISHED"}


class BLENDNET_OT_show_preview(bpy.types.Operator):
    """Show the live preview in an Image Editor"""
    bl_idname = "blendnet.show_preview"
    bl_label = "Show Preview"

    def execute(self, context):
        image = bpy.data.images.get(PREVIEW_IMAGE)
        if image is None:
            self.report({"WARNING"}, "No preview yet: it appears once slices of a frame are done")
            return {"CANCELLED"}
        for area in context.screen.areas:
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = image
                return {"FINISHED"}
        bpy.ops.render.view_show("INVOKE_DEFAULT")
        for window in context.window_manager.windows:
            for area in window.screen.areas:
                if area.type == "IMAGE_EDITOR":
                    area.spaces.active.image = image
        return {"FINISHED"}


# Panels, in the Render properties.

class _Panel:
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "render"


class BLENDNET_PT_render(_Panel, bpy.types.Panel):
    bl_label = "BlendNet"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.blendnet
        row = layout.row(align=True)
        row.operator(BLENDNET_OT_render_frame.bl_idname, icon="RENDER_STILL")
        row.operator(BLENDNET_OT_render_animation.bl_idname, icon="RENDER_ANIMATION")
        row = layout.row()
        row.prop(settings, "samples")
        row.prop(settings, "split", text="")
        if SESSION.error:
            layout.label(text=SESSION.error, icon="ERROR")
        elif SESSION.message:
            layout.label(text=SESSION.message, icon="INFO")


class BLENDNET_PT_peers(_Panel, bpy.types.Panel):
    bl_label = "Peers"
    bl_parent_id = "BLENDNET_PT_render"

    def draw(self, context):
        layout = self.layout
        if not SESSION.peers:
            layout.label(text="No peers known yet")
        for peer in sorted(SESSION.peers, key=lambda p: (not p.get("is_self"), p.get("fingerprint", ""))):
            caps = peer.get("capabilities") or {}
            box = layout.box()
            row = box.row()
            name = peer.get("fingerprint") or peer.get("peer_id", "")[-12:]
            row.label(text=name + ("  (this machine)" if peer.get("is_self") else ""),
                      icon="CHECKMARK" if peer.get("online") else "X")
            row.label(text=f"Blender {caps.get('blender') or '-'}")
            row = box.row()
            row.label(text=f"{caps.get('cores', '?')} cores")
            row.label(text=", ".join(caps.get("gpus") or []) or "no GPU")
            rendering = peer.get("rendering")
            if rendering:
                task = rendering.get("task", {})
                box.label(text=f"Rendering job {str(rendering.get('job', ''))[:12]} frame "
                               f"{task.get('frame_start', '?')} samples "
                               f"{rendering.get('samples_done', 0)}/{task.get('samples', '?')}")


class BLENDNET_PT_jobs(_Panel, bpy.types.Panel):
    bl_label = "Jobs"
    bl_parent_id = "BLENDNET_PT_render"

    def draw(self, context):
        layout = self.layout
        if not SESSION.jobs:
            layout.label(text="No jobs yet")
        for job in reversed(SESSION.jobs):
            state = status_word(job.get("status"))
            done = job.get("live_units", job.get("done_units", 0))
            total = max(job.get("total_units", 0), 1)
            row = layout.row()
            text = f"{job.get('name', '')} {job['id'][:8]}  {state}  {100 * done // total}%"
            if job.get("eta_secs") is not None and state == "active":
                text += f"  ETA {job['eta_secs'] // 60}:{job['eta_secs'] % 60:02d}"
            row.label(text=text, icon="RADIOBUT_ON" if job["id"] == SESSION.selected else "RADIOBUT_OFF")
            row.operator(BLENDNET_OT_select_job.bl_idname, text="", icon="HIDE_OFF").job = job["id"]
        view = SESSION.job
        if not view:
            return
        box = layout.box()
        summary = view.get("summary", {})
        state = status_word(summary.get("status"))
        box.label(text=f"Job {summary.get('id', '')[:12]}: {state}")
        if isinstance(summary.get("status"), dict):
            reason = next(iter(summary["status"].values()), {})
            if isinstance(reason, dict) and reason.get("reason"):
                box.label(text=str(reason["reason"]), icon="ERROR")
        frames = view.get("frames", [])
        done = sum(1 for f in frames if f.get("samples_done", 0) >= f.get("samples", 1))
        samples = sum(f.get("samples_done", 0) for f in frames)
        box.label(text=f"Frames {done}/{len(frames)}, samples {samples}/"
                       f"{sum(f.get('samples', 0) for f in frames)}")
        row = box.row()
        if state == "active":
            row.operator(BLENDNET_OT_cancel_job.bl_idname, icon="CANCEL").job = summary.get("id", "")
        delivery = view.get("delivery") or {}
        if delivery.get("dir"):
            row.operator(BLENDNET_OT_open_output.bl_idname, icon="FILE_FOLDER").folder = delivery["dir"]
        row.operator(BLENDNET_OT_show_log.bl_idname, icon="TEXT").job = summary.get("id", "")
        box.operator(BLENDNET_OT_show_preview.bl_idname, icon="IMAGE")


CLASSES = (
    BLENDNET_AP_preferences,
    BLENDNET_PG_render,
    BLENDNET_OT_start_daemon,
    BLENDNET_OT_create_mesh,
    BLENDNET_OT_join_mesh,
    BLENDNET_OT_invite,
    BLENDNET_OT_admit,
    BLENDNET_OT_render_frame,
    BLENDNET_OT_render_animation,
    BLENDNET_OT_select_job,
    BLENDNET_OT_cancel_job,
    BLENDNET_OT_open_output,
    BLENDNET_OT_show_log,
    BLENDNET_OT_show_preview,
    BLENDNET_PT_render,
    BLENDNET_PT_peers,
    BLENDNET_PT_jobs,
)


def tick():
    """The UI timer: finished work's callbacks, and a refresh every few seconds."""
    try:
        SESSION.pump()
        if SESSION.status and SESSION.refresh_due():
            SESSION.refresh(data_dir())
    except Exception as e:  # never let the timer die with a traceback
        SESSION.error = f"BlendNet: {type(e).__name__}: {e}"
    return 0.5


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.blendnet = bpy.props.PointerProperty(type=BLENDNET_PG_render)
    bpy.app.timers.register(tick, first_interval=0.5, persistent=True)
    SESSION.start_daemon(prefs().blendnet_path, data_dir())


def unregister():
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    SESSION.stop()
    del bpy.types.Scene.blendnet
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
