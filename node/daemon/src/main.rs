//! `blendnet`: the BlendNet daemon and its command line.

use clap::Parser;

fn main() -> std::process::ExitCode {
    keep_freed_buffers();
    let cli = blendnet_daemon::cli::Cli::parse();
    match blendnet_daemon::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Blob transfers allocate and free buffers of a few MiB per piece on several threads. By
/// default glibc maps each such buffer afresh and hands it back on free, so every piece pays
/// page faults and zeroing for memory it just released: keep freed memory in the process
/// instead (up to 256 MiB above what is in use). Measured: a 1 GiB fetch on loopback, 2 cores,
/// went from 367 to 405 MiB/s and the fetcher's CPU from 2.5 to 2.0 s.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; it is called before any other thread
    // exists, and any value is valid for these parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
