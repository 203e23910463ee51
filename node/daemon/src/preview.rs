//! Live previews of sample-split frames for the API: the merge of the slices done so far,
//! tone-mapped to a small PNG ([`blendnet_exr`]).
//!
//! A preview is made on demand and kept under `<data>/work/<job>/preview/`, named by the
//! slices it shows and its size, so asking again before a new slice lands costs a file read.

use std::path::{Path, PathBuf};

use blendnet_proto::BlobHash;

use crate::api::ApiError;
use crate::blobs::Blobs;

/// Previews kept per job: the newest few, for clients asking at different sizes.
const KEEP: usize = 4;

/// A PNG of the merge of `slices` (result manifests of slices of `frame`, in sample order), at
/// most `size` pixels on its long side.
pub async fn png(
    blobs: &Blobs,
    dir: &Path,
    frame: u32,
    slices: &[BlobHash],
    size: u32,
) -> Result<Vec<u8>, ApiError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&frame.to_le_bytes());
    hasher.update(&size.to_le_bytes());
    for s in slices {
        hasher.update(&s.0);
    }
    let key = hasher.finalize().to_hex();
    let path = dir.join(format!("frame_{frame:06}-{}.png", &key[..16]));
    if let Ok(bytes) = tokio::fs::read(&path).await {
        return Ok(bytes);
    }
    let work = dir.join(format!("work-{}", &key[..16]));
    let _ = tokio::fs::remove_dir_all(&work).await;
    let name = format!("frame_{frame:06}.exr");
    let mut inputs = Vec::with_capacity(slices.len());
    for (i, hash) in slices.iter().enumerate() {
        let slice_dir = work.join(format!("slice_{i:04}"));
        blobs.get(*hash, slice_dir.clone(), None).await?;
        inputs.push(slice_dir.join(&name));
    }
    let options = blendnet_exr::MergeOptions {
        preview: Some(blendnet_exr::PreviewOptions {
            max_size: size,
            ..blendnet_exr::PreviewOptions::new(path.clone())
        }),
        ..Default::default()
    };
    let merged = work.join("merged.exr");
    let made = tokio::task::spawn_blocking(move || blendnet_exr::merge(&inputs, &merged, &options))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let _ = tokio::fs::remove_dir_all(&work).await;
    made.map_err(|e| ApiError::Internal(format!("previewing frame {frame}: {e}")))?;
    prune(dir).await;
    tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))
}

/// Removes all but the [`KEEP`] newest previews in `dir`.
async fn prune(dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    let mut previews: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "png")
            && let Ok(meta) = entry.metadata().await
            && let Ok(modified) = meta.modified()
        {
            previews.push((modified, path));
        }
    }
    previews.sort();
    let excess = previews.len().saturating_sub(KEEP);
    for (_, path) in previews.into_iter().take(excess) {
        let _ = tokio::fs::remove_file(path).await;
    }
}
