//! The `blendnet` daemon as a library: the pieces of the binary that do not depend on the node's
//! actors, so they can be tested alone and reused by the CLI.
//!
//! - [`data_dir`]: where a node keeps its files; atomic writes and secret reads.
//! - [`config`]: `blendnet.toml` plus command-line overrides.
//! - [`state`]: the redb database of everything the node must not lose.
//! - [`api`]: the local HTTP API server (DESIGN §10), written against a [`api::Backend`] trait.
//! - [`client`]: the blocking client of that API, used by the CLI.
//! - [`logging`]: the tracing subscriber (stderr and daily-rotated files).
//! - [`capabilities`]: what this machine offers: cores, RAM, disk, GPUs, Blender.

pub mod api;
pub mod blobs;
pub mod board;
pub mod capabilities;
pub mod cli;
pub mod client;
pub mod cloud_cmd;
pub mod config;
pub mod cost_cmd;
pub mod data_dir;
pub mod deliver;
pub mod demo;
pub mod logging;
pub mod node;
pub mod preview;
pub mod provision;
pub mod render;
pub mod render_cmd;
pub mod state;
pub mod web;
