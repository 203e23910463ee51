//! What a Blender can render with: its Cycles compute devices (CPU, CUDA, OptiX, HIP, Metal,
//! oneAPI), whether it has OpenImageDenoise (Debian's build has not), and whether its Cycles has
//! `sample_offset`. Asked of Blender itself by running [`DEVICES_PY`] with [`probe_args`]; the
//! caller runs the process (with its own timeout) and hands the output to [`parse`].

pub use blendnet_proto::wire::ComputeDevice as Device;
use serde::{Deserialize, Serialize};

use crate::protocol::REPLY_PREFIX;

/// The script that prints the devices.
pub const DEVICES_PY: &str = include_str!("devices.py");

/// Most devices kept: the list is advertised to every peer and must stay small.
pub const MAX_DEVICES: usize = 64;

/// What a Blender can render with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Devices {
    /// The CPU first, then GPUs.
    pub devices: Vec<Device>,
    /// OpenImageDenoise is built in: this peer can denoise.
    pub denoiser: bool,
    /// Cycles has `sample_offset` (3.2 and later): slices merge into the exact frame.
    pub sample_offset: bool,
}

impl Devices {
    /// Whether any GPU is usable.
    pub fn has_gpu(&self) -> bool {
        self.devices.iter().any(|d| d.kind != "CPU")
    }
}

/// The arguments to run Blender with.
pub fn probe_args() -> [&'static str; 4] {
    ["-b", "--factory-startup", "--python-expr", DEVICES_PY]
}

/// The devices in Blender's output, or why there are none.
pub fn parse(stdout: &str) -> Result<Devices, String> {
    #[derive(Deserialize)]
    struct Line {
        devices: Devices,
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(REPLY_PREFIX))
        .ok_or("Blender printed no device list")?;
    let mut devices = serde_json::from_str::<Line>(line)
        .map_err(|e| format!("bad device list: {e}"))?
        .devices;
    devices.devices.truncate(MAX_DEVICES);
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_line_among_blenders_own() {
        let out = "Blender 3.4.1\nRead prefs\n@blendnet {\"devices\": {\"devices\": \
                   [{\"kind\": \"CPU\", \"name\": \"AMD EPYC\"}, {\"kind\": \"OPTIX\", \
                   \"name\": \"NVIDIA H100\"}], \"denoiser\": true, \"sample_offset\": true}}\n\
                   Blender quit\n";
        let devices = parse(out).unwrap();
        assert_eq!(devices.devices.len(), 2);
        assert!(devices.has_gpu() && devices.denoiser && devices.sample_offset);
        assert!(parse("Blender 3.4.1\n").is_err());
        assert!(parse("@blendnet {\"devices\": 3}").is_err());
    }
}
