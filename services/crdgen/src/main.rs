//! `crdgen [--out PATH]`: writes the `FederatedJob` CustomResourceDefinition as YAML.
//!
//! The chart's copy is generated with
//! `cargo run -p cohort-crdgen -- --out charts/cohort-server/crds/federatedjob.yaml`;
//! a test fails when it differs from what this prints.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Print (or write) the FederatedJob CRD.
#[derive(Debug, Parser)]
#[command(name = "crdgen", version)]
struct Args {
    /// Write to this file instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let yaml = cohort_crdgen::crd_yaml()?;
    match args.out {
        Some(path) => std::fs::write(&path, yaml)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{yaml}"),
    }
    Ok(())
}
