//! Running child processes: echo what runs, turn failures into errors that
//! name the command.

use std::{
    ffi::OsStr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, ensure};

/// Renders `cmd` as a shell-like line: the variables it sets explicitly
/// (except `PATH`), the program and its arguments.
pub fn describe(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        let value = value?;
        (key != "PATH").then(|| format!("{}={}", key.display(), value.display()))
    });
    let program = std::iter::once(cmd.get_program().display().to_string());
    let args = cmd.get_args().map(|arg| arg.display().to_string());
    envs.chain(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio after echoing it; fails unless it exits
/// successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    println!("running: {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    ensure!(status.success(), "`{line}` failed ({status})");
    Ok(())
}

/// Runs `cmd` quietly and returns its standard output; on failure the error
/// carries its standard error.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    ensure!(
        out.status.success(),
        "`{line}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Whether `program` starts and exits successfully when asked for its
/// version; a binary whose shared libraries vanished fails this.
pub fn runs(program: &Path) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Replaces this process with `cmd` (echoed first), so that signals such as
/// Ctrl-C reach the program directly. Returns only on failure.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    let line = describe(cmd);
    println!("running: {line}");
    anyhow!(cmd.exec()).context(format!("could not start `{line}`"))
}

/// Whether `path` is a regular file with an execute bit set.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The first executable named `name` in `dirs`, like `which`.
pub fn find_in<I, D>(name: &str, dirs: I) -> Option<PathBuf>
where
    I: IntoIterator<Item = D>,
    D: AsRef<Path>,
{
    dirs.into_iter()
        .map(|dir| dir.as_ref().join(name))
        .find(|candidate| is_executable(candidate))
}

/// The first executable named `name` on the search path `path`.
pub fn find_on_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    find_in(name, std::env::split_paths(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_set_variables_but_not_path() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--workspace"])
            .env("PATH", "/bin")
            .env("DATAPATH_BIN", "/t/datapath");
        assert_eq!(
            describe(&cmd),
            "DATAPATH_BIN=/t/datapath cargo test --workspace"
        );
    }

    #[test]
    fn find_in_skips_missing_and_non_executable_files() {
        let dir = std::env::temp_dir().join(format!("xtask-find-in-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let plain = dir.join("tool");
        std::fs::write(&plain, "").expect("write file");
        assert_eq!(find_in("tool", [&dir]), None, "file without execute bit");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(
            find_in(
                "tool",
                ["/nonexistent", dir.as_path().to_str().expect("utf-8")]
            ),
            Some(plain)
        );
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
    }
}
