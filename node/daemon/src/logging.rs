//! The daemon's tracing subscriber: one filter, two outputs.
//!
//! Events go to stderr (with colour when it is a terminal) and to daily-rotated files
//! `<data dir>/logs/blendnet.<YYYY-MM-DD>.log`, of which the newest `max_log_files` are kept.
//! The file writer is non-blocking: a background thread writes, so a slow disk never stalls an
//! actor; if it falls far behind, lines are dropped rather than memory growing (tracing-appender's
//! bounded, lossy buffer). The returned [`WorkerGuard`] flushes on drop: keep it alive until the
//! process exits.
//!
//! The filter is an `EnvFilter` directive. `RUST_LOG`, when set and non-empty, wins over the
//! configured `log_level`, so a user can turn on `debug` for one run without editing the config.
//!
//! Only the binary calls [`init`] (CONVENTIONS §7); libraries only emit events.

use std::io::IsTerminal;
use std::path::PathBuf;

pub use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::data_dir::DataDir;

/// The environment variable whose filter overrides `log_level`.
pub const LOG_ENV: &str = "RUST_LOG";

/// Log files are `<prefix>.<date>.<suffix>`.
const FILE_PREFIX: &str = "blendnet";
const FILE_SUFFIX: &str = "log";

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `RUST_LOG` is set but is not a valid filter.
    #[error("invalid {LOG_ENV} filter {value:?}")]
    BadEnv {
        /// The variable's value.
        value: String,
        /// The parser's reason.
        source: tracing_subscriber::filter::ParseError,
    },
    /// The configured `log_level` is not a valid filter.
    #[error("invalid value for `log_level`: {value:?} is not a log filter")]
    BadLevel {
        /// The configured value.
        value: String,
        /// The parser's reason.
        source: tracing_subscriber::filter::ParseError,
    },
    /// `max_log_files` is zero.
    #[error("invalid value for `max_log_files`: must be at least 1")]
    NoLogFiles,
    /// The log directory could not be created.
    #[error("cannot create the log directory {dir}")]
    Dir {
        /// The log directory.
        dir: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// The log file could not be created.
    #[error("cannot create log files in {dir}")]
    Files {
        /// The log directory.
        dir: PathBuf,
        /// tracing-appender's reason.
        source: tracing_appender::rolling::InitError,
    },
    /// A global subscriber is already installed (`init` called twice).
    #[error("logging is already initialised")]
    AlreadyInitialised(#[source] tracing_subscriber::util::TryInitError),
}

/// Installs the global subscriber: stderr plus daily files in `<data dir>/logs/`, filtered by
/// `RUST_LOG` if set, else by `level`. Returns the guard that flushes the file writer on drop.
pub fn init(
    data_dir: &DataDir,
    level: &str,
    max_files: usize,
) -> Result<WorkerGuard, LoggingError> {
    let rust_log = std::env::var(LOG_ENV).ok();
    let filter = filter(level, rust_log.as_deref())?;
    let (writer, guard) = tracing_appender::non_blocking(file_appender(data_dir, max_files)?);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false),
        )
        .try_init()
        .map_err(LoggingError::AlreadyInitialised)?;
    Ok(guard)
}

/// The filter: `rust_log` (the value of `RUST_LOG`) when set and non-empty, else `level`.
pub fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, LoggingError> {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        Some(value) => EnvFilter::try_new(value).map_err(|source| LoggingError::BadEnv {
            value: value.to_owned(),
            source,
        }),
        None => EnvFilter::try_new(level).map_err(|source| LoggingError::BadLevel {
            value: level.to_owned(),
            source,
        }),
    }
}

/// The daily-rotating file writer in `<data dir>/logs/`, keeping `max_files` files.
pub fn file_appender(
    data_dir: &DataDir,
    max_files: usize,
) -> Result<RollingFileAppender, LoggingError> {
    if max_files == 0 {
        return Err(LoggingError::NoLogFiles);
    }
    let dir = data_dir.logs();
    // The appender prunes old files as it starts and complains (on stderr) when the directory
    // is missing: make it first.
    std::fs::create_dir_all(&dir).map_err(|source| LoggingError::Dir {
        dir: dir.clone(),
        source,
    })?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(FILE_PREFIX)
        .filename_suffix(FILE_SUFFIX)
        .max_log_files(max_files)
        .build(&dir)
        .map_err(|source| LoggingError::Files { dir, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn rust_log_wins_over_level() {
        let f = filter("info", Some("debug")).unwrap();
        assert_eq!(f.max_level_hint(), Some(LevelFilter::DEBUG));
        let f = filter("info", None).unwrap();
        assert_eq!(f.max_level_hint(), Some(LevelFilter::INFO));
        // An empty RUST_LOG counts as unset.
        let f = filter("warn", Some("  ")).unwrap();
        assert_eq!(f.max_level_hint(), Some(LevelFilter::WARN));
    }

    #[test]
    fn bad_filters_name_their_source() {
        let err = filter("info,x=[", None).unwrap_err();
        assert!(matches!(err, LoggingError::BadLevel { .. }));
        assert!(err.to_string().contains("`log_level`"), "{err}");
        let err = filter("info", Some("x=[")).unwrap_err();
        assert!(matches!(err, LoggingError::BadEnv { .. }));
        assert!(err.to_string().contains("RUST_LOG"), "{err}");
    }

    #[test]
    fn files_go_to_logs_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let mut appender = file_appender(&dir, 3).unwrap();
        appender.write_all(b"hello log\n").unwrap();
        appender.flush().unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.logs())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("blendnet.") && name.ends_with(".log"),
            "{name}"
        );
        assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), "hello log\n");
    }

    #[test]
    fn zero_files_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        assert!(matches!(
            file_appender(&dir, 0),
            Err(LoggingError::NoLogFiles)
        ));
    }

    /// The only test that installs the global subscriber (one per process).
    #[test]
    fn init_logs_to_file_and_refuses_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let guard = init(&dir, "info", 2).unwrap();
        // `error` passes whatever RUST_LOG the test runner has set.
        tracing::error!(marker = "f00d", "logging works");
        drop(guard); // flushes
        let text: String = std::fs::read_dir(dir.logs())
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        assert!(text.contains("logging works"), "{text}");
        assert!(text.contains("f00d"), "{text}");
        assert!(matches!(
            init(&dir, "info", 2),
            Err(LoggingError::AlreadyInitialised(_))
        ));
    }
}
