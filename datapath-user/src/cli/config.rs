//! The agent's configuration file: `/etc/datapath/agent.toml`, or the file
//! `datapath agent --config PATH` names.
//!
//! Every flag of `datapath agent` is a key, spelled as the flag without
//! its dashes; a flag given on the command line (or through its
//! environment variable) wins over the file:
//!
//! ```toml
//! uplink = "eth0"
//! node-ip = "198.18.0.2"
//! pool = "10.88.0.0/16"
//! non-masquerade-cidr = ["10.96.0.0/12", "10.244.0.0/16"]
//! no-masquerade = false
//! ct-max = 262144
//! ct-timeout-udp = "120s"
//! ```
//!
//! A key is turned into its flag and parsed by the same parser as the
//! command line, so the file takes exactly what the flags take: a string
//! or number for a flag with a value, `true` or `false` for a switch, an
//! array for a flag that may be repeated. An unknown key is an error that
//! lists the known ones. `datapath agent --check-config` reads the file
//! and the flags, checks them and prints the configuration that results
//! ([`effective`]) without starting anything.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{ArgMatches, Command, parser::ValueSource};

/// Where the agent looks for its configuration file unless `--config`
/// names one. A missing file there is no error.
pub const DEFAULT_CONFIG: &str = "/etc/datapath/agent.toml";

/// The agent's flags that are not settings (and so not keys): `--timeout`
/// is the client commands' wait for the agent's answer, a global flag the
/// agent ignores.
const NOT_KEYS: &[&str] = &[
    "config",
    "check-config",
    "cleanup",
    "help",
    "version",
    "timeout",
];

/// The agent subcommand's name.
const AGENT: &str = "agent";

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("read the configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// It is not TOML.
    #[error("configuration file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        message: String,
    },
    /// A key that is no flag of `datapath agent`.
    #[error("configuration file {}: unknown key {key:?} (keys are the flags of `datapath agent`: {})", path.display(), known.join(", "))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The keys there are.
        known: Vec<String>,
    },
    /// A value of the wrong kind for its key.
    #[error("configuration file {}: {key}: {message}", path.display())]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value the flag's parser refused.
    #[error("configuration file {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the flag).
        message: String,
    },
}

/// The configuration file the agent reads, and whether it must exist: the
/// one `--config` names (which must), else [`DEFAULT_CONFIG`] (if it does).
fn config_path(agent: &ArgMatches) -> (PathBuf, bool) {
    match agent.get_one::<PathBuf>("config") {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    }
}

/// The settings of the agent subcommand of `cmd`: its arguments that are
/// keys (every flag but `--config`, `--check-config`, `--cleanup`).
fn settings(agent: &Command) -> impl Iterator<Item = &clap::Arg> {
    agent.get_arguments().filter(|a| {
        a.get_long()
            .is_some_and(|l| !NOT_KEYS.contains(&l) && !a.is_positional())
    })
}

/// Whether the value of argument `id` came from the command line or the
/// environment (which win over the file).
fn given(top: &ArgMatches, agent: &ArgMatches, id: &str) -> bool {
    // `try_get_raw` first: `value_source` panics on an id the matches do
    // not know (the agent's own flags at the top level).
    [top, agent].iter().any(|m| {
        m.try_get_raw(id).is_ok()
            && matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
    })
}

/// The command-line arguments of the TOML value `value` of key `key`.
fn to_args(
    path: &Path,
    arg: &clap::Arg,
    key: &str,
    value: &toml::Value,
) -> Result<Vec<OsString>, ConfigError> {
    let bad = |message: String| ConfigError::Value {
        path: path.to_owned(),
        key: key.to_owned(),
        message,
    };
    let flag = format!("--{key}");
    let takes_values = arg.get_action().takes_values();
    let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            other => Err(bad(format!(
                "expected a string or a number, found {}",
                other.type_str()
            ))),
        }
    };
    if !takes_values {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![flag.into()]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            other => Err(bad(format!(
                "a switch: expected true or false, found {}",
                other.type_str()
            ))),
        };
    }
    let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
    let values = match value {
        toml::Value::Array(items) if repeatable => {
            items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?
        }
        toml::Value::Array(_) => {
            return Err(bad("takes one value, not an array".to_owned()));
        }
        v => vec![scalar(v)?],
    };
    Ok(values
        .into_iter()
        .map(|v| OsString::from(format!("{flag}={v}")))
        .collect())
}

/// What [`load`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The arguments with the file's settings added.
    pub args: Vec<OsString>,
    /// The file read, if one was.
    pub path: Option<PathBuf>,
}

/// Adds the configuration file's settings to `args` (the whole command
/// line, program name first) where the command is `datapath agent`: each
/// key not given as a flag becomes its flag. Other commands are returned
/// unchanged.
pub fn load(cmd: &Command, args: Vec<OsString>) -> Result<Loaded, ConfigError> {
    let mut cmd = cmd.clone();
    cmd.build();
    // Parse errors (and --help) are left to the real parse that follows.
    let Ok(top) = cmd.clone().try_get_matches_from(&args) else {
        return Ok(Loaded { args, path: None });
    };
    let Some(agent_matches) = top.subcommand_matches(AGENT) else {
        return Ok(Loaded { args, path: None });
    };
    let Some(agent_cmd) = cmd.find_subcommand(AGENT) else {
        return Ok(Loaded { args, path: None });
    };
    let (path, explicit) = config_path(agent_matches);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(Loaded { args, path: None });
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let known: Vec<&clap::Arg> = settings(agent_cmd).collect();
    let mut extra = Vec::new();
    for (key, value) in &table {
        let Some(arg) = known.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            return Err(ConfigError::UnknownKey {
                path,
                key: key.clone(),
                known: known
                    .iter()
                    .filter_map(|a| a.get_long().map(str::to_owned))
                    .collect(),
            });
        };
        if given(&top, agent_matches, arg.get_id().as_str()) {
            continue;
        }
        extra.extend(to_args(&path, arg, key, value)?);
    }
    let mut merged = args;
    merged.extend(extra);
    // The values are checked by the flags' own parsers.
    if let Err(e) = cmd.try_get_matches_from(&merged) {
        // clap's first line, without its `error: ` and usage hints.
        let text = e.render().to_string();
        let line = text.lines().next().unwrap_or_default();
        return Err(ConfigError::Invalid {
            path,
            message: line.trim_start_matches("error: ").to_owned(),
        });
    }
    Ok(Loaded {
        args: merged,
        path: Some(path),
    })
}

/// The configuration `args` come to for `datapath agent` (the file's
/// settings already added by [`load`]), as a TOML table with every key:
/// what `--check-config` prints. Settings without a value are left out.
pub fn effective(cmd: &Command, args: &[OsString]) -> Result<toml::Table, clap::Error> {
    let mut cmd = cmd.clone();
    cmd.build();
    let top = cmd.clone().try_get_matches_from(args)?;
    let mut table = toml::Table::new();
    let (Some(agent), Some(agent_cmd)) =
        (top.subcommand_matches(AGENT), cmd.find_subcommand(AGENT))
    else {
        return Ok(table);
    };
    for arg in settings(agent_cmd) {
        let (Some(key), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        let value = if arg.get_action().takes_values() {
            let raw: Vec<String> = [agent, &top]
                .into_iter()
                .find_map(|m| m.try_get_raw(id).ok().flatten())
                .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            if matches!(arg.get_action(), clap::ArgAction::Append) {
                toml::Value::Array(raw.into_iter().map(toml::Value::String).collect())
            } else if let Some(v) = raw.into_iter().next() {
                toml::Value::String(v)
            } else {
                continue;
            }
        } else {
            toml::Value::Boolean(agent.get_flag(id))
        };
        table.insert(key.to_owned(), value);
    }
    Ok(table)
}
