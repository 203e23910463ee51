//! Cycles' reading of a multilayer EXR's channel names, and what the merge does with each pass
//! (the rules of Cycles' `session/merge.cpp`, reimplemented).
//!
//! A channel is `Layer.Pass.Channel`, or `Layer.Pass.View.Channel` when the file's `multiView`
//! attribute lists two views or more. Names are split at their *last* dots, so a view layer
//! named `My.Layer` still parses. A channel that does not split (plain `R`, `A.B`) belongs to an
//! unnamed layer that Cycles merges with a weight of one sample per input.

/// What the merge does with one pass, decided by the pass's name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassOp {
    /// Taken from the first input as it is: `Depth`, `IndexMA`, `IndexOB` and `Crypto*`, whose
    /// values are not averages (the nearest depth, an object id, cryptomatte ranks).
    Copy,
    /// Summed over the inputs: `Debug BVH*`, `Debug Ray*`, `Debug Render Time*` (counters).
    Sum,
    /// `Debug Sample Count`: the merged per-pixel sample count, as a fraction of the total.
    Samples,
    /// Everything else: the average of the inputs, weighted by the samples each one took.
    Average,
}

impl PassOp {
    /// The operation for a pass name (`Combined`, `Depth`, `CryptoObject00`, …).
    pub fn for_pass(pass: &str) -> Self {
        if matches!(pass, "Depth" | "IndexMA" | "IndexOB") || pass.starts_with("Crypto") {
            PassOp::Copy
        } else if pass.starts_with("Debug BVH")
            || pass.starts_with("Debug Ray")
            || pass.starts_with("Debug Render Time")
        {
            PassOp::Sum
        } else if pass.starts_with("Debug Sample Count") {
            PassOp::Samples
        } else {
            PassOp::Average
        }
    }
}

/// The pass whose per-pixel values scale an input's samples, when a layer has it.
pub(crate) const SAMPLE_COUNT_PASS: &str = "Debug Sample Count";

/// A channel name split as Cycles splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChannelName<'a> {
    /// The render (view) layer.
    pub layer: &'a str,
    /// The view, in a multiview file.
    pub view: Option<&'a str>,
    /// The pass (`Combined`, `Depth`, …).
    pub pass: &'a str,
    /// The channel within the pass (`R`, `Z`, `X`, …).
    pub channel: &'a str,
}

impl ChannelName<'_> {
    /// The key Cycles groups channels by, and looks samples up with: the layer, or
    /// `Layer.View` in a multiview file.
    pub(crate) fn group_key(&self) -> String {
        match self.view {
            Some(view) => format!("{}.{view}", self.layer),
            None => self.layer.to_string(),
        }
    }
}

/// Splits `name` into layer, (view,) pass and channel at its last dots; `None` when it has too
/// few dots to be a render pass channel.
pub(crate) fn parse(name: &str, multiview: bool) -> Option<ChannelName<'_>> {
    let (rest, channel) = name.rsplit_once('.')?;
    let (rest, view) = if multiview {
        let (rest, view) = rest.rsplit_once('.')?;
        (rest, Some(view))
    } else {
        (rest, None)
    };
    let (layer, pass) = rest.rsplit_once('.')?;
    Some(ChannelName {
        layer,
        view,
        pass,
        channel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_get_cycles_operations() {
        for copy in [
            "Depth",
            "IndexMA",
            "IndexOB",
            "CryptoObject00",
            "CryptoMaterial02",
        ] {
            assert_eq!(PassOp::for_pass(copy), PassOp::Copy, "{copy}");
        }
        for sum in [
            "Debug BVH Traversed Nodes",
            "Debug Ray Bounces",
            "Debug Render Time",
        ] {
            assert_eq!(PassOp::for_pass(sum), PassOp::Sum, "{sum}");
        }
        assert_eq!(PassOp::for_pass("Debug Sample Count"), PassOp::Samples);
        for average in [
            "Combined",
            "Denoising Depth",
            "Normal",
            "DiffDir",
            "Mist",
            "AO",
            "Emit",
            "depth",
        ] {
            assert_eq!(PassOp::for_pass(average), PassOp::Average, "{average}");
        }
    }

    #[test]
    fn names_split_at_the_last_dots() {
        let c = parse("ViewLayer.Combined.R", false).unwrap();
        assert_eq!(
            (c.layer, c.view, c.pass, c.channel),
            ("ViewLayer", None, "Combined", "R")
        );
        let c = parse("My.Layer.Denoising Albedo.G", false).unwrap();
        assert_eq!(
            (c.layer, c.pass, c.channel),
            ("My.Layer", "Denoising Albedo", "G")
        );
        let c = parse("ViewLayer.Combined.left.A", true).unwrap();
        assert_eq!(
            (c.layer, c.view, c.pass, c.channel),
            ("ViewLayer", Some("left"), "Combined", "A")
        );
        assert_eq!(c.group_key(), "ViewLayer.left");
        assert_eq!(parse("R", false), None);
        assert_eq!(parse("Combined.R", false), None);
        assert_eq!(parse("ViewLayer.Combined.R", true), None);
    }
}
