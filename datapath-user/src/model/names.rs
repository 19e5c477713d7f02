//! The names the datapath accepts and hands out: container names,
//! interface names, and the host-side veth names of containers.

use std::fmt;

/// The longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// The longest container name.
pub const MAX_CONTAINER_NAME_LEN: usize = 64;

/// Prefix of the host-side veth of every container (`dp<id in hex>`).
pub const HOST_VETH_PREFIX: &str = "dp";

/// Prefix of the names of the containers the CNI plugin makes. They are the
/// plugin's: the command line refuses to add them
/// ([`validate_cli_container_name`]), so that a typo cannot take over or
/// shadow a runtime's attachment.
pub const CNI_NAME_PREFIX: &str = "cni-";

/// A name that is refused, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {name:?}: {reason}")]
pub struct InvalidName {
    /// What kind of name it is.
    pub kind: NameKind,
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The kinds of names checked here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// A container's name (the API's and the CLI's).
    Container,
    /// A network interface's name.
    Interface,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Container => "container name",
            Self::Interface => "interface name",
        })
    }
}

/// Checks a container name: 1-64 characters of `A-Z a-z 0-9 _ . -`.
pub fn validate_container_name(name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CONTAINER_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            kind: NameKind::Container,
            name: name.to_owned(),
            reason: "use 1-64 characters of A-Z a-z 0-9 _ . -",
        })
    }
}

/// Checks a container name typed on the command line: a valid name
/// ([`validate_container_name`]) that is not one of the CNI plugin's
/// ([`CNI_NAME_PREFIX`]).
pub fn validate_cli_container_name(name: &str) -> Result<(), InvalidName> {
    validate_container_name(name)?;
    if name.starts_with(CNI_NAME_PREFIX) {
        return Err(InvalidName {
            kind: NameKind::Container,
            name: name.to_owned(),
            reason: "names starting with \"cni-\" belong to the CNI plugin; \
                     remove it with the runtime that made it",
        });
    }
    Ok(())
}

/// Checks an interface name the way the kernel's `dev_valid_name` does:
/// 1-15 bytes, not `.` or `..`, no `/`, `:`, NUL or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), InvalidName> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("not a valid name")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        Some("contains '/', ':', a NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidName {
            kind: NameKind::Interface,
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The host-side veth name of the container with id `id`.
pub fn host_veth_name(id: u32) -> String {
    format!("{HOST_VETH_PREFIX}{id:x}")
}

/// Whether `name` is a host-side veth name the agent hands out
/// (`dp<hex>`), so that one of no known container is the agent's orphan.
pub fn is_host_veth_name(name: &str) -> bool {
    name.strip_prefix(HOST_VETH_PREFIX)
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_are_validated() {
        assert!(validate_container_name("web-1.a_b").is_ok());
        assert!(validate_container_name(&"x".repeat(64)).is_ok());
        assert!(validate_container_name("").is_err());
        assert!(validate_container_name("a/b").is_err());
        assert!(validate_container_name("a b").is_err());
        assert!(validate_container_name(&"x".repeat(65)).is_err());
        let e = validate_container_name("bad/name").expect_err("refused");
        assert!(e.to_string().starts_with("invalid container name"), "{e}");
    }

    #[test]
    fn the_command_line_refuses_the_cni_plugins_names() {
        validate_cli_container_name("web").expect("a plain name");
        validate_cli_container_name("cnix").expect("only the prefix with its dash");
        let e = validate_cli_container_name("cni-2c066063-x").expect_err("the plugin's");
        assert!(e.to_string().contains("CNI plugin"), "{e}");
        assert!(validate_cli_container_name("a/b").is_err());
    }

    #[test]
    fn interface_names_follow_the_kernels_rules() {
        validate_ifname("eth0").expect("a plain name");
        validate_ifname("dp0123456789abc").expect("15 bytes is the limit");
        for bad in [
            "",
            "dp0123456789abcd",
            "a/b",
            "a b",
            "a\tb",
            "eth0:1",
            ".",
            "..",
        ] {
            let e = validate_ifname(bad).expect_err(bad);
            assert_eq!(e.kind, NameKind::Interface);
            assert!(e.to_string().starts_with("invalid interface name"), "{e}");
        }
    }

    #[test]
    fn only_dp_hex_names_count_as_host_veths() {
        assert_eq!(host_veth_name(0x1f3a), "dp1f3a");
        assert!(is_host_veth_name(&host_veth_name(1)));
        assert!(is_host_veth_name("dp1f3a"));
        assert!(!is_host_veth_name("dp"));
        assert!(!is_host_veth_name("dpdk0"));
        assert!(!is_host_veth_name("eth0"));
        validate_ifname(&host_veth_name(u32::MAX)).expect("every id gives a valid name");
    }
}
