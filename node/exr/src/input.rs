//! One input EXR: its header, where each of its pixel blocks lies in the file, and reading one
//! block by positioned reads (so several threads share one open file without seeking).
//!
//! [`ExrFile::open`] checks the whole structure up front, before any merge writes anything: the
//! magic number, the header, the limits below, the offset table, and every block's own little
//! header (its coordinates and length, which must lie inside the file). A file cut short by an
//! interrupted render or transfer is therefore reported as truncated when it is added, not half
//! way through a merge. Pixel data is only decoded when a block is read.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use exr::block::chunk::{Chunk, CompressedBlock, CompressedScanLineBlock, CompressedTileBlock};
use exr::block::{BlockIndex, UncompressedBlock};
use exr::io::{PeekRead, Tracking};
use exr::meta::attribute::LevelMode;
use exr::meta::header::Header;
use exr::meta::{BlockDescription, MetaData};

use crate::error::InputError;

/// The first four bytes of every OpenEXR file.
pub(crate) const EXR_MAGIC: [u8; 4] = [0x76, 0x2f, 0x31, 0x01];

/// Largest width or height accepted. Blender renders at most 65 536 pixels a side; a header
/// claiming more is corrupt or hostile, and would make block buffers huge.
pub const MAX_DIMENSION: usize = 65_536;

/// Most channels accepted in one file. A render with every pass of Cycles, cryptomatte at
/// depth 6 for three kinds and many light groups and AOVs stays well under this; far more is a
/// corrupt header.
pub const MAX_CHANNELS: usize = 4096;

/// Largest uncompressed block accepted (one scanline block or tile, all channels). Each merge
/// thread holds a few blocks at once, so this bounds the merge's memory; a 1080p frame with 39
/// channels in 32-line blocks is 9.6 MB.
pub const MAX_BLOCK_BYTES: usize = 256 << 20;

/// Bytes of a scanline block's own header in a single-part file: y, data length.
const SCANLINE_CHUNK_HEADER: usize = 8;

/// Bytes of a tile's own header in a single-part file: tile x, y, level x, y, data length.
const TILE_CHUNK_HEADER: usize = 20;

/// Where one block lies in the file: its own header and its compressed data.
#[derive(Debug, Clone, Copy)]
struct ChunkSpan {
    offset: u64,
    len: usize,
}

/// An opened, structurally checked single-part EXR.
#[derive(Debug)]
pub(crate) struct ExrFile {
    /// The path it was opened from.
    pub path: PathBuf,
    /// Its length when opened.
    len: u64,
    /// Its modification time when opened.
    modified: Option<SystemTime>,
    /// Its header (exactly one) with what decoding needs.
    pub meta: MetaData,
    /// Each block, in increasing-y order (the offset table's order).
    chunks: Vec<ChunkSpan>,
    /// Where each block goes, in the same order.
    pub blocks: Vec<BlockIndex>,
}

impl ExrFile {
    /// Opens `path` and checks its structure (see the module docs).
    pub(crate) fn open(path: &Path) -> Result<Self, InputError> {
        let read_error = |source| InputError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let stat = file.metadata().map_err(read_error)?;
        if !stat.is_file() {
            return Err(InputError::NotExr {
                path: path.to_path_buf(),
                detail: ": it is not a regular file".into(),
            });
        }
        let len = stat.len();
        let mut magic = [0u8; 4];
        read_exact_at(&file, 0, &mut magic).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => InputError::NotExr {
                path: path.to_path_buf(),
                detail: if len == 0 {
                    ": it is empty".into()
                } else {
                    format!(": it is only {len} bytes long")
                },
            },
            _ => read_error(e),
        })?;
        if magic != EXR_MAGIC {
            return Err(InputError::NotExr {
                path: path.to_path_buf(),
                detail: describe_magic(&magic),
            });
        }

        let mut reader = PeekRead::new(Tracking::new(BufReader::new(&file)));
        let meta = MetaData::read_from_buffered(&mut reader, false)
            .map_err(|e| decode_error(path, e, "its header"))?;
        let header = check_header(path, &meta)?;
        let tables = MetaData::read_offset_tables(&mut reader, &meta.headers)
            .map_err(|e| decode_error(path, e, "its offset table"))?;
        let table = tables.into_iter().next().unwrap_or_default();
        let data_start = reader.byte_position() as u64;

        let mut blocks = Vec::with_capacity(header.chunk_count);
        for tile in header.blocks_increasing_y_order() {
            let bounds = header
                .get_absolute_block_pixel_coordinates(tile.location)
                .map_err(|e| decode_error(path, e, "its block layout"))?;
            blocks.push(BlockIndex {
                layer: 0,
                pixel_position: exr::math::Vec2(
                    bounds.position.0 as usize,
                    bounds.position.1 as usize,
                ),
                pixel_size: bounds.size,
                level: tile.location.level_index,
            });
        }
        if table.len() != blocks.len() {
            return Err(InputError::Invalid {
                path: path.to_path_buf(),
                detail: format!(
                    "its offset table has {} entries for {} blocks",
                    table.len(),
                    blocks.len()
                ),
            });
        }

        let chunk_header = match header.blocks {
            BlockDescription::ScanLines => SCANLINE_CHUNK_HEADER,
            BlockDescription::Tiles(_) => TILE_CHUNK_HEADER,
        };
        let max_data = header.max_block_byte_size();
        let mut chunks = Vec::with_capacity(table.len());
        for (index, (&offset, block)) in table.iter().zip(&blocks).enumerate() {
            let truncated = |detail: String| InputError::Truncated {
                path: path.to_path_buf(),
                detail,
            };
            if offset == 0 {
                return Err(truncated(format!(
                    "block {index} of {} was never written (its offset table entry is empty)",
                    blocks.len()
                )));
            }
            if offset < data_start {
                return Err(InputError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!("block {index} lies inside the header (offset {offset})"),
                });
            }
            if offset.saturating_add(chunk_header as u64) > len {
                return Err(truncated(format!(
                    "the file is {len} bytes but block {index} of {} starts at byte {offset}",
                    blocks.len()
                )));
            }
            let mut head = [0u8; TILE_CHUNK_HEADER];
            read_exact_at(&file, offset, &mut head[..chunk_header]).map_err(read_error)?;
            let word =
                |i: usize| i32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
            let expected = match header.blocks {
                BlockDescription::ScanLines => {
                    let y = block.pixel_position.1 as i64
                        + i64::from(header.own_attributes.layer_position.1);
                    i64::from(word(0)) == y
                }
                BlockDescription::Tiles(tiles) => {
                    let (tx, ty) = (
                        block.pixel_position.0 / tiles.tile_size.0,
                        block.pixel_position.1 / tiles.tile_size.1,
                    );
                    i64::from(word(0)) == tx as i64
                        && i64::from(word(4)) == ty as i64
                        && word(8) == 0
                        && word(12) == 0
                }
            };
            if !expected {
                return Err(InputError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!(
                        "block {index} at byte {offset} has the coordinates of another block"
                    ),
                });
            }
            let data_len = word(chunk_header - 4);
            let data_len = usize::try_from(data_len).ok().filter(|&n| n > 0 && n <= max_data).ok_or_else(|| {
                InputError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!(
                        "block {index} claims {data_len} bytes of data, more than its {max_data} pixels' worth"
                    ),
                }
            })?;
            let end = offset + (chunk_header + data_len) as u64;
            if end > len {
                return Err(truncated(format!(
                    "the file is {len} bytes but block {index} of {} ends at byte {end}",
                    blocks.len()
                )));
            }
            chunks.push(ChunkSpan {
                offset,
                len: chunk_header + data_len,
            });
        }

        Ok(Self {
            path: path.to_path_buf(),
            len,
            modified: stat.modified().ok(),
            meta,
            chunks,
            blocks,
        })
    }

    /// The file's single header.
    pub(crate) fn header(&self) -> &Header {
        &self.meta.headers[0]
    }

    /// Drops the header's free-form attributes (cryptomatte manifests can be megabytes), keeping
    /// what decoding blocks needs; for every input but the one whose header the output copies.
    pub(crate) fn forget_attributes(&mut self) {
        let header = &mut self.meta.headers[0];
        header.own_attributes.other.clear();
        header.shared_attributes.other.clear();
    }

    /// Whether the file still has the length and modification time it had when opened.
    pub(crate) fn unchanged(&self) -> bool {
        std::fs::metadata(&self.path)
            .is_ok_and(|m| m.len() == self.len && m.modified().ok() == self.modified)
    }

    /// Reads and decompresses block `index` (increasing-y order) from `file`, an open handle
    /// on this same path; `buf` is scratch space kept between calls.
    pub(crate) fn read_block(
        &self,
        file: &File,
        index: usize,
        buf: &mut Vec<u8>,
    ) -> Result<UncompressedBlock, InputError> {
        let span = self.chunks[index];
        buf.resize(span.len, 0);
        read_exact_at(file, span.offset, buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => InputError::Truncated {
                path: self.path.clone(),
                detail: format!("it became shorter while being merged (block {index})"),
            },
            _ => InputError::Read {
                path: self.path.clone(),
                source: e,
            },
        })?;
        let compressed_block = match self.header().blocks {
            BlockDescription::ScanLines => {
                let y = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                CompressedBlock::ScanLine(CompressedScanLineBlock {
                    y_coordinate: y,
                    compressed_pixels_le: buf[SCANLINE_CHUNK_HEADER..].to_vec(),
                })
            }
            BlockDescription::Tiles(_) => {
                let coordinates = exr::block::chunk::TileCoordinates::read(&mut &buf[..16])
                    .map_err(|e| self.block_error(index, e))?;
                CompressedBlock::Tile(CompressedTileBlock {
                    coordinates,
                    compressed_pixels_le: buf[TILE_CHUNK_HEADER..].to_vec(),
                })
            }
        };
        let chunk = Chunk {
            layer_index: 0,
            compressed_block,
        };
        let block = UncompressedBlock::decompress_chunk(chunk, &self.meta, false)
            .map_err(|e| self.block_error(index, e))?;
        if block.index != self.blocks[index] {
            return Err(InputError::Invalid {
                path: self.path.clone(),
                detail: format!("block {index} decodes to the wrong place"),
            });
        }
        Ok(block)
    }

    fn block_error(&self, index: usize, error: exr::error::Error) -> InputError {
        InputError::Invalid {
            path: self.path.clone(),
            detail: format!(
                "block {index} (from line {}): {error}",
                self.blocks[index].pixel_position.1
            ),
        }
    }
}

/// Checks the header against what a merge supports and the limits; returns it.
fn check_header<'m>(path: &Path, meta: &'m MetaData) -> Result<&'m Header, InputError> {
    let unsupported = |what: String| InputError::Unsupported {
        path: path.to_path_buf(),
        what,
    };
    let header = match meta.headers.as_slice() {
        [header] => header,
        headers => {
            return Err(unsupported(format!(
                "it has {} parts; Cycles writes all passes into one",
                headers.len()
            )));
        }
    };
    if header.deep {
        return Err(unsupported("it holds deep data".into()));
    }
    if let BlockDescription::Tiles(tiles) = header.blocks
        && tiles.level_mode != LevelMode::Singular
    {
        return Err(unsupported("it holds mip or rip map levels".into()));
    }
    let size = header.layer_size;
    if size.0 == 0 || size.1 == 0 || size.0 > MAX_DIMENSION || size.1 > MAX_DIMENSION {
        return Err(unsupported(format!(
            "it is {}×{} pixels; the limit is {MAX_DIMENSION} a side",
            size.0, size.1
        )));
    }
    let channels = &header.channels.list;
    if channels.is_empty() || channels.len() > MAX_CHANNELS {
        return Err(unsupported(format!(
            "it has {} channels; the limit is {MAX_CHANNELS}",
            channels.len()
        )));
    }
    if let Some(channel) = channels
        .iter()
        .find(|c| c.sampling != exr::math::Vec2(1, 1))
    {
        return Err(unsupported(format!(
            "channel {} is subsampled",
            String::from_utf8_lossy(channel.name.bytes())
        )));
    }
    let block_pixels = match header.blocks {
        BlockDescription::ScanLines => header.compression.scan_lines_per_block() * size.0,
        BlockDescription::Tiles(tiles) => tiles.tile_size.area(),
    };
    // Merge buffers hold 4 bytes per sample whatever the channel's type.
    if block_pixels
        .saturating_mul(channels.len())
        .saturating_mul(4)
        > MAX_BLOCK_BYTES
    {
        return Err(unsupported(format!(
            "its blocks are larger than {} MiB",
            MAX_BLOCK_BYTES >> 20
        )));
    }
    MetaData::validate(&meta.headers, false).map_err(|e| decode_error(path, e, "its header"))?;
    Ok(header)
}

/// Maps a decoding error: running out of bytes is truncation, the rest is invalid or unsupported.
fn decode_error(path: &Path, error: exr::error::Error, what: &str) -> InputError {
    match error {
        exr::error::Error::Invalid(message) if message == "reference to missing bytes" => {
            InputError::Truncated {
                path: path.to_path_buf(),
                detail: format!("the file ends inside {what}"),
            }
        }
        exr::error::Error::NotSupported(message) => InputError::Unsupported {
            path: path.to_path_buf(),
            what: message.into_owned(),
        },
        exr::error::Error::Io(source) => InputError::Read {
            path: path.to_path_buf(),
            source,
        },
        other => InputError::Invalid {
            path: path.to_path_buf(),
            detail: format!("{what}: {other}"),
        },
    }
}

/// What a file that is not an EXR seems to be, for the error message.
fn describe_magic(magic: &[u8; 4]) -> String {
    match magic {
        [0x89, b'P', b'N', b'G'] => ": it is a PNG image".into(),
        [0xff, 0xd8, 0xff, _] => ": it is a JPEG image".into(),
        [b'B', b'L', b'E', b'N'] => ": it is a .blend file".into(),
        [b'I', b'I', 0x2a, 0] | [b'M', b'M', 0, 0x2a] => ": it is a TIFF image".into(),
        _ if magic
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) =>
        {
            ": it looks like text".into()
        }
        _ => String::new(),
    }
}

/// Fills `buf` from `offset` of `file` without moving any shared cursor.
fn read_exact_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            ) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
