//! The workspace as cargo sees it: where it is, where it builds, and the
//! cargo commands run on it.

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{
    bootstrap::Tools,
    cmd::{output, run},
};

/// The crate that only builds for the BPF target; host commands skip it
/// (datapath-user's build script builds it).
const EBPF_CRATE: &str = "datapath-ebpf";

/// Arguments selecting every host crate of the workspace.
pub const HOST_CRATES: [&str; 3] = ["--workspace", "--exclude", EBPF_CRATE];

/// A cargo build profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// The flag that selects this profile, if any.
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Self::Debug => None,
            Self::Release => Some("--release"),
        }
    }

    /// The profile's subdirectory of the target directory.
    fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// The workspace and the environment its commands run in.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    cargo: OsString,
    path: OsString,
}

impl Workspace {
    pub fn new(tools: &Tools) -> Self {
        // `cargo run` sets CARGO_MANIFEST_DIR to xtask's directory; the
        // compile-time value serves when the binary runs on its own.
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        let root = manifest_dir
            .parent()
            .map_or_else(|| manifest_dir.clone(), Path::to_path_buf);
        // The cargo that runs xtask, so nested commands use its toolchain.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Self {
            root,
            cargo,
            path: tools.path.clone(),
        }
    }

    /// The `PATH` child processes get.
    pub fn path(&self) -> &OsStr {
        &self.path
    }

    /// `cargo ARGS` in the workspace root.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args)
            .current_dir(&self.root)
            .env("PATH", &self.path);
        cmd
    }

    /// `rustup run nightly cargo ARGS` in the workspace root (cargo-fuzz
    /// needs nightly's sanitizer flags).
    pub fn nightly_cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo"])
            .args(args)
            .current_dir(&self.root)
            .env("PATH", &self.path);
        cmd
    }

    /// The workspace's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory cargo builds into (honours `CARGO_TARGET_DIR`).
    pub fn target_dir(&self) -> Result<PathBuf> {
        let metadata = output(&mut self.cargo(["metadata", "--format-version", "1", "--no-deps"]))?;
        target_directory(&metadata)
    }

    /// Builds every host binary and test, and with them the eBPF object.
    pub fn build(&self, profile: Profile) -> Result<()> {
        let mut cmd = self.cargo(["build"]);
        cmd.args(HOST_CRATES)
            .args(["--bins", "--tests"])
            .args(profile.flag());
        run(&mut cmd).context("the build failed")
    }

    /// The path of binary `name` built with `profile`.
    pub fn binary(&self, profile: Profile, name: &str) -> Result<PathBuf> {
        Ok(self.target_dir()?.join(profile.dir()).join(name))
    }
}

/// Reads `target_directory` from `cargo metadata` output.
fn target_directory(metadata: &str) -> Result<PathBuf> {
    let metadata: serde_json::Value =
        serde_json::from_str(metadata).context("cargo metadata printed invalid JSON")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_directory_is_read_from_metadata() {
        let metadata = r#"{"packages":[],"target_directory":"/w/target","version":1}"#;
        assert_eq!(
            target_directory(metadata).expect("parse"),
            PathBuf::from("/w/target")
        );
    }

    #[test]
    fn metadata_without_target_directory_is_an_error() {
        assert!(target_directory(r#"{"version":1}"#).is_err());
    }
}
