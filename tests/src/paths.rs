//! Where the things under test live. Each accessor panics with the command
//! that fixes a missing piece: a test that cannot find Envoy must fail, not
//! pass without having run.

use std::env;
use std::path::{Path, PathBuf};

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    let tests_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| tests_dir.to_path_buf())
}

/// The team's shared folder (schemas and cases): `SLUICE_SHARED_DIR` if set,
/// else `../shared` beside the repository, else `/work/shared` (where it
/// lives on the team's machines, so a clone elsewhere, e.g. CI's, finds it).
pub fn shared_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(d) = env::var_os("SLUICE_SHARED_DIR").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(repo_root().join("..").join("shared"));
    candidates.push(PathBuf::from("/work/shared"));
    for dir in &candidates {
        if let Ok(d) = dir.canonicalize() {
            if d.join("schemas").is_dir() {
                return d;
            }
        }
    }
    panic!(
        "the shared folder is missing: looked in {:?}; set SLUICE_SHARED_DIR to the folder \
         holding schemas/istio-wasmplugin-crd.yaml",
        candidates
    )
}

/// The `sluice` service binary, from `SLUICE_BIN` (set by `make test`).
pub fn sluice_bin() -> PathBuf {
    required_file_from_env("SLUICE_BIN", "the quota service binary", "make build")
}

/// The filter module, from `SLUICE_WASM` (set by `make test`).
pub fn sluice_wasm() -> PathBuf {
    required_file_from_env(
        "SLUICE_WASM",
        "the filter module dist/sluice.wasm",
        "make wasm",
    )
}

/// The Envoy binary: `ENVOY_BIN` if set, else `envoy` on PATH.
pub fn envoy_bin() -> PathBuf {
    binary_from_env_or_path("ENVOY_BIN", "envoy")
}

/// The Redis server binary: `REDIS_SERVER_BIN` if set, else `redis-server` on PATH.
pub fn redis_server_bin() -> PathBuf {
    binary_from_env_or_path("REDIS_SERVER_BIN", "redis-server")
}

fn required_file_from_env(var: &str, what: &str, fix: &str) -> PathBuf {
    let Some(raw) = env::var_os(var).filter(|v| !v.is_empty()) else {
        panic!(
            "{var} is not set: the e2e tests need {what}. Run the tests with `make test`, \
             or build it with `{fix}` and export {var}=<absolute path>"
        );
    };
    let path = PathBuf::from(raw);
    let path = if path.is_absolute() {
        path
    } else {
        repo_root().join(path)
    };
    if !path.is_file() {
        panic!(
            "{var}={} does not exist: the e2e tests need {what}. Build it with `{fix}`",
            path.display()
        );
    }
    path
}

fn binary_from_env_or_path(var: &str, name: &str) -> PathBuf {
    if let Some(raw) = env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(raw);
        if is_executable(&path) {
            return path;
        }
        panic!(
            "{var}={} is not an executable file (install it with `make deps`)",
            path.display()
        );
    }
    match which(name) {
        Some(p) => p,
        None => panic!(
            "`{name}` was not found on PATH and {var} is not set: the e2e tests need it. \
             Install it with `make deps`"
        ),
    }
}

/// The first executable `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
