//! Generates the Rust types, clients and servers from the `.proto` files,
//! and the encoded descriptor set that the reflection service serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "weft/watcher/v1/watcher.proto",
    "weft/ipam/v1/ipam.proto",
    "weft/identity/v1/identity.proto",
    "weft/datapath/v1/datapath.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // Maps as BTreeMap: equal messages then encode to equal bytes, which
        // lets svc-watcher and the subscribers keep objects encoded.
        .btree_map(".")
        .file_descriptor_set_path(out.join("weft_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
