//! Bad inputs give errors that name the file and what is wrong with it, and a merge killed while
//! it writes leaves nothing at the output path. Inputs are real renders by Blender, broken on
//! purpose, and for the kill test small synthetic EXRs.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use blendnet_exr::{InputError, MergeError, MergeOptions, merge};
use blendnet_tests::{blender_python, blender_scene};
use exr::prelude::*;

/// Renders `(width, height, file format)` frames of one small scene in one Blender process.
fn render(dir: &Path, frames: &[(u32, u32, &str, &str)]) -> Result<Vec<PathBuf>> {
    let scene = blender_scene(
        dir,
        "errors",
        "scene.render.image_settings.file_format = 'OPEN_EXR_MULTILAYER'\n\
         scene.render.image_settings.color_depth = '32'",
    )?;
    let mut script = String::from("import bpy\nscene = bpy.context.scene\n");
    let mut paths = Vec::new();
    for (width, height, format, name) in frames {
        let path = dir.join(name);
        script.push_str(&format!(
            "scene.render.resolution_x = {width}\nscene.render.resolution_y = {height}\n\
             scene.render.image_settings.file_format = '{format}'\n\
             scene.render.filepath = {:?}\nbpy.ops.render.render(write_still=True)\n",
            path.to_str().context("path is not UTF-8")?
        ));
        paths.push(path);
    }
    blender_python(Some(&scene), &script).context("rendering")?;
    ensure!(
        paths.iter().all(|p| p.exists()),
        "rendering: Blender wrote no file"
    );
    Ok(paths)
}

/// Replaces `from` with `to` (same length) in a copy of `source`.
fn patched(source: &Path, target: &Path, from: &str, to: &str) -> Result<PathBuf> {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(source)?;
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .with_context(|| format!("{from} is not in {}", source.display()))?;
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(target, bytes)?;
    Ok(target.to_path_buf())
}

/// A copy of the first `len` bytes of `source`.
fn cut(source: &Path, target: &Path, len: usize) -> Result<PathBuf> {
    let bytes = std::fs::read(source)?;
    std::fs::write(target, &bytes[..len])?;
    Ok(target.to_path_buf())
}

/// Whether an error is of the expected kind.
type IsKind = fn(&MergeError) -> bool;

#[test]
fn bad_inputs_are_refused_with_errors_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let renders = render(
        d,
        &[
            (32, 24, "OPEN_EXR_MULTILAYER", "good.exr"),
            (48, 36, "OPEN_EXR_MULTILAYER", "larger.exr"),
            (32, 24, "OPEN_EXR", "plain.exr"),
        ],
    )?;
    let (good, larger, plain) = (&renders[0], &renders[1], &renders[2]);
    let good_len = std::fs::metadata(good)?.len() as usize;
    let no_samples = patched(
        good,
        &d.join("no-samples.exr"),
        "cycles.ViewLayer.samples",
        "cycles.ViewLayer.sampleZ",
    )?;
    let bad_samples = {
        // The attribute's value is the text "8": make it "x".
        let mut bytes = std::fs::read(good)?;
        let name = b"cycles.ViewLayer.samples\0string\0";
        let at = bytes
            .windows(name.len())
            .position(|w| w == name)
            .context("no samples")?;
        let value = at + name.len() + 4;
        ensure!(&bytes[value..value + 1] == b"8", "unexpected samples");
        bytes[value] = b'x';
        let path = d.join("bad-samples.exr");
        std::fs::write(&path, bytes)?;
        path
    };
    let truncated = cut(good, &d.join("truncated.exr"), good_len * 2 / 3)?;
    let header_only = cut(good, &d.join("header-only.exr"), 200)?;
    let text = d.join("notes.exr");
    std::fs::write(&text, "these are not pixels\n")?;
    let empty = d.join("empty.exr");
    std::fs::write(&empty, "")?;
    let missing = d.join("missing.exr");

    let out = d.join("out.exr");
    let cases: Vec<(&Path, &str, IsKind)> = vec![
        (larger, "48×36 but", |e| {
            matches!(e, MergeError::SizeMismatch { .. })
        }),
        (
            &no_samples,
            "has no samples metadata (cycles.ViewLayer.samples) for render layer ViewLayer",
            |e| matches!(e, MergeError::Input(InputError::MissingSamples { .. })),
        ),
        (&bad_samples, "cycles.ViewLayer.samples is \"x\"", |e| {
            matches!(e, MergeError::Input(InputError::BadSamples { .. }))
        }),
        (&truncated, "is truncated", |e| {
            matches!(e, MergeError::Input(InputError::Truncated { .. }))
        }),
        (&header_only, "is truncated", |e| {
            matches!(e, MergeError::Input(InputError::Truncated { .. }))
        }),
        (plain, "is not a multilayer EXR", |e| {
            matches!(e, MergeError::Input(InputError::NotMultilayer { .. }))
        }),
        (&text, "is not an OpenEXR file: it looks like text", |e| {
            matches!(e, MergeError::Input(InputError::NotExr { .. }))
        }),
        (&empty, "is not an OpenEXR file: it is empty", |e| {
            matches!(e, MergeError::Input(InputError::NotExr { .. }))
        }),
        (&missing, "cannot read", |e| {
            matches!(e, MergeError::Input(InputError::Read { .. }))
        }),
    ];
    for (bad, says, kind) in cases {
        for inputs in [[good.as_path(), bad], [bad, good.as_path()]] {
            let err = merge(inputs, &out, &MergeOptions::default())
                .err()
                .with_context(|| format!("{} was accepted", bad.display()))?;
            let message = err.to_string();
            eprintln!("{message}");
            assert!(kind(&err), "{}: unexpected error {err:?}", bad.display());
            assert!(
                message.contains(bad.to_str().context("UTF-8")?),
                "{message}"
            );
            if bad != larger || inputs[0] == good.as_path() {
                assert!(message.contains(says), "{message}");
            }
            assert!(!out.exists(), "no output after an error");
        }
    }
    // The good file alone merges, and a PNG (here, a preview) is no EXR either.
    let png = d.join("preview.png");
    merge(
        [good],
        &out,
        &MergeOptions {
            preview: Some(blendnet_exr::PreviewOptions::new(&png)),
            ..Default::default()
        },
    )?;
    let err = merge(
        [good.as_path(), &png],
        d.join("x.exr"),
        &MergeOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("it is a PNG image"), "{err}");
    Ok(())
}

/// Set in the child process of [`killing_a_merge_while_it_writes_leaves_no_output`]: the paths
/// to merge, the output last, separated by newlines.
const CHILD_ENV: &str = "BLENDNET_EXR_TEST_KILL_CHILD";

/// How long the child's merge dwells on each block, so that it is still writing when killed.
const CHILD_BLOCK_DELAY: Duration = Duration::from_millis(10);

/// A small multilayer EXR with 1-line blocks (so a merge has many steps) and samples metadata.
fn synthetic(path: &Path, seed: usize) -> Result<()> {
    let (width, height) = (64, 300);
    let channels: Vec<AnyChannel<FlatSamples>> = ["R", "G", "B", "A"]
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let values = (0..width * height)
                .map(|i| ((i * 7 + c * 13 + seed * 31) % 1000) as f32 / 997.0)
                .collect();
            AnyChannel::new(
                format!("ViewLayer.Combined.{name}").as_str(),
                FlatSamples::F32(values),
            )
        })
        .collect();
    let mut attributes = LayerAttributes::default();
    attributes.other.insert(
        Text::from("cycles.ViewLayer.samples"),
        exr::meta::attribute::AttributeValue::Text(Text::from("4")),
    );
    let layer = Layer::new(
        (width, height),
        attributes,
        Encoding::UNCOMPRESSED,
        AnyChannels::sort(channels.into()),
    );
    Image::from_layer(layer).write().to_file(path)?;
    Ok(())
}

#[test]
fn killing_a_merge_while_it_writes_leaves_no_output() -> Result<()> {
    if let Ok(paths) = std::env::var(CHILD_ENV) {
        // The child: merge slowly until killed.
        let paths: Vec<&str> = paths.lines().collect();
        let (output, inputs) = paths.split_last().context("no paths")?;
        let options = MergeOptions {
            progress: Some(Arc::new(|_| {
                std::thread::sleep(CHILD_BLOCK_DELAY);
                ControlFlow::Continue(())
            })),
            threads: 1,
            ..Default::default()
        };
        merge(inputs, output, &options)?;
        return Ok(());
    }

    let dir = tempfile::tempdir()?;
    let inputs = [dir.path().join("a.exr"), dir.path().join("b.exr")];
    for (seed, path) in inputs.iter().enumerate() {
        synthetic(path, seed)?;
    }
    let me = std::env::current_exe()?;
    let run_child = |output: &Path| -> Result<std::process::Child> {
        let mut paths: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        paths.push(output.display().to_string());
        Ok(Command::new(&me)
            .args([
                "--exact",
                "killing_a_merge_while_it_writes_leaves_no_output",
                "--nocapture",
            ])
            .env(CHILD_ENV, paths.join("\n"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?)
    };
    let temporaries = |dir: &Path| -> Result<usize> {
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count())
    };

    // Killed at different points of the write: no output appears.
    for (round, extra_delay) in [0u64, 150, 700].into_iter().enumerate() {
        let out_dir = dir.path().join(format!("round{round}"));
        std::fs::create_dir(&out_dir)?;
        let output = out_dir.join("merged.exr");
        let mut child = run_child(&output)?;
        let started = Instant::now();
        while temporaries(&out_dir)? == 0 {
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the child never started writing"
            );
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the child exited ({status}) before writing");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(extra_delay));
        child.kill()?;
        child.wait()?;
        assert!(
            !output.exists(),
            "round {round}: a killed merge left {}",
            output.display()
        );
        assert_eq!(
            temporaries(&out_dir)?,
            1,
            "round {round}: it was killed while writing"
        );
    }

    // Left alone, the same child finishes: the output is complete and nothing else is left.
    let output = dir.path().join("merged.exr");
    let status = run_child(&output)?.wait()?;
    ensure!(status.success(), "the child failed: {status}");
    assert!(output.exists());
    assert_eq!(temporaries(dir.path())?, 0);
    let merged = read_all_flat_layers_from_file(&output)?;
    assert_eq!(merged.layer_data[0].size, Vec2(64, 300));
    Ok(())
}
