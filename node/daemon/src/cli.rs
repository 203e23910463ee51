//! The command line: `blendnet <command>`. Every command but `up`, `init` and `join` is a
//! client of the running daemon's local API.

use crate::api::{AdmitRequest, InviteRequest, RevokeRequest};
use crate::client::Client;
use crate::config::{Config, Overrides};
use crate::data_dir::DataDir;
use crate::logging;
use anyhow::{Context, bail};
use blendnet_proto::{InviteCode, Roles};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// BlendNet: render Blender scenes on every machine you own or rent, as one private mesh.
#[derive(Debug, Parser)]
#[command(name = "blendnet", version, about)]
pub struct Cli {
    /// The node's data directory (keys, state, logs, config).
    #[arg(long, global = true, env = "BLENDNET_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new mesh: its key and this node's key. Prints the mesh id.
    Init,
    /// Run the daemon in the foreground.
    Up(UpArgs),
    /// Print a single-use, expiring invite code for another machine.
    Invite {
        /// How long the code stays valid: 30s, 10m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Roles the new member gets: submit, render, coordinate, provision.
        #[arg(long, default_value = "submit,render,coordinate")]
        roles: String,
    },
    /// Prepare this data directory to join a mesh; the next `up` redeems the code.
    Join {
        /// The code printed by `blendnet invite` on a member.
        code: String,
    },
    /// Admit a machine announced on the LAN (see `peers --pending`).
    Admit {
        /// The fingerprint the new machine printed at start, like K3QF-7ZPA.
        fingerprint: String,
    },
    /// Remove a member from the mesh; it is disconnected everywhere.
    Revoke {
        /// The member's peer id.
        peer: String,
    },
    /// List the mesh's members (or, with --pending, machines waiting on the LAN).
    Peers {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        pending: bool,
    },
    /// Show this node's status.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Start a new mesh first if this node is in none and is not joining one (as `init` does).
    #[arg(long)]
    pub init: bool,
    /// Address to listen on for peers (repeatable). Default: TCP and QUIC on port 7741.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Address of a member to connect to first (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Where the local API listens. Default: 127.0.0.1 and a free port.
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<SocketAddr>,
    /// Take no render tasks.
    #[arg(long)]
    pub no_render: bool,
    /// Do not announce or discover machines on the LAN with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// A libp2p pre-shared key file (swarm.key): hides the mesh from scanners; TCP only.
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// The Blender executable (else BLENDNET_BLENDER, else `blender` on PATH).
    #[arg(long, value_name = "PATH")]
    pub blender: Option<PathBuf>,
}

/// Parses a TTL such as `30s`, `10m`, `1h` or `2d` into seconds.
pub fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let bad = || anyhow::anyhow!("invalid TTL {text:?}: use a number with s, m, h or d, like 1h");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(bad()),
        Some(secs) => Ok(secs),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Runs the command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // `join` validates its code before touching the data directory, so a garbled code
    // changes nothing on disk.
    if let Command::Join { code } = &cli.command {
        let code = InviteCode::decode(code)?;
        code.check_expiry(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )?;
        let data_dir = DataDir::resolve(cli.data_dir)?;
        crate::node::join(&data_dir, &code)?;
        println!(
            "joining mesh {}: run `blendnet up` to redeem the invite",
            code.mesh
        );
        return Ok(());
    }
    let data_dir = DataDir::resolve(cli.data_dir)?;
    match cli.command {
        Command::Join { .. } => unreachable!("handled above"),
        Command::Init => {
            let mesh = crate::node::init(&data_dir)?;
            eprintln!("created mesh; start the node with `blendnet up`");
            println!("{mesh}");
        }
        Command::Up(args) => {
            let overrides = Overrides {
                listen: args.listen,
                bootstrap: args.bootstrap,
                api: args.api,
                no_render: args.no_render,
                no_mdns: args.no_mdns,
                psk_file: args.psk_file,
                blender: args.blender,
            };
            let config = Config::load(&data_dir, &overrides)?;
            if args.init && crate::node::may_init(&data_dir)? {
                let mesh = crate::node::init(&data_dir)?;
                eprintln!("created mesh {mesh}");
            }
            let _guard = logging::init(&data_dir, &config.log_level, config.max_log_files)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(crate::node::up(data_dir, config))?;
        }
        Command::Invite { ttl, roles } => {
            let ttl_secs = parse_ttl(&ttl)?;
            let parsed: Roles = roles.parse()?;
            if parsed.is_empty() {
                bail!("an invite needs at least one role");
            }
            let view = Client::connect(&data_dir)?.invite(&InviteRequest {
                ttl_secs,
                roles: parsed.names(),
            })?;
            println!("{}", view.code);
        }
        Command::Admit { fingerprint } => {
            let peer = Client::connect(&data_dir)?.admit(&AdmitRequest { fingerprint })?;
            println!("admitted {}", peer.peer_id);
        }
        Command::Revoke { peer } => {
            let peer = Client::connect(&data_dir)?.revoke(&RevokeRequest { peer })?;
            println!("revoked {}", peer.peer_id);
        }
        Command::Peers { json, pending } => {
            let peers = Client::connect(&data_dir)?.peers(pending)?;
            if json {
                return print_json(&peers);
            }
            let list = peers.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!(
                    "{}",
                    if pending {
                        "no machine is waiting on the LAN"
                    } else {
                        "no members"
                    }
                );
            }
            for p in list {
                let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
                if pending {
                    println!("{}  {}", s("fingerprint"), s("peer_id"));
                    continue;
                }
                let online = p.get("online").and_then(|v| v.as_bool()).unwrap_or(false);
                let roles: Vec<String> = p
                    .get("roles")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| r.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let me = if p.get("is_self").and_then(|v| v.as_bool()).unwrap_or(false) {
                    " (this node)"
                } else {
                    ""
                };
                println!(
                    "{}  {:7}  {}  blender {}  roles {}{me}",
                    s("fingerprint"),
                    if online { "online" } else { "offline" },
                    s("peer_id"),
                    s("blender"),
                    roles.join(",")
                );
            }
        }
        Command::Status { json } => {
            let status = Client::connect(&data_dir)?.status()?;
            if json {
                return print_json(&status);
            }
            println!("peer        {}", status.peer_id);
            println!("fingerprint {}", status.fingerprint);
            println!("state       {}", status.state);
            println!("mesh        {}", status.mesh_id.as_deref().unwrap_or("-"));
            println!("roles       {}", status.roles.join(","));
            println!("peers       {} online", status.peer_count);
            for a in &status.listen_addrs {
                println!("listening   {a}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_ttl("30s").unwrap(), 30);
        assert_eq!(parse_ttl("10m").unwrap(), 600);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("2d").unwrap(), 172_800);
        for bad in ["soon", "1", "h", "0s", "1w", "-1h", ""] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
