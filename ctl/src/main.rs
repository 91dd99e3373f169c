//! The `weftctl` executable.

use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;

fn main() -> ExitCode {
    let mut cli = weftctl::Cli::parse();
    match cli.tls_files.load() {
        Ok(tls) => cli.tls = tls,
        Err(e) => {
            eprintln!("weftctl: {e}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Followed flows print as they arrive rather than at the end.
    if let weftctl::Command::Flows(args) = &cli.command
        && args.follow
    {
        let printed = runtime.block_on(weftctl::flows(&cli, args, |line| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }));
        return match printed {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weftctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(weftctl::run(&cli)) {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(report.text.as_bytes());
            let _ = out.flush();
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("weftctl: {e}");
            ExitCode::FAILURE
        }
    }
}
