//! The `weft-cni` executable: runs one CNI command and exits.

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
};

use weft_cni::{CniError, config::SpecVersion, error::code, result::render_error};

fn main() -> ExitCode {
    // One command per process: a single-threaded runtime starts fastest.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let err = CniError::new(code::IO_FAILURE, "cannot start the async runtime")
                .with_details(e.to_string());
            return emit(&render_error(SpecVersion::LATEST, &err), 1);
        }
    };
    let outcome = runtime.block_on(weft_cni::run(
        |name| std::env::var(name).ok(),
        || {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map(|_| buf)
        },
    ));
    if std::env::var_os("CNI_COMMAND").is_none() {
        eprintln!(
            "weft CNI plugin v{}; CNI protocol versions supported: {}",
            env!("CARGO_PKG_VERSION"),
            SpecVersion::ALL.map(|v| v.as_str()).join(", ")
        );
    }
    emit(&outcome.stdout, outcome.exit_code)
}

fn emit(stdout: &str, exit_code: u8) -> ExitCode {
    let mut out = std::io::stdout().lock();
    if !stdout.is_empty() {
        let _ = writeln!(out, "{stdout}");
    }
    let _ = out.flush();
    ExitCode::from(exit_code)
}
