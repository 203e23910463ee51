"""BlendNet's frame finisher, run inside Blender on the merger:

    blender -b -Y scene.blend -P finish.py -- MERGED.exr FRAME OUTPUT_DIR

Makes the file the artist would get from a local render out of a merged multilayer EXR:
denoises it when the scene asks (Cycles' own denoiser on the stored denoising passes), then
runs the scene's compositor on it and writes the scene's output format with its color
management, named as Blender names frames. The compositor reads the merged EXR through Image
nodes in place of the Render Layers nodes; the scene itself is emptied so the render that
drives the compositor costs next to nothing. The result goes through Blender's own write path,
so it is bit-identical to a local render's file when the pixels are.

Answers on stdout with one line "@blendnet {"finished": {"output": PATH}}" or
"@blendnet {"error": {"kind": KIND, "message": TEXT}}". Embedded in the blendnet binary
(node/render/src/finish.rs).
"""

import json
import os
import sys

import bpy

PREFIX = "@blendnet "


def send(tag, /, **fields):
    sys.stdout.write(PREFIX + json.dumps({tag: fields}) + "\n")
    sys.stdout.flush()


def fail(kind, message):
    send("error", kind=kind, message=message)
    sys.exit(0)


def denoise(scene, merged, work_dir):
    """Cycles' denoiser over the merged EXR (its denoising data passes), or a named error."""
    import _cycles

    if not getattr(_cycles, "with_openimagedenoise", False):
        fail("denoiser_missing",
             "the scene asks for denoising, but this Blender has no OpenImageDenoise")
    out = os.path.join(work_dir, "denoised.exr")
    try:
        bpy.ops.cycles.denoise_animation(input_filepath=merged, output_filepath=out)
    except RuntimeError as e:
        fail("denoise_failed", f"denoising failed: {e}")
    return out


def compose_from(scene, merged):
    """Points the compositor at the merged EXR instead of the render."""
    image = bpy.data.images.load(merged, check_existing=False)
    if not scene.use_nodes or scene.node_tree is None:
        scene.use_nodes = True
        tree = scene.node_tree
        for node in list(tree.nodes):
            tree.nodes.remove(node)
        source = tree.nodes.new("CompositorNodeImage")
        source.image = image
        composite = tree.nodes.new("CompositorNodeComposite")
        tree.links.new(source.outputs["Combined"], composite.inputs["Image"])
        tree.links.new(source.outputs["Alpha"], composite.inputs["Alpha"])
        return
    tree = scene.node_tree
    for layers in [n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers"]:
        source = tree.nodes.new("CompositorNodeImage")
        source.image = image
        source.layer = layers.layer
        source.location = layers.location
        for link in [l for l in tree.links if l.from_node == layers]:
            # A Render Layers node calls the combined pass "Image"; an Image node, "Combined".
            name = "Combined" if link.from_socket.name == "Image" else link.from_socket.name
            if name not in source.outputs:
                fail("pass_missing", f"the compositor uses pass {link.from_socket.name!r}, "
                                     f"which the merged frame lacks")
            tree.links.new(source.outputs[name], link.to_socket)
        tree.nodes.remove(layers)


def empty(scene):
    """Nothing left to render: the render only drives the compositor."""
    for layer in scene.view_layers:
        for child in layer.layer_collection.children:
            child.exclude = True
    scene.world = None
    if scene.render.engine == "CYCLES":
        scene.cycles.samples = 1
        scene.cycles.use_denoising = False


def main(args):
    merged, frame, out_dir = args[0], int(args[1]), args[2]
    scene = bpy.context.scene
    if not bpy.data.filepath:
        fail("scene_unreadable", "Blender did not load the scene file")
    if not os.path.exists(merged):
        fail("bad_request", f"no merged frame at {merged}")
    wants_denoise = scene.render.engine == "CYCLES" and scene.cycles.use_denoising
    if wants_denoise:
        merged = denoise(scene, merged, out_dir)
    compose_from(scene, merged)
    empty(scene)
    scene.render.use_compositing = True
    scene.frame_set(frame)
    # Blender's own naming (the output path's file name with the frame number and the
    # format's extension), in the output directory.
    scene.render.filepath = os.path.join(out_dir, os.path.basename(scene.render.filepath))
    output = scene.render.frame_path(frame=frame)
    # A still render writes its path as given (no frame number): give it the full name.
    scene.render.filepath = output
    try:
        bpy.ops.render.render(write_still=True)
    except RuntimeError as e:
        fail("render_failed", f"compositing failed: {e}")
    if not os.path.exists(output):
        fail("render_failed", f"Blender wrote no file for frame {frame}")
    send("finished", output=output)


argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
if len(argv) != 3:
    fail("bad_request", "usage: finish.py -- MERGED.exr FRAME OUTPUT_DIR")
main(argv)
