"""The `blender` command line, for the bpy wheel: enough of it for BlendNet's tests.

    blender --version
    blender [--factory-startup] -b [-Y] [SCENE.blend] [--python-exit-code N]
            (-P SCRIPT | --python-expr EXPR) [-- ARGS...]

The scene is opened (with scripts in it not run), then the script or expression runs with
`sys.argv` as Blender would give it (everything after `--` is the script's). Debian's Blender
has no OpenImageDenoise; this is how the denoise path is tested. Test code, not a product part.
"""
import runpy
import sys


def main(args):
    if "--version" in args:
        import bpy

        print(f"Blender {bpy.app.version_string}")
        return 0
    own = args[: args.index("--")] if "--" in args else args
    import bpy

    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    scene = next((a for a in own if a.endswith(".blend")), None)
    if scene is not None:
        bpy.ops.wm.open_mainfile(filepath=scene, load_ui=False)
    sys.argv = ["blender"] + args
    if "-P" in own:
        runpy.run_path(own[own.index("-P") + 1], run_name="__main__")
    elif "--python-expr" in own:
        exec(own[own.index("--python-expr") + 1], {"__name__": "__main__"})
    return 0


sys.exit(main(sys.argv[1:]))
