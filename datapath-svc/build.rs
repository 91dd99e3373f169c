//! Compiles the eBPF programs under `bpf/` with clang, and runs a host-side
//! probe that records how C lays out every map key and value, for the layout
//! test in `src/maps.rs`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bpf = Path::new("bpf");
    for entry in walk(bpf) {
        println!("cargo:rerun-if-changed={}", entry.display());
    }
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch_include = format!("/usr/include/{}-linux-gnu", arch());

    run(Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-target",
            "bpf",
            "-I",
            &arch_include,
            "-c",
            "bpf/weft.bpf.c",
            "-o",
        ])
        .arg(out.join("weft.bpf.o")));

    let probe = out.join("layout_probe");
    run(
        Command::new(env::var("CC").unwrap_or_else(|_| "cc".to_string()))
            .args(["-Wall", "-I", &arch_include, "bpf/layout_probe.c", "-o"])
            .arg(&probe),
    );
    let layout = Command::new(&probe)
        .output()
        .expect("running the layout probe");
    assert!(layout.status.success(), "layout probe failed");
    std::fs::write(out.join("layout.rs"), layout.stdout).expect("writing layout.rs");
}

fn arch() -> &'static str {
    match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64",
        _ => "x86_64",
    }
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (is clang installed? see README.md)"));
    assert!(status.success(), "{cmd:?} failed");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}
