//! Locates the Envoy API descriptor set shipped inside the `envoy-types` crate so the
//! admin API and golden tests can render resources as proto3 JSON (what Envoy's own
//! config_dump shows) without vendoring Envoy's .proto files into this repository.
use std::path::PathBuf;

const ENVOY_TYPES_VERSION: &str = "0.7.7";

fn main() {
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_DESCRIPTORS");
    if let Ok(p) = std::env::var("ENVOY_TYPES_DESCRIPTORS") {
        println!("cargo:rustc-env=ENVOY_TYPES_DESCRIPTORS={p}");
        return;
    }
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    let src = cargo_home.join("registry").join("src");
    let rel = format!("envoy-types-{ENVOY_TYPES_VERSION}/src/generated/types.bin");
    let found = std::fs::read_dir(&src)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(&rel))
        .find(|p| p.is_file());
    match found {
        Some(p) => println!("cargo:rustc-env=ENVOY_TYPES_DESCRIPTORS={}", p.display()),
        None => panic!(
            "cannot find {rel} under {}: set ENVOY_TYPES_DESCRIPTORS to the envoy-types descriptor set",
            src.display()
        ),
    }
}
