//! Synthetic EXRs for unit tests: any channels, types, attributes, compression and blocks, with
//! values from a function, written with the `exr` crate's block writer.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use exr::block::UncompressedBlock;
use exr::block::writer::ChunksWriter;
use exr::math::RoundingMode;
use exr::meta::attribute::{
    AttributeValue, ChannelDescription, Compression, LevelMode, LineOrder, SampleType, Text,
    TileDescription,
};
use exr::meta::header::Header;
use exr::meta::{BlockDescription, Headers};
use exr::prelude::f16;

/// What to write.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub width: usize,
    pub height: usize,
    /// Channel names and types, in any order.
    pub channels: Vec<(String, SampleType)>,
    /// String attributes.
    pub attributes: Vec<(String, String)>,
    pub compression: Compression,
    pub blocks: BlockDescription,
    pub line_order: LineOrder,
    pub views: Option<Vec<String>>,
}

impl Spec {
    /// A `width`×`height` ZIP16 scanline image with these f32 channels.
    pub(crate) fn new(width: usize, height: usize, channels: &[&str]) -> Self {
        Self {
            width,
            height,
            channels: channels
                .iter()
                .map(|c| (c.to_string(), SampleType::F32))
                .collect(),
            attributes: Vec::new(),
            compression: Compression::ZIP16,
            blocks: BlockDescription::ScanLines,
            line_order: LineOrder::Increasing,
            views: None,
        }
    }

    /// Adds a string attribute.
    pub(crate) fn attr(mut self, name: &str, value: &str) -> Self {
        self.attributes.push((name.into(), value.into()));
        self
    }

    /// Makes one channel another type.
    pub(crate) fn typed(mut self, name: &str, kind: SampleType) -> Self {
        for channel in &mut self.channels {
            if channel.0 == name {
                channel.1 = kind;
            }
        }
        self
    }

    /// Stores the pixels in `size`×`size` tiles.
    pub(crate) fn tiled(mut self, size: usize) -> Self {
        self.blocks = BlockDescription::Tiles(TileDescription {
            tile_size: exr::math::Vec2(size, size),
            level_mode: LevelMode::Singular,
            rounding_mode: RoundingMode::Down,
        });
        self
    }

    /// Writes the image to `path`; `value(channel name, x, y)` gives each sample.
    pub(crate) fn write(&self, path: &Path, value: impl Fn(&str, usize, usize) -> f64) {
        let mut channels = self.channels.clone();
        channels.sort_by(|a, b| a.0.cmp(&b.0));
        let descriptions = channels
            .iter()
            .map(|(name, kind)| ChannelDescription::new(name.as_str(), *kind, false))
            .collect();
        let mut header = Header::new(Text::from("x"), (self.width, self.height), descriptions)
            .with_encoding(self.compression, self.blocks, self.line_order);
        header.own_attributes.layer_name = None;
        for (name, text) in &self.attributes {
            header.own_attributes.other.insert(
                Text::from(name.as_str()),
                AttributeValue::Text(Text::from(text.as_str())),
            );
        }
        header.own_attributes.multi_view_names = self
            .views
            .as_ref()
            .map(|v| v.iter().map(|s| Text::from(s.as_str())).collect());
        let file = BufWriter::new(File::create(path).unwrap());
        exr::block::write(
            file,
            Headers::from_vec(vec![header]),
            true,
            |meta, writer| {
                let blocks: Vec<_> = meta.enumerate_ordered_header_block_indices().collect();
                for (index, block) in blocks {
                    let (x0, y0) = (block.pixel_position.0, block.pixel_position.1);
                    let (w, h) = (block.pixel_size.0, block.pixel_size.1);
                    let mut data = Vec::new();
                    for y in y0..y0 + h {
                        for (name, kind) in &channels {
                            for x in x0..x0 + w {
                                let v = value(name, x, y);
                                match kind {
                                    SampleType::F32 => data.extend((v as f32).to_ne_bytes()),
                                    SampleType::F16 => {
                                        data.extend(f16::from_f64(v).to_bits().to_ne_bytes())
                                    }
                                    SampleType::U32 => data.extend((v as u32).to_ne_bytes()),
                                }
                            }
                        }
                    }
                    let chunk = UncompressedBlock { index: block, data }
                        .compress_to_chunk(&meta.headers)?;
                    writer.write_chunk(index, chunk)?;
                }
                Ok(())
            },
        )
        .unwrap();
    }
}

/// Channels by name: type and values as f64.
pub(crate) type Channels = std::collections::BTreeMap<String, (SampleType, Vec<f64>)>;

/// String attributes by name.
pub(crate) type Attributes = std::collections::BTreeMap<String, String>;

/// Every channel of an EXR by name, as f64, and its type; and its string attributes.
pub(crate) fn read(path: &Path) -> (Channels, Attributes) {
    use exr::prelude::*;
    let image = read_all_flat_layers_from_file(path).unwrap();
    let mut channels = std::collections::BTreeMap::new();
    for layer in &image.layer_data {
        for channel in &layer.channel_data.list {
            let (kind, values): (SampleType, Vec<f64>) = match &channel.sample_data {
                FlatSamples::F16(v) => (SampleType::F16, v.iter().map(|x| x.to_f64()).collect()),
                FlatSamples::F32(v) => (SampleType::F32, v.iter().map(|&x| f64::from(x)).collect()),
                FlatSamples::U32(v) => (SampleType::U32, v.iter().map(|&x| f64::from(x)).collect()),
            };
            channels.insert(channel.name.to_string(), (kind, values));
        }
    }
    let meta = exr::meta::MetaData::read_from_file(path, false).unwrap();
    let attributes = meta.headers[0]
        .own_attributes
        .other
        .iter()
        .filter_map(|(k, v)| match v {
            AttributeValue::Text(t) => Some((k.to_string(), t.to_string())),
            _ => None,
        })
        .collect();
    (channels, attributes)
}
