//! Logs to the config's `logFile`, never to stdout: stdout carries the CNI
//! protocol, and a stray line there breaks the runtime's JSON parsing.
//! Without a `logFile` nothing is set up and logging costs nothing.

use std::{fs::OpenOptions, sync::Mutex};

use tracing::level_filters::LevelFilter;

use crate::config::{LogLevel, NetConf};

/// Installs the file logger if the config names a file. A file that cannot
/// be opened is reported on stderr (which runtimes capture) and otherwise
/// ignored: logging must not fail a CNI call.
pub fn init(conf: &NetConf) {
    let Some(path) = &conf.log_file else {
        return;
    };
    let file = match OpenOptions::new().create(true).append(true).open(path) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("weft-cni: cannot open logFile {}: {e}", path.display());
            return;
        }
    };
    let level = match conf.log_level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    // Fails only if a logger is already installed (tests running several
    // invocations in one process); the first one keeps logging.
    let _ = tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_max_level(level)
        .try_init();
}
