//! `blendnet render SCENE.blend` end to end: real daemons on loopback, real Blender. The scene's
//! files are collected by Blender, uploaded with their layout, rendered across the mesh, and the
//! finished frames land where asked, equal to what `blender -b` writes locally.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use blendnet_tests::{
    Node, blender, e2e, eventually, local_render, make_scene, mesh, pixel_difference,
};
use serde_json::Value;

/// A small job finishes well within this on a loaded 2-core machine.
const JOB_WITHIN: Duration = Duration::from_secs(180);

fn three_peers() -> Result<Vec<Node>> {
    let blender = blender();
    mesh(
        &["a", "b", "c"],
        &["--blender", blender.to_str().context("path")?],
    )
}

/// `blendnet render ... --wait --json` on `node`: the JSON lines it printed, the last one
/// being the outcome.
fn render_wait(node: &Node, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["render"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--wait", "--json"]);
    let out = node.cli_ok_within(&all, JOB_WITHIN)?;
    out.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

/// `blendnet render SCENE --frames 1 --split samples --out OUT` on `node`, without waiting;
/// returns the job id.
fn render_sliced_still(node: &Node, scene: &Path, out: &Path) -> Result<String> {
    let job = node.cli_ok_within(
        &[
            "render",
            scene.to_str().context("UTF-8")?,
            "--frames",
            "1",
            "--split",
            "samples",
            "--out",
            out.to_str().context("UTF-8")?,
        ],
        JOB_WITHIN,
    )?;
    Ok(job.trim().to_owned())
}

/// Peers that rendered the job's tasks that count, as the submitter's view says.
fn renderers(node: &Node, job: &str) -> Result<std::collections::BTreeSet<String>> {
    let view = node.cli_json(&["status", job, "--json"])?;
    Ok(view["tasks"]
        .as_array()
        .context("tasks")?
        .iter()
        .filter(|t| t["task"]["kind"] == "render" && t["in_cover"] == true)
        .filter_map(|t| t["results"][0][0].as_str().map(str::to_owned))
        .collect())
}

#[test]
fn an_animation_split_by_frames_across_three_peers_is_every_frame_of_a_local_render() {
    e2e(|| {
        let nodes = three_peers()?;
        let a = &nodes[0];
        let project = a.data_dir().with_file_name("anim");
        let scene = project.join("shot.blend");
        make_scene(
            &scene,
            // A second or so a frame: every peer asks for work before the frames run out.
            "scene.frame_start = 1\n\
             scene.frame_end = 6\n\
             scene.cycles.samples = 128\n\
             scene.render.resolution_x = 128\n\
             scene.render.resolution_y = 96\n\
             cube = bpy.data.objects['Cube']\n\
             cube.location.x = -1.5\n\
             cube.keyframe_insert('location', frame=1)\n\
             cube.location.x = 1.5\n\
             cube.keyframe_insert('location', frame=6)",
        )?;
        let out = a.data_dir().with_file_name("anim-out");
        let lines = render_wait(
            a,
            &[
                scene.to_str().context("UTF-8")?,
                "--split",
                "frames",
                "--out",
                out.to_str().context("UTF-8")?,
            ],
        )?;
        let last = lines.last().context("no output")?;
        assert_eq!(last["state"], "done", "{last}");
        assert_eq!(last["error"], Value::Null);
        let job = last["job"].as_str().context("job")?.to_owned();
        let outputs: Vec<String> = last["outputs"]
            .as_array()
            .context("outputs")?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let expected: Vec<String> = (1..=6)
            .map(|f| out.join(format!("shot_{f:04}.png")).display().to_string())
            .collect();
        assert_eq!(outputs, expected);
        // Progress lines came before the outcome.
        assert!(
            lines[..lines.len() - 1]
                .iter()
                .all(|l| l["state"] == "active")
        );
        assert!(renderers(a, &job)?.len() >= 2, "rendered on one peer only");

        let local_dir = project.join("local");
        fs::create_dir_all(&local_dir)?;
        let local = local_render(&scene, &local_dir, "1..6")?;
        assert_eq!(local.len(), 6);
        for (mesh_frame, local_frame) in outputs.iter().zip(&local) {
            assert_eq!(
                pixel_difference(Path::new(mesh_frame), local_frame),
                (0.0, 0),
                "{mesh_frame}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_scene_with_textures_in_subfolders_and_a_sibling_library_renders_as_locally() {
    e2e(|| {
        let nodes = three_peers()?;
        let a = &nodes[0];
        let project = a.data_dir().with_file_name("project");
        // A library in a sibling folder, holding an object with a textured material.
        let library = project.join("assets").join("props.blend");
        fs::create_dir_all(project.join("assets/tex"))?;
        fs::create_dir_all(project.join("shots/textures"))?;
        make_scene(
            &library,
            &format!(
                "img = bpy.data.images.new('metal', 8, 8)\n\
                 img.pixels = [0.9, 0.2, 0.1, 1.0] * 64\n\
                 img.filepath_raw = {metal:?}\n\
                 img.file_format = 'PNG'\n\
                 img.save()\n\
                 mat = bpy.data.materials.new('Metal')\n\
                 mat.use_nodes = True\n\
                 node = mat.node_tree.nodes.new('ShaderNodeTexImage')\n\
                 node.image = img\n\
                 bsdf = mat.node_tree.nodes['Principled BSDF']\n\
                 mat.node_tree.links.new(node.outputs['Color'], bsdf.inputs['Base Color'])\n\
                 bpy.data.objects['Cube'].data.materials.append(mat)\n\
                 bpy.data.objects['Cube'].name = 'Prop'\n\
                 bpy.ops.file.make_paths_relative()",
                metal = project
                    .join("assets/tex/metal.png")
                    .to_str()
                    .context("UTF-8")?,
            ),
        )?;
        // The shot: its own texture in a subfolder, and the library's object linked in.
        let scene = project.join("shots").join("shot.blend");
        make_scene(
            &scene,
            &format!(
                "img = bpy.data.images.new('wood', 8, 8)\n\
                 img.pixels = [0.2, 0.6, 0.1, 1.0] * 64\n\
                 img.filepath_raw = {wood:?}\n\
                 img.file_format = 'PNG'\n\
                 img.save()\n\
                 world = scene.world\n\
                 world.use_nodes = True\n\
                 env = world.node_tree.nodes.new('ShaderNodeTexEnvironment')\n\
                 env.image = img\n\
                 world.node_tree.links.new(env.outputs['Color'], world.node_tree.nodes['Background'].inputs['Color'])\n\
                 bpy.data.objects.remove(bpy.data.objects['Cube'])\n\
                 with bpy.data.libraries.load({lib:?}, link=True) as (src, dst):\n\
                 \x20   dst.objects = ['Prop']\n\
                 for obj in dst.objects:\n\
                 \x20   scene.collection.objects.link(obj)\n\
                 bpy.ops.file.make_paths_relative()",
                wood = project
                    .join("shots/textures/wood.png")
                    .to_str()
                    .context("UTF-8")?,
                lib = library.to_str().context("UTF-8")?,
            ),
        )?;
        let out = a.data_dir().with_file_name("project-out");
        let lines = render_wait(
            a,
            &[
                scene.to_str().context("UTF-8")?,
                "--frames",
                "1",
                "--samples",
                "16",
                "--out",
                out.to_str().context("UTF-8")?,
            ],
        )?;
        let last = lines.last().context("no output")?;
        assert_eq!(last["state"], "done", "{last}");
        let frame = out.join("shot_0001.png");
        assert_eq!(last["outputs"], serde_json::json!([frame.to_str()]));
        let local_dir = project.join("local");
        fs::create_dir_all(&local_dir)?;
        let local = local_render(&scene, &local_dir, "1")?;
        let (worst, differing) = pixel_difference(&frame, &local[0]);
        // Sliced: equal up to float summation order (see render.rs).
        assert!(worst <= 1.0 + 1e-6, "{worst}/255");
        assert!(differing <= 64 * 48 * 4 / 1000, "{differing} values differ");
        // The textures really were used: without them the frame is not this one.
        let bare_dir = project.join("bare");
        fs::create_dir_all(&bare_dir)?;
        fs::rename(
            project.join("shots/textures"),
            project.join("shots/textures-away"),
        )?;
        fs::rename(project.join("assets/tex"), project.join("assets/tex-away"))?;
        let bare = local_render(&scene, &bare_dir, "1")?;
        assert_ne!(pixel_difference(&frame, &bare[0]).1, 0);

        // With a texture missing, nothing is submitted and the path is named.
        let before = a.cli_json(&["jobs", "--json"])?;
        let err = a.cli_err(&["render", scene.to_str().context("UTF-8")?, "--wait"])?;
        let missing = project.join("shots/textures/wood.png");
        assert!(
            err.contains("missing") && err.contains(missing.to_str().context("UTF-8")?),
            "{err}"
        );
        assert_eq!(
            a.cli_json(&["jobs", "--json"])?,
            before,
            "a job was submitted"
        );
        Ok(())
    });
}

#[test]
fn a_submitter_killed_right_after_submitting_gets_its_frames_when_it_restarts() {
    e2e(|| {
        let mut nodes = three_peers()?;
        let project = nodes[0].data_dir().with_file_name("killed");
        let scene = project.join("shot.blend");
        // Long enough (a few seconds of slices) that the submitter dies mid-job; at most 256
        // samples, where 3.4's default sampling pattern slices exactly.
        make_scene(
            &scene,
            "scene.cycles.samples = 256\n\
             scene.render.resolution_x = 160\n\
             scene.render.resolution_y = 120",
        )?;
        let out = nodes[0].data_dir().with_file_name("killed-out");
        let job = render_sliced_still(&nodes[0], &scene, &out)?;
        // Right after submitting, the submitter (the job's coordinator too) dies. Submitting
        // answered once a second peer held the scene.
        nodes[0].kill()?;
        // The job belongs to the mesh: the others finish it.
        eventually(JOB_WITHIN, Duration::from_millis(500), || {
            let view = nodes[1].cli_json(&["status", &job, "--json"])?;
            ensure!(view["summary"]["status"] == "Done", "{}", view["summary"]);
            Ok(())
        })?;
        // The submitter comes back and delivers the frame it was asked for.
        nodes[0].start_again()?;
        let frame = out.join("shot_0001.png");
        eventually(JOB_WITHIN, Duration::from_millis(500), || {
            ensure!(frame.exists(), "{} not there yet", frame.display());
            Ok(())
        })?;
        let local_dir = project.join("local");
        fs::create_dir_all(&local_dir)?;
        let local = local_render(&scene, &local_dir, "1")?;
        let (worst, _) = pixel_difference(&frame, &local[0]);
        assert!(worst <= 1.0 + 1e-6, "{worst}/255");

        // Any peer can fetch the frames of a job submitted elsewhere.
        let fetched = nodes[2].data_dir().with_file_name("fetched");
        let view = nodes[2].cli_json(&[
            "fetch",
            &job,
            "--out",
            fetched.to_str().context("UTF-8")?,
            "--json",
        ])?;
        assert_eq!(view["complete"], true);
        let copy = fetched.join("shot_0001.png");
        assert_eq!(view["files"], serde_json::json!([copy.to_str()]));
        // The same pixels. Not always the same bytes: if the submitter died between merging
        // and announcing it, the frame was merged again elsewhere, and Blender stamps the
        // merger's scene path in the PNG.
        assert_eq!(pixel_difference(&copy, &frame), (0.0, 0));
        Ok(())
    });
}

#[test]
fn the_demo_renders_a_frame_across_two_throwaway_nodes_like_a_local_render() {
    e2e(|| {
        let node = Node::new("demo")?;
        let blender = blender();
        let out = node.cli_ok_within(
            &[
                "demo",
                "--blender",
                blender.to_str().context("UTF-8")?,
                "--samples",
                "64",
            ],
            JOB_WITHIN,
        )?;
        let value = |prefix: &str| -> Result<String> {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim().to_owned())
                .with_context(|| format!("no line {prefix:?} in:\n{out}"))
        };
        let frame = PathBuf::from(value("rendered across 2 nodes:")?);
        let local = PathBuf::from(value("rendered locally:")?);
        assert!(frame.exists() && local.exists(), "{out}");
        // 64 samples: 3.4's default pattern slices exactly, so at most a rounding step.
        let (worst, _) = pixel_difference(&frame, &local);
        assert!(worst <= 1.0 + 1e-6, "{worst}/255");
        assert!(value("difference: at most")?.starts_with(&format!("{}/255", worst.round())));
        // The demo's nodes are gone; its folder stays for the user.
        let folder = frame
            .ancestors()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("blendnet-demo-"))
            })
            .context("the frame is not in the demo folder")?
            .to_path_buf();
        for node in ["node-a", "node-b"] {
            let addr = folder.join(node).join("api.addr");
            eventually(Duration::from_secs(10), Duration::from_millis(200), || {
                ensure!(!addr.exists(), "{} still runs", node);
                Ok(())
            })?;
        }
        fs::remove_dir_all(&folder)?;
        Ok(())
    });
}

/// The pids of Blender processes working on `job` for `node` (their command line names the
/// node's workspace for the job).
fn blenders_of(node: &Node, job: &str) -> Result<Vec<u32>> {
    let pattern = node.data_dir().join("work").join(job);
    let out = Command::new("pgrep")
        .args(["-f", pattern.to_str().context("UTF-8")?])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid: &u32| {
            // A zombie about to be reaped is gone.
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        })
        .collect())
}

#[test]
fn cancelling_stops_every_blender_of_the_job_on_every_peer_within_seconds() {
    e2e(|| {
        let nodes = three_peers()?;
        let a = &nodes[0];
        let project = a.data_dir().with_file_name("endless");
        let scene = project.join("shot.blend");
        make_scene(&scene, "")?;
        // Far too many samples to finish: three frames, one on each peer, must be stopped.
        let job = a
            .cli_ok_within(
                &[
                    "render",
                    scene.to_str().context("UTF-8")?,
                    "--frames",
                    "1-3",
                    "--samples",
                    "1000000",
                    "--split",
                    "frames",
                ],
                JOB_WITHIN,
            )?
            .trim()
            .to_owned();
        eventually(JOB_WITHIN, Duration::from_millis(200), || {
            for node in &nodes {
                ensure!(
                    !blenders_of(node, &job)?.is_empty(),
                    "no Blender renders on {} yet",
                    node.name()
                );
            }
            Ok(())
        })?;
        let cancelled = std::time::Instant::now();
        a.cli_ok(&["cancel", &job])?;
        eventually(Duration::from_secs(5), Duration::from_millis(50), || {
            for node in &nodes {
                let left = blenders_of(node, &job)?;
                ensure!(
                    left.is_empty(),
                    "Blender {left:?} still runs on {}",
                    node.name()
                );
            }
            Ok(())
        })?;
        eprintln!(
            "every Blender stopped {:?} after the cancel",
            cancelled.elapsed()
        );
        for node in &nodes {
            let view = node.cli_json(&["status", &job, "--json"])?;
            assert_eq!(view["summary"]["status"], "Cancelled", "{}", node.name());
        }
        Ok(())
    });
}

/// An EXR's text attributes, and its channels' values, by name.
type Exr = (BTreeMap<String, String>, BTreeMap<String, Vec<f32>>);

/// A multilayer EXR's text attributes and its channels, by name.
fn read_exr(path: &Path) -> Result<Exr> {
    let image = exr::prelude::read_all_flat_layers_from_file(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut text = BTreeMap::new();
    let mut channels = BTreeMap::new();
    for layer in &image.layer_data {
        for (name, value) in image.attributes.other.iter().chain(&layer.attributes.other) {
            if let exr::meta::attribute::AttributeValue::Text(t) = value {
                text.insert(name.to_string(), t.to_string());
            }
        }
        let prefix = layer
            .attributes
            .layer_name
            .as_ref()
            .map(|n| format!("{n}."))
            .unwrap_or_default();
        for channel in &layer.channel_data.list {
            channels.insert(
                format!("{prefix}{}", channel.name),
                channel.sample_data.values_as_f32().collect(),
            );
        }
    }
    Ok((text, channels))
}

#[test]
fn a_worker_killed_mid_slice_loses_nothing_and_the_exr_equals_a_local_render() {
    e2e(|| {
        let mut nodes = three_peers()?;
        let project = nodes[0].data_dir().with_file_name("exr");
        let scene = project.join("shot.blend");
        // 256 samples: 3.4's default sampling pattern slices exactly there.
        make_scene(
            &scene,
            "scene.cycles.samples = 256\n\
             scene.render.resolution_x = 160\n\
             scene.render.resolution_y = 120\n\
             scene.render.image_settings.file_format = 'OPEN_EXR_MULTILAYER'\n\
             scene.render.image_settings.color_depth = '32'\n\
             scene.render.image_settings.exr_codec = 'ZIP'",
        )?;
        let out = nodes[0].data_dir().with_file_name("exr-out");
        let job = render_sliced_still(&nodes[0], &scene, &out)?;
        // A peer other than the submitter renders a slice: kill -9 it then.
        let victim = eventually(JOB_WITHIN, Duration::from_millis(50), || {
            for (i, node) in nodes.iter().enumerate().skip(1) {
                if !blenders_of(node, &job)?.is_empty() {
                    let view = nodes[0].cli_json(&["status", &job, "--json"])?;
                    let id = node.peer_id()?;
                    let leased = view["tasks"].as_array().into_iter().flatten().any(|t| {
                        t["task"]["kind"] == "render"
                            && t["state"]["Leased"]["worker"].as_str() == Some(id.as_str())
                    });
                    if leased {
                        return Ok(i);
                    }
                }
            }
            anyhow::bail!("no other peer renders a slice yet")
        })?;
        nodes[victim].kill()?;
        let frame = out.join("shot_0001.exr");
        eventually(JOB_WITHIN, Duration::from_millis(500), || {
            ensure!(frame.exists(), "{} not there yet", frame.display());
            Ok(())
        })?;
        // Nothing lost, nothing counted twice: the merged frame has the frame's samples.
        let (text, mesh) = read_exr(&frame)?;
        assert_eq!(
            text.get("cycles.ViewLayer.samples").map(String::as_str),
            Some("256"),
            "{text:?}"
        );
        // And the same pixels as `blender -b`, within 1e-5.
        let local_dir = project.join("local");
        fs::create_dir_all(&local_dir)?;
        let (_, local) = read_exr(&local_render(&scene, &local_dir, "1")?[0])?;
        assert_eq!(
            mesh.keys().collect::<Vec<_>>(),
            local.keys().collect::<Vec<_>>()
        );
        for (name, values) in &local {
            let worst = values
                .iter()
                .zip(&mesh[name])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{name}: {worst}");
        }
        Ok(())
    });
}
