//! The merge against Blender's own `_cycles.merge`, on partial renders made by real Blender
//! (Debian's `blender` package; `BLENDNET_BLENDER` picks another): sample slices of unequal
//! sizes with the same seed, several view layers, Cycles' passes of every kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use blendnet_exr::{MergeOptions, PreviewOptions, RunningMerge, merge, preview};
use blendnet_tests::{blender_python, blender_scene, cycles_merge};
use exr::prelude::*;

/// The tolerance asked of every pixel: relative or absolute.
const TOLERANCE: f64 = 1e-6;

/// Multilayer 32-bit EXR output, fixed sample counts, and the passes to compare.
const PASSES: &str = "\
scene.cycles.use_adaptive_sampling = False
scene.render.image_settings.file_format = 'OPEN_EXR_MULTILAYER'
scene.render.image_settings.color_depth = '32'
layer = scene.view_layers[0]
for name in ['use_pass_z', 'use_pass_normal', 'use_pass_object_index', 'use_pass_material_index',
             'use_pass_cryptomatte_object', 'use_pass_diffuse_direct', 'use_pass_diffuse_indirect',
             'use_pass_diffuse_color', 'use_pass_glossy_direct', 'use_pass_glossy_indirect',
             'use_pass_glossy_color', 'use_pass_transmission_direct', 'use_pass_emit',
             'use_pass_environment', 'use_pass_ambient_occlusion', 'use_pass_shadow',
             'use_pass_mist', 'use_pass_uv', 'use_pass_position']:
    setattr(layer, name, True)
layer.cycles.denoising_store_passes = True
second = scene.view_layers.new('Second')
second.use_pass_z = True
second.use_pass_cryptomatte_object = True
second.use_pass_emit = True
second.use_pass_ambient_occlusion = True
";

/// Renders each `(sample_offset, samples)` slice of `scene` in one Blender process; returns the
/// EXRs, named `<prefix><i>.exr` in `dir`.
fn render_slices(
    scene: &Path,
    dir: &Path,
    prefix: &str,
    slices: &[(u32, u32)],
) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = (0..slices.len())
        .map(|i| dir.join(format!("{prefix}{i}.exr")))
        .collect();
    let mut script = String::from("import bpy\nscene = bpy.context.scene\n");
    for ((offset, samples), path) in slices.iter().zip(&paths) {
        script.push_str(&format!(
            "scene.cycles.sample_offset = {offset}\nscene.cycles.samples = {samples}\n\
             scene.render.filepath = {:?}\nbpy.ops.render.render(write_still=True)\n",
            path.to_str().context("path is not UTF-8")?
        ));
    }
    blender_python(Some(scene), &script).context("rendering slices")?;
    ensure!(
        paths.iter().all(|p| p.exists()),
        "rendering slices: Blender wrote no file"
    );
    Ok(paths)
}

/// An EXR's channels (name → type and values as f32) and attributes (name → debug text).
struct Decoded {
    channels: BTreeMap<String, (String, Vec<f32>)>,
    attributes: BTreeMap<String, String>,
}

fn decode(path: &Path) -> Result<Decoded> {
    let image = read_all_flat_layers_from_file(path)
        .with_context(|| format!("decoding {}", path.display()))?;
    let mut channels = BTreeMap::new();
    for layer in &image.layer_data {
        for channel in &layer.channel_data.list {
            let kind = match channel.sample_data {
                FlatSamples::F16(_) => "f16",
                FlatSamples::F32(_) => "f32",
                FlatSamples::U32(_) => "u32",
            };
            channels.insert(
                channel.name.to_string(),
                (
                    kind.to_string(),
                    channel.sample_data.values_as_f32().collect(),
                ),
            );
        }
    }
    let meta = exr::meta::MetaData::read_from_file(path, false)?;
    let attributes = meta.headers[0]
        .all_named_attributes()
        .map(|(name, value)| {
            (
                String::from_utf8_lossy(name).into_owned(),
                format!("{value:?}"),
            )
        })
        .collect();
    Ok(Decoded {
        channels,
        attributes,
    })
}

/// Checks `ours` against `reference` (Cycles' merge): the same channels and types, every pixel
/// within [`TOLERANCE`], the same metadata but for `capDate`, which OpenImageIO stamps with the
/// time of writing. Returns the largest absolute and relative differences.
fn assert_matches(ours: &Path, reference: &Path) -> Result<(f64, f64)> {
    let (ours, mut reference) = (decode(ours)?, decode(reference)?);
    let names = |d: &Decoded| {
        d.channels
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&ours), names(&reference), "same channels and types");
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    for (name, (_, values)) in &ours.channels {
        for (p, (&a, &b)) in values.iter().zip(&reference.channels[name].1).enumerate() {
            if a.is_nan() && b.is_nan() {
                continue;
            }
            let (a, b) = (f64::from(a), f64::from(b));
            let diff = (a - b).abs();
            let relative = if b != 0.0 { diff / b.abs() } else { diff };
            assert!(
                diff <= TOLERANCE || relative <= TOLERANCE,
                "{name} pixel {p}: ours {a}, Cycles {b}"
            );
            worst_abs = worst_abs.max(diff);
            worst_rel = worst_rel.max(relative);
        }
    }
    assert!(
        reference.attributes.remove("capDate").is_some(),
        "Cycles' output has capDate"
    );
    assert_eq!(ours.attributes, reference.attributes, "same metadata");
    Ok((worst_abs, worst_rel))
}

#[test]
fn merges_like_cycles_for_2_3_and_8_unequal_slices() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let scene = blender_scene(dir.path(), "passes", PASSES)?;
    let sets: [&[(u32, u32)]; 3] = [
        &[(0, 3), (3, 5)],
        &[(0, 1), (1, 2), (3, 5)],
        &[
            (0, 1),
            (1, 2),
            (3, 1),
            (4, 3),
            (7, 1),
            (8, 2),
            (10, 4),
            (14, 2),
        ],
    ];
    for slices in sets {
        let inputs = render_slices(&scene, dir.path(), &format!("n{}-", slices.len()), slices)?;
        let ours = dir.path().join(format!("ours{}.exr", slices.len()));
        let reference = dir.path().join(format!("cycles{}.exr", slices.len()));
        let report = merge(&inputs, &ours, &MergeOptions::default())?;
        cycles_merge(&inputs, &reference)?;
        let (worst_abs, worst_rel) = assert_matches(&ours, &reference)?;
        eprintln!(
            "{} slices: {} channels, worst difference from Cycles {worst_abs:e} absolute, \
             {worst_rel:e} relative",
            slices.len(),
            report.channels
        );

        let merged = decode(&ours)?;
        let slices_decoded: Vec<Decoded> =
            inputs.iter().map(|p| decode(p)).collect::<Result<_>>()?;
        for pass in [
            "ViewLayer.Combined.R",
            "ViewLayer.Depth.Z",
            "ViewLayer.Normal.X",
            "ViewLayer.IndexOB.X",
            "ViewLayer.CryptoObject00.r",
            "ViewLayer.Denoising Albedo.R",
            "ViewLayer.DiffDir.R",
            "ViewLayer.GlossInd.G",
            "ViewLayer.AO.R",
            "ViewLayer.Emit.B",
            "Second.Combined.G",
            "Second.CryptoObject00.g",
        ] {
            assert!(merged.channels.contains_key(pass), "{pass} missing");
        }
        // Copied passes are the first slice's.
        for pass in [
            "ViewLayer.Depth.Z",
            "ViewLayer.CryptoObject00.r",
            "Second.CryptoObject01.r",
        ] {
            assert_eq!(
                merged.channels[pass].1, slices_decoded[0].channels[pass].1,
                "{pass}"
            );
        }
        // The slices' sample counts differ, so weighting matters: the result is not a plain mean.
        let combined = &merged.channels["ViewLayer.Combined.R"].1;
        let largest_gap = (0..combined.len())
            .map(|p| {
                let mean = slices_decoded
                    .iter()
                    .map(|s| s.channels["ViewLayer.Combined.R"].1[p])
                    .sum::<f32>()
                    / slices_decoded.len() as f32;
                (combined[p] - mean).abs()
            })
            .fold(0f32, f32::max);
        assert!(
            largest_gap > 1e-3,
            "the merge looks unweighted (gap {largest_gap})"
        );
        let total: u32 = slices.iter().map(|s| s.1).sum();
        assert!(
            merged.attributes["cycles.ViewLayer.samples"].contains(&format!("\"{total}\"")),
            "{}",
            merged.attributes["cycles.ViewLayer.samples"]
        );
    }
    Ok(())
}

#[test]
fn a_debug_sample_count_pass_merges_like_cycles() -> Result<()> {
    // One view layer: with several, Cycles 3.4 reads the count pass from the wrong channel.
    let dir = tempfile::tempdir()?;
    let scene = blender_scene(
        dir.path(),
        "adaptive",
        "scene.cycles.use_adaptive_sampling = True\n\
         scene.cycles.adaptive_threshold = 0.2\n\
         scene.render.image_settings.file_format = 'OPEN_EXR_MULTILAYER'\n\
         scene.render.image_settings.color_depth = '32'\n\
         scene.view_layers[0].use_pass_z = True\n\
         scene.view_layers[0].cycles.pass_debug_sample_count = True",
    )?;
    let inputs = render_slices(&scene, dir.path(), "a", &[(0, 4), (4, 12), (16, 16)])?;
    let (ours, reference) = (dir.path().join("ours.exr"), dir.path().join("cycles.exr"));
    merge(&inputs, &ours, &MergeOptions::default())?;
    cycles_merge(&inputs, &reference)?;
    assert!(
        decode(&ours)?
            .channels
            .contains_key("ViewLayer.Debug Sample Count.X")
    );
    assert_matches(&ours, &reference)?;
    Ok(())
}

#[test]
fn a_running_merge_ends_at_the_one_shot_merge_with_previews() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let scene = blender_scene(
        dir.path(),
        "running",
        "scene.cycles.use_adaptive_sampling = False\n\
         scene.render.image_settings.file_format = 'OPEN_EXR_MULTILAYER'\n\
         scene.render.image_settings.color_depth = '32'\n\
         scene.view_layers[0].use_pass_z = True\n\
         scene.view_layers.new('Other')",
    )?;
    let inputs = render_slices(&scene, dir.path(), "r", &[(0, 2), (2, 1), (3, 5)])?;
    let (live, png) = (dir.path().join("live.exr"), dir.path().join("live.png"));
    let options = MergeOptions {
        preview: Some(PreviewOptions {
            path: png.clone(),
            max_size: 16,
            layer: Some("ViewLayer".into()),
        }),
        ..Default::default()
    };
    let mut running = RunningMerge::new();
    let mut previews = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        running.add(input)?;
        let report = running.write(&live, &options)?;
        assert_eq!(report.inputs.len(), i + 1);
        let preview = report.preview.context("a preview was asked for")?;
        assert_eq!(
            (preview.width, preview.height, preview.layer.as_str()),
            (16, 12, "ViewLayer")
        );
        previews.push(decode_png(&png)?);
    }
    let one_shot = dir.path().join("one-shot.exr");
    merge(&inputs, &one_shot, &MergeOptions::default())?;
    let (live_decoded, one_shot_decoded) = (decode(&live)?, decode(&one_shot)?);
    assert_eq!(
        live_decoded.channels, one_shot_decoded.channels,
        "the same pixels, bit for bit"
    );
    assert_eq!(
        live_decoded.attributes, one_shot_decoded.attributes,
        "the same metadata"
    );

    for (width, height, pixels) in &previews {
        assert_eq!((*width, *height), (16, 12));
        let (first, rest) = pixels.split_at(4);
        assert!(
            rest.chunks(4).any(|p| p != first),
            "the preview is not blank"
        );
        // The cube over the world background: opaque, and not all black.
        assert!(pixels.chunks(4).all(|p| p[3] == 255));
        assert!(pixels.chunks(4).any(|p| p[..3].iter().any(|&c| c > 20)));
    }
    // A preview of the merged file on its own is the same picture.
    let again = dir.path().join("again.png");
    preview(
        &live,
        &PreviewOptions {
            path: again.clone(),
            max_size: 16,
            layer: Some("ViewLayer".into()),
        },
    )?;
    assert_eq!(decode_png(&again)?, previews[2]);
    Ok(())
}

/// A PNG's size and RGBA8 pixels.
fn decode_png(path: &Path) -> Result<(u32, u32, Vec<u8>)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = decoder.read_info()?;
    let mut pixels = vec![0; reader.output_buffer_size().context("size")?];
    let info = reader.next_frame(&mut pixels)?;
    ensure!(
        info.color_type == png::ColorType::Rgba && info.bit_depth == png::BitDepth::Eight,
        "not RGBA8: {info:?}"
    );
    pixels.truncate(info.buffer_size());
    Ok((info.width, info.height, pixels))
}
