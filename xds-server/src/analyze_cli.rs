//! `xds-server analyze DIR`: the config folder checked offline exactly as `serve` loads
//! it (the same parser, per-object validation and cross-object stages), like `istioctl
//! analyze`. Every error is printed with its file, document, line, object and field; the
//! command fails when there is one, so it can gate a commit or a CI step. Warnings (config
//! that takes effect but routes nothing, such as a rule naming a missing delegate
//! VirtualService) are printed too, and do not fail it.

use anyhow::{bail, Result};
use clap::ValueEnum;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use xds_server::config::{ConfigError, ConfigWarning};
use xds_server::mesh::MeshStore;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    /// One line per error, then a summary.
    Text,
    /// One JSON object: `dir`, `valid`, `objects` (in effect, per kind), `errors`,
    /// `warnings`.
    Json,
}

#[derive(Serialize)]
struct Report<'a> {
    dir: String,
    valid: bool,
    objects: &'a BTreeMap<&'static str, usize>,
    errors: &'a [ConfigError],
    warnings: &'a [ConfigWarning],
}

pub fn analyze(dir: &Path, output: Output) -> Result<()> {
    let (store, _) = MeshStore::open(dir)?;
    let errors = store.errors();
    let mesh = store.mesh();
    let mut out = String::new();
    match output {
        Output::Text => {
            for e in &errors {
                out.push_str(&format!("{e}\n"));
            }
            for w in mesh.warnings.iter() {
                out.push_str(&format!("warning: {w}\n"));
            }
            let objects: usize = mesh.counts.values().sum();
            out.push_str(&format!(
                "{}: {objects} objects in effect, {} errors, {} warnings\n",
                dir.display(),
                errors.len(),
                mesh.warnings.len()
            ));
        }
        Output::Json => {
            let report = Report {
                dir: dir.display().to_string(),
                valid: errors.is_empty(),
                objects: &mesh.counts,
                errors: &errors,
                warnings: &mesh.warnings,
            };
            out = serde_json::to_string_pretty(&report)? + "\n";
        }
    }
    // A reader that stops early (`| head`) is not an error of the analysis.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    if !errors.is_empty() {
        bail!("{} has {} errors", dir.display(), errors.len());
    }
    Ok(())
}
