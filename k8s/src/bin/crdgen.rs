//! Writes the CRD YAML of weft's custom resources into the directory given
//! (`deploy/crds`), or prints it when none is given.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let files = weft_k8s::crd::crd_files().context("rendering the CRDs")?;
    match std::env::args_os().nth(1) {
        Some(dir) => {
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, yaml) in files {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
        None => {
            for (_, yaml) in files {
                println!("---\n{yaml}");
            }
        }
    }
    Ok(())
}
