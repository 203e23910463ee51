//! Collecting a scene with real Blender: every file it needs, nothing else, and a copy that
//! resolves them once the upload is laid out elsewhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use blendnet_render::{CollectError, collect, project_root, upload_list};
use blendnet_tests::{blender, blender_python, blender_scene, bpy_blender, run_bounded};

/// Python that writes a 4×4 PNG at `path` with Blender (defined as `png(path)`).
const PNG_PY: &str = "import bpy, os\n\
def png(path):\n    \
    os.makedirs(os.path.dirname(path), exist_ok=True)\n    \
    image = bpy.data.images.new('png', 4, 4)\n    \
    image.pixels = [0.8, 0.4, 0.2, 1.0] * 16\n    \
    image.filepath_raw = path\n    \
    image.file_format = 'PNG'\n    \
    image.save()\n    \
    bpy.data.images.remove(image)\n";

fn utf8(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// A project laid out as artists do, with every kind of reference the upload must keep:
///
/// ```text
/// proj/assets/props.blend        object "Prop", material "Metal" -> //tex/metal.png,
///                                and material "BaseMat" linked from //base/base.blend
/// proj/assets/base/base.blend    material "BaseMat" -> //../tex/metal2.png
/// proj/assets/tex/metal.png, metal2.png
/// proj/shots/shot.blend          //textures/wood.png, //seq/frame_0001.png (a sequence of
///                                3), //udim/tex.<UDIM>.png (tiles 1001, 1002), a speaker's
///                                sound //sound/beep.wav, "Prop" linked from
///                                //../assets/props.blend, and proj/textures/stone.png by its
///                                ABSOLUTE path
/// ```
///
/// Beside them, files nothing uses (a tile the UDIM set does not list, notes in the sequence's
/// folder).
fn project(proj: &Path) -> PathBuf {
    let p = |rel: &str| utf8(&proj.join(rel)).to_owned();
    let assets = format!(
        "{PNG_PY}\
         import wave\n\
         for path in {pngs:?}:\n    png(path)\n\
         os.makedirs(os.path.dirname({wav:?}), exist_ok=True)\n\
         with wave.open({wav:?}, 'wb') as w:\n    \
             w.setnchannels(1); w.setsampwidth(2); w.setframerate(8000)\n    \
             w.writeframes(bytes(1600))\n\
         open({notes:?}, 'w').write('not a frame')\n\
         bpy.ops.wm.read_factory_settings(use_empty=True)\n\
         os.makedirs(os.path.dirname({base:?}), exist_ok=True)\n\
         bpy.ops.wm.save_as_mainfile(filepath={base:?})\n\
         image = bpy.data.images.load('//../tex/metal2.png')\n\
         image.name = 'basemetal'\n\
         mat = bpy.data.materials.new('BaseMat'); mat.use_nodes = True\n\
         mat.node_tree.nodes.new('ShaderNodeTexImage').image = image\n\
         mat.use_fake_user = True\n\
         bpy.ops.wm.save_as_mainfile(filepath={base:?})\n\
         bpy.ops.wm.read_factory_settings(use_empty=True)\n\
         bpy.ops.wm.save_as_mainfile(filepath={props:?})\n\
         mat = bpy.data.materials.new('Metal'); mat.use_nodes = True\n\
         mat.node_tree.nodes.new('ShaderNodeTexImage').image = \
             bpy.data.images.load('//tex/metal.png')\n\
         with bpy.data.libraries.load({base:?}, link=True, relative=True) as (src, dst):\n    \
             dst.materials = ['BaseMat']\n\
         mesh = bpy.data.meshes.new('PropMesh')\n\
         mesh.materials.append(mat); mesh.materials.append(dst.materials[0])\n\
         prop = bpy.data.objects.new('Prop', mesh)\n\
         bpy.context.scene.collection.objects.link(prop)\n\
         bpy.ops.wm.save_as_mainfile(filepath={props:?})\n",
        pngs = [
            p("assets/tex/metal.png"),
            p("assets/tex/metal2.png"),
            p("shots/textures/wood.png"),
            p("shots/seq/frame_0001.png"),
            p("shots/seq/frame_0002.png"),
            p("shots/seq/frame_0003.png"),
            p("shots/udim/tex.1001.png"),
            p("shots/udim/tex.1002.png"),
            p("textures/stone.png"),
        ],
        wav = p("shots/sound/beep.wav"),
        notes = p("shots/seq/notes.txt"),
        base = p("assets/base/base.blend"),
        props = p("assets/props.blend"),
    );
    blender_python(None, &assets).expect("Blender makes the assets");
    let shot = proj.join("shots/shot.blend");
    // Saved first, so "//" paths are relative to the shot (and the absolute one stays so).
    let scene = format!(
        "import bpy\n\
         bpy.ops.wm.save_as_mainfile(filepath={shot:?})\n\
         scene = bpy.context.scene\n\
         mat = bpy.data.materials.new('Wood'); mat.use_nodes = True\n\
         def use(image):\n    \
             node = mat.node_tree.nodes.new('ShaderNodeTexImage'); node.image = image\n    \
             return node\n\
         use(bpy.data.images.load('//textures/wood.png'))\n\
         seq = bpy.data.images.load('//seq/frame_0001.png'); seq.source = 'SEQUENCE'\n\
         use(seq).image_user.frame_duration = 3\n\
         udim = bpy.data.images.load('//udim/tex.1001.png'); udim.source = 'TILED'\n\
         udim.filepath = '//udim/tex.<UDIM>.png'\n\
         udim.tiles.new(tile_number=1002)\n\
         use(udim)\n\
         use(bpy.data.images.load({stone:?}))\n\
         bpy.data.objects['Cube'].data.materials.append(mat)\n\
         speaker = bpy.data.speakers.new('Speaker')\n\
         speaker.sound = bpy.data.sounds.load('//sound/beep.wav')\n\
         scene.collection.objects.link(bpy.data.objects.new('Speaker', speaker))\n\
         with bpy.data.libraries.load({props:?}, link=True, relative=True) as (src, dst):\n    \
             dst.objects = ['Prop']\n\
         scene.collection.objects.link(dst.objects[0])\n\
         paths = bpy.utils.blend_paths(absolute=False, local=True)\n\
         assert {stone:?} in paths and '//../assets/props.blend' in paths, paths\n\
         bpy.context.preferences.filepaths.save_version = 0\n\
         bpy.ops.wm.save_as_mainfile(filepath={shot:?})\n",
        shot = utf8(&shot),
        stone = p("textures/stone.png"),
        props = p("assets/props.blend"),
    );
    blender_python(None, &scene).expect("Blender makes the shot");
    // Made after the shot: Blender adds every tile it finds on disk when an image becomes a
    // UDIM set, so this one is on disk but not among the image's tiles.
    std::fs::copy(
        proj.join("shots/udim/tex.1001.png"),
        proj.join("shots/udim/tex.1003.png"),
    )
    .unwrap();
    shot
}

fn paths(root: &Path, rels: &[&str]) -> Vec<PathBuf> {
    rels.iter().map(|rel| root.join(rel)).collect()
}

#[tokio::test]
async fn a_project_uploads_every_file_it_needs_and_the_copy_finds_them_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("proj");
    let shot = project(&proj);
    let original = std::fs::read(&shot).unwrap();
    let copies = dir.path().join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    let copy = copies.join("shot-copy.blend");

    let collected = collect(&blender(), &shot, &copy).await.unwrap();

    assert_eq!(collected.blend, shot);
    let expected = paths(
        &proj,
        &[
            "assets/base/base.blend",
            "assets/props.blend",
            "assets/tex/metal.png",
            "assets/tex/metal2.png",
            "shots/seq/frame_0001.png",
            "shots/seq/frame_0002.png",
            "shots/seq/frame_0003.png",
            "shots/sound/beep.wav",
            "shots/textures/wood.png",
            "shots/udim/tex.1001.png",
            "shots/udim/tex.1002.png",
            "textures/stone.png",
        ],
    );
    assert_eq!(collected.files, expected);
    assert!(collected.missing.is_empty(), "{:?}", collected.missing);
    assert!(collected.absolute.is_empty(), "{:?}", collected.absolute);
    assert_eq!(project_root(&collected), proj);
    // The original is untouched, with no backup beside it; the script is gone.
    assert_eq!(std::fs::read(&shot).unwrap(), original);
    assert!(!proj.join("shots/shot.blend1").exists());
    let left: Vec<_> = std::fs::read_dir(&copies).unwrap().collect();
    assert_eq!(left.len(), 1, "only the copy is left: {left:?}");

    // Lay the upload out somewhere else, and take the original project away.
    let list = upload_list(&collected, &copy);
    assert_eq!(list[0], (copy.clone(), "shots/shot.blend".to_owned()));
    assert_eq!(list.len(), expected.len() + 1);
    let peer = dir.path().join("peer/workspace");
    for (source, rel) in &list {
        let target = peer.join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(source, &target).unwrap();
    }
    std::fs::rename(&proj, dir.path().join("gone")).unwrap();

    // Every path the copy names resolves inside the new layout: images (each tile, each frame
    // Blender asks for), the sound, the libraries and what they use.
    let check = format!(
        "import bpy, glob, os\n\
         root = {root:?}\n\
         weak = set()\n\
         for prop in bpy.data.bl_rna.properties:\n    \
             for datablock in getattr(bpy.data, prop.identifier) if prop.type == 'COLLECTION' \
                 else ():\n        \
                 ref = getattr(datablock, 'library_weak_reference', None)\n        \
                 if ref is not None:\n            \
                     weak.add(os.path.normpath(bpy.path.abspath(ref.filepath)))\n\
         listed = [p for p in bpy.utils.blend_paths(absolute=True, packed=False, local=False) \
             if os.path.normpath(p) not in weak]\n\
         assert len(listed) == 9, listed\n\
         for path in listed:\n    \
             found = glob.glob(path.replace('<UDIM>', '[0-9]' * 4))\n    \
             assert found, 'not found: ' + path\n    \
             assert all(os.path.realpath(f).startswith(root + os.sep) for f in found), path\n\
         prop = bpy.data.objects['Prop']\n\
         assert prop.library is not None and len(prop.data.materials) == 2\n\
         base = bpy.data.images['basemetal']\n\
         assert base.library.name == 'base.blend', base.library\n\
         tex = bpy.data.images['tex.1001.png']\n\
         assert [t.number for t in tex.tiles] == [1001, 1002]\n\
         for image in bpy.data.images:\n    \
             if image.source in ('FILE', 'SEQUENCE'):\n        \
                 assert os.path.isfile(bpy.path.abspath(image.filepath, library=image.library)), \
                     image.name\n\
         print('RESOLVED', len(listed))\n",
        root = utf8(&peer.canonicalize().unwrap()),
    );
    let out = blender_python(Some(&peer.join("shots/shot.blend")), &check).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("RESOLVED"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn missing_files_are_named_as_the_scene_names_them() {
    // Gone too, and not missing: the file appended data came from (a weak reference, which
    // rendering never reads).
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().join("textures/here.png");
    let gone = dir.path().join("textures/gone.png");
    let no_frames = dir.path().join("seq/f_0001.png");
    let setup = format!(
        "{PNG_PY}\
         png({here:?})\n\
         mat = bpy.data.materials.new('M'); mat.use_nodes = True\n\
         for path, source in (({here:?}, 'FILE'), ({gone:?}, 'FILE'), ({seq:?}, 'SEQUENCE')):\n    \
             image = bpy.data.images.new(os.path.basename(path), 4, 4)\n    \
             image.source = source\n    \
             image.filepath = path\n    \
             mat.node_tree.nodes.new('ShaderNodeTexImage').image = image\n\
         mat.use_fake_user = True\n\
         source = {source:?}\n\
         bpy.data.libraries.write(source, {{mat}})\n\
         bpy.ops.wm.append(directory=source + '/Material/', filename='M', \
             do_reuse_local_id=True)\n\
         os.remove(source)\n",
        source = utf8(&dir.path().join("appended-from.blend")),
        here = utf8(&here),
        gone = utf8(&gone),
        seq = utf8(&no_frames),
    );
    let scene = blender_scene(dir.path(), "missing", &setup).unwrap();
    let copy = dir.path().join("copy.blend");
    let collected = collect(&blender(), &scene, &copy).await.unwrap();
    assert_eq!(collected.missing, vec![no_frames, gone]);
    assert_eq!(collected.files, vec![here]);
    assert!(copy.exists());
}

#[tokio::test]
async fn a_damaged_blend_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let scene = dir.path().join("damaged.blend");
    // A .blend header followed by nothing Blender can read.
    let mut bytes = b"BLENDER-v304".to_vec();
    bytes.extend((0..4000u32).map(|i| (i * 7919 % 251) as u8));
    std::fs::write(&scene, bytes).unwrap();
    let copy = dir.path().join("copy.blend");
    let err = collect(&blender(), &scene, &copy).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, CollectError::NoAnswer { scene: named, .. } if named == &scene),
        "{err:?}"
    );
    assert!(text.contains(utf8(&scene)), "{text}");
    assert!(!copy.exists());
}

#[tokio::test]
async fn the_scenes_render_settings_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cycles = blender_scene(
        dir.path(),
        "cycles",
        "scene.frame_start = 3\n\
         scene.frame_end = 7\n\
         scene.frame_step = 2\n\
         scene.cycles.samples = 12\n\
         scene.cycles.use_denoising = True\n\
         scene.render.filepath = '//renders/shot_'\n\
         scene.render.image_settings.file_format = 'OPEN_EXR'",
    )
    .unwrap();
    let collected = collect(&blender(), &cycles, &dir.path().join("c1.blend"))
        .await
        .unwrap();
    let info = collected.scene;
    assert_eq!(info.name, "Scene");
    assert_eq!(info.engine, "CYCLES");
    assert_eq!(
        (info.frame_start, info.frame_end, info.frame_step),
        (3, 7, 2)
    );
    assert_eq!(info.samples, Some(12));
    assert!(info.denoise);
    assert_eq!(info.output, dir.path().join("renders/shot_"));
    assert_eq!(info.file_format, "OPEN_EXR");
    assert!(!info.is_movie);
    assert!(info.camera);
    let version: Vec<_> = info.blender.split('.').collect();
    assert!(
        version.len() == 3 && version.iter().all(|n| n.parse::<u32>().is_ok()),
        "{}",
        info.blender
    );

    // Denoising on for the scene but off for its only view layer: no denoising. EEVEE: no
    // samples to split. No camera, and an absolute output kept as it is.
    let eevee = blender_scene(
        dir.path(),
        "eevee",
        "scene.cycles.use_denoising = True\n\
         scene.view_layers[0].cycles.use_denoising = False\n\
         scene.render.engine = 'BLENDER_EEVEE_NEXT' if (4, 2) <= bpy.app.version < (5, 0) \
             else 'BLENDER_EEVEE'\n\
         scene.camera = None\n\
         scene.render.filepath = '/renders/out_####'\n\
         scene.render.image_settings.file_format = 'PNG'",
    )
    .unwrap();
    let info = collect(&blender(), &eevee, &dir.path().join("c2.blend"))
        .await
        .unwrap()
        .scene;
    assert!(info.engine.starts_with("BLENDER_EEVEE"), "{}", info.engine);
    assert_eq!(info.samples, None);
    assert!(!info.denoise);
    assert!(!info.camera);
    assert_eq!(info.output, Path::new("/renders/out_####"));
}

#[tokio::test]
async fn baked_caches_are_collected_and_unbaked_ones_are_not_missing() {
    let dir = tempfile::tempdir().unwrap();
    let scene = dir.path().join("sim.blend");
    // Cloth (unnamed cache: files named after the object in hex) and particles (named cache)
    // baked to disk, a baked fluid domain, and an ocean that was never baked.
    let setup = format!(
        "import bpy\n\
         bpy.ops.wm.save_as_mainfile(filepath={scene:?})\n\
         scene = bpy.context.scene\n\
         scene.frame_end = 3\n\
         cube = bpy.data.objects['Cube']\n\
         cloth = cube.modifiers.new('Cloth', 'CLOTH')\n\
         cloth.point_cache.use_disk_cache = True\n\
         cloth.point_cache.frame_end = 2\n\
         bpy.ops.mesh.primitive_plane_add()\n\
         emitter = bpy.context.object\n\
         emitter.modifiers.new('Particles', 'PARTICLE_SYSTEM')\n\
         system = emitter.particle_systems[0]\n\
         system.settings.count = 10\n\
         system.point_cache.use_disk_cache = True\n\
         system.point_cache.name = 'sparks'\n\
         system.point_cache.frame_end = 2\n\
         bpy.ops.mesh.primitive_cube_add(location=(5, 0, 0))\n\
         domain = bpy.context.object.modifiers.new('Fluid', 'FLUID')\n\
         domain.fluid_type = 'DOMAIN'\n\
         domain.domain_settings.resolution_max = 6\n\
         domain.domain_settings.cache_frame_end = 2\n\
         domain.domain_settings.cache_directory = '//fluid'\n\
         bpy.ops.mesh.primitive_plane_add(location=(-5, 0, 0))\n\
         bpy.context.object.modifiers.new('Ocean', 'OCEAN')\n\
         bpy.ops.ptcache.bake_all(bake=True)\n\
         bpy.context.preferences.filepaths.save_version = 0\n\
         bpy.ops.wm.save_as_mainfile(filepath={scene:?})\n",
        scene = utf8(&scene),
    );
    blender_python(None, &setup).unwrap();
    // Another scene's cache beside ours is not ours.
    std::fs::write(
        dir.path().join("blendcache_sim/4F74686572_000001_00.bphys"),
        b"",
    )
    .unwrap();
    let collected = collect(&blender(), &scene, &dir.path().join("copy.blend"))
        .await
        .unwrap();
    assert!(collected.missing.is_empty(), "{:?}", collected.missing);
    // Every file of our caches ("Cube" is 43756265 in hex), and not the other scene's.
    let caches = dir.path().join("blendcache_sim");
    let mut ours: Vec<PathBuf> = std::fs::read_dir(&caches)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|f| !f.ends_with("4F74686572_000001_00.bphys"))
        .collect();
    ours.sort();
    assert!(
        ours.contains(&caches.join("43756265_000001_00.bphys")),
        "{ours:?}"
    );
    assert!(
        ours.contains(&caches.join("sparks_000001_00.bphys")),
        "{ours:?}"
    );
    let point: Vec<_> = collected
        .files
        .iter()
        .filter(|f| f.starts_with(&caches))
        .cloned()
        .collect();
    assert_eq!(point, ours);
    let fluid: BTreeSet<_> = collected
        .files
        .iter()
        .filter(|f| !f.starts_with(&caches))
        .collect();
    assert!(
        fluid
            .iter()
            .all(|f| f.starts_with(dir.path().join("fluid"))),
        "{fluid:?}"
    );
    assert!(
        fluid
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "vdb")),
        "the fluid bake's data is collected: {fluid:?}"
    );
}

/// Geometry-node bakes exist from Blender 4.1: checked with the `bpy` wheel's Blender.
#[tokio::test]
async fn geometry_node_bakes_are_collected() {
    let Some(bpy) = bpy_blender() else {
        eprintln!("SKIPPED: BLENDNET_BPY_PYTHON is not set (.ci/run sets it up)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let scene = dir.path().join("nodes.blend");
    let setup = format!(
        "import bpy\n\
         bpy.ops.wm.save_as_mainfile(filepath={scene:?})\n\
         ob = bpy.data.objects['Cube']\n\
         mod = ob.modifiers.new('GN', 'NODES')\n\
         tree = bpy.data.node_groups.new('G', 'GeometryNodeTree')\n\
         tree.interface.new_socket('Geometry', in_out='INPUT', socket_type='NodeSocketGeometry')\n\
         tree.interface.new_socket('Geometry', in_out='OUTPUT', socket_type='NodeSocketGeometry')\n\
         into, out = tree.nodes.new('NodeGroupInput'), tree.nodes.new('NodeGroupOutput')\n\
         bake = tree.nodes.new('GeometryNodeBake')\n\
         tree.links.new(into.outputs[0], bake.inputs[0])\n\
         tree.links.new(bake.outputs[0], out.inputs[0])\n\
         mod.node_group = tree\n\
         bpy.context.view_layer.objects.active = ob\n\
         bpy.context.evaluated_depsgraph_get()\n\
         mod.bakes[0].bake_mode = 'STILL'\n\
         if hasattr(mod, 'bake_target'):\n    mod.bake_target = 'DISK'\n\
         assert 'FINISHED' in bpy.ops.object.geometry_node_bake_single(\
             session_uid=ob.session_uid, modifier_name='GN', bake_id=mod.bakes[0].bake_id)\n\
         bpy.ops.wm.save_as_mainfile(filepath={scene:?})\n",
        scene = utf8(&scene),
    );
    let out = run_bounded(
        Command::new(&bpy).args(["-b", "--python-expr", &setup]),
        blendnet_tests::BLENDER_RUN_TIMEOUT,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let collected = collect(&bpy, &scene, &dir.path().join("copy.blend"))
        .await
        .unwrap();
    assert!(collected.missing.is_empty(), "{:?}", collected.missing);
    let bakes = dir.path().join("blendcache_nodes");
    assert!(!collected.files.is_empty());
    assert!(
        collected.files.iter().all(|f| f.starts_with(&bakes)),
        "{:?}",
        collected.files
    );
    assert!(
        collected
            .files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "json")),
        "{:?}",
        collected.files
    );
}
