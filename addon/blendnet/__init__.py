"""BlendNet: render on every machine you own or rent, as one peer-to-peer mesh, from Blender.

The add-on is a peer through the `blendnet` daemon of this machine: it finds the daemon of its
data folder or starts one (detached, so it outlives Blender), submits the scene with the same
collection code the command line uses, and shows the peers, the jobs and a live preview. Network
calls run on a worker thread, never on Blender's main thread.
"""

bl_info = {
    "name": "BlendNet",
    "author": "BlendNet developers",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "Properties > Render > BlendNet",
    "description": "Render on a peer-to-peer mesh of your machines and cloud instances",
    "doc_url": "https://github.com/blendnet/blendnet",
    "category": "Render",
}

if "bpy" in locals():
    import importlib

    from . import collect, daemon, session, ui

    for module in (collect, daemon, session, ui):
        importlib.reload(module)
else:
    import bpy  # noqa: F401  (Blender's add-on reload idiom above looks for it)

    from . import ui


def register():
    ui.register()


def unregister():
    ui.unregister()
