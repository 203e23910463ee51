"""BlendNet's frame finisher, run inside Blender on the merger:

    blender -b -Y scene.blend -P finish.py -- MERGED.exr FRAME OUTPUT_DIR

Makes the file the artist would get from a local render out of a merged multilayer EXR:
denoises it when the scene asks (the compositor's Denoise node with the scene's denoiser
settings, on the stored denoising passes, as Cycles does after a render), then runs the
scene's compositor on it and writes the scene's output format with its color
management, named as Blender names frames. The compositor reads the merged EXR through Image
nodes in place of the Render Layers nodes; the scene itself is emptied so the render that
drives the compositor costs next to nothing. The result goes through Blender's own write path,
so it is bit-identical to a local render's file when the pixels are.

A full-float multilayer EXR output with a lossless codec, nothing to denoise and no compositor
is the merged EXR itself, copied under Blender's name: it then keeps the frame's true sample
count and render time in its metadata.

Answers on stdout with one line "@blendnet {"finished": {"output": PATH}}" or
"@blendnet {"error": {"kind": KIND, "message": TEXT}}". Embedded in the blendnet binary
(node/render/src/finish.rs).
"""

import json
import os
import shutil
import sys

import bpy

PREFIX = "@blendnet "


def send(tag, /, **fields):
    sys.stdout.write(PREFIX + json.dumps({tag: fields}) + "\n")
    sys.stdout.flush()


def fail(kind, message):
    send("error", kind=kind, message=message)
    sys.exit(0)


def check_denoiser():
    import _cycles

    if not getattr(_cycles, "with_openimagedenoise", False):
        fail("denoiser_missing",
             "the scene asks for denoising, but this Blender has no OpenImageDenoise")


def source_of(tree, image, layer, denoise, scene):
    """An Image node reading `layer` of the merged EXR, and the socket that gives its (denoised)
    combined pass. Denoising is the compositor's Denoise node with the scene's own denoiser
    settings, fed the stored denoising passes: what Cycles does at the end of a render."""
    source = tree.nodes.new("CompositorNodeImage")
    source.image = image
    if layer is not None:
        source.layer = layer
    combined = source.outputs["Combined"]
    if not denoise:
        return source, combined
    node = tree.nodes.new("CompositorNodeDenoise")
    node.prefilter = scene.cycles.denoising_prefilter
    node.use_hdr = True
    if hasattr(node, "quality") and hasattr(scene.cycles, "denoising_quality"):
        node.quality = scene.cycles.denoising_quality
    tree.links.new(combined, node.inputs["Image"])
    guides = scene.cycles.denoising_input_passes
    for guide, wanted in (("Normal", guides == "RGB_ALBEDO_NORMAL"),
                          ("Albedo", guides in ("RGB_ALBEDO", "RGB_ALBEDO_NORMAL"))):
        name = f"Denoising {guide}"
        if wanted:
            if name not in source.outputs:
                fail("pass_missing", f"the merged frame lacks the {name} pass the denoiser needs")
            tree.links.new(source.outputs[name], node.inputs[guide])
    return source, node.outputs["Image"]


def compose_from(scene, merged, denoise):
    """Points the compositor at the merged EXR instead of the render."""
    image = bpy.data.images.load(merged, check_existing=False)
    if not scene.use_nodes or scene.node_tree is None:
        scene.use_nodes = True
        tree = scene.node_tree
        for node in list(tree.nodes):
            tree.nodes.remove(node)
        source, combined = source_of(tree, image, None, denoise, scene)
        composite = tree.nodes.new("CompositorNodeComposite")
        tree.links.new(combined, composite.inputs["Image"])
        tree.links.new(source.outputs["Alpha"], composite.inputs["Alpha"])
        return
    tree = scene.node_tree
    for layers in [n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers"]:
        source, combined = source_of(tree, image, layers.layer, denoise, scene)
        source.location = layers.location
        for link in [l for l in tree.links if l.from_node == layers]:
            # A Render Layers node calls the combined pass "Image"; an Image node, "Combined".
            if link.from_socket.name == "Image":
                tree.links.new(combined, link.to_socket)
                continue
            name = link.from_socket.name
            if name not in source.outputs:
                fail("pass_missing", f"the compositor uses pass {name!r}, which the merged "
                                     f"frame lacks")
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


# EXR codecs that keep every value: a merged frame written with any of them holds the same
# pixels.
LOSSLESS_EXR_CODECS = {"NONE", "ZIP", "ZIPS", "PIZ", "RLE"}


def merged_is_the_output(scene, wants_denoise):
    """Whether the merged EXR already is the file the scene writes: a full-float multilayer
    EXR with a lossless codec, nothing to denoise and no compositor. It then goes out as it
    is, with its true sample count and render time (an empty render would stamp its own)."""
    image = scene.render.image_settings
    composites = scene.render.use_compositing and scene.use_nodes and scene.node_tree
    return (image.file_format == "OPEN_EXR_MULTILAYER" and image.color_depth == "32"
            and image.exr_codec in LOSSLESS_EXR_CODECS and not wants_denoise and not composites)


def main(args):
    merged, frame, out_dir = args[0], int(args[1]), args[2]
    scene = bpy.context.scene
    if not bpy.data.filepath:
        fail("scene_unreadable", "Blender did not load the scene file")
    if not os.path.exists(merged):
        fail("bad_request", f"no merged frame at {merged}")
    wants_denoise = scene.render.engine == "CYCLES" and scene.cycles.use_denoising
    if wants_denoise:
        check_denoiser()
    scene.frame_set(frame)
    # Blender's own naming (the output path's file name with the frame number and the
    # format's extension), in the output directory.
    scene.render.filepath = os.path.join(out_dir, os.path.basename(scene.render.filepath))
    output = scene.render.frame_path(frame=frame)
    if merged_is_the_output(scene, wants_denoise):
        shutil.copyfile(merged, output)
        send("finished", output=output)
        return
    compose_from(scene, merged, wants_denoise)
    empty(scene)
    scene.render.use_compositing = True
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
