//! The CRD YAML checked in under `deploy/crds/` is what the types generate.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let files = weft_k8s::crd::crd_files().expect("CRDs render");
    assert_eq!(files.len(), 2);
    for (name, want) in files {
        let path = dir.join(&name);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is out of date with the Rust types; regenerate it with\n  cargo run -p weft-k8s --bin crdgen -- deploy/crds",
            path.display()
        );
    }
}
