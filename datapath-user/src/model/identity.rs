//! What the agent recognises as its own, and as the same thing it saw
//! before: a network namespace's identity ([`NetnsId`], its device and
//! inode, which no path can fake) and the tag it puts on every veth it
//! makes ([`VETH_GROUP`] and the [`VethTag`] in the interface alias).
//!
//! A path such as `/proc/PID/ns/net` or `/var/run/netns/NAME` can come to
//! name another namespace (the PID is reused, the name re-created); the
//! identity cannot. A veth name can be taken by anyone; the tag says the
//! agent made the link, and for which container.

use std::{fmt, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

use super::names::{MAX_IFNAME_LEN, validate_container_name, validate_ifname};

/// The interface group of every host-side veth the agent creates (`ip link
/// show group 0x64707468`). Set in the very message that creates the veth,
/// so that no veth of the agent's is ever without it; only links in this
/// group are the agent's to remove.
pub const VETH_GROUP: u32 = 0x6470_7468;

/// The longest interface alias the kernel keeps (IFALIASZ minus the NUL).
pub const MAX_ALIAS_LEN: usize = 255;

/// A network namespace's identity: the device and inode of its nsfs file,
/// as `stat` reports them for `/proc/PID/ns/net` or a bind mount of it.
/// Two paths name the same namespace exactly when their identities are
/// equal; a namespace's identity is never given to another while it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NetnsId {
    /// `st_dev` of the namespace file (nsfs).
    pub dev: u64,
    /// `st_ino` of the namespace file: the namespace's inode number.
    pub ino: u64,
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

impl FromStr for NetnsId {
    type Err = String;

    /// `DEV:INO`, both decimal.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid namespace identity {s:?}: expected DEV:INO");
        let (dev, ino) = s.split_once(':').ok_or_else(bad)?;
        let num = |t: &str| {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse::<u64>().ok()
        };
        Ok(Self {
            dev: num(dev).ok_or_else(bad)?,
            ino: num(ino).ok_or_else(bad)?,
        })
    }
}

/// What the alias of a container's host-side veth records: enough to know
/// the container again if the state file is lost (its id, name, interface
/// inside, and namespace by identity and path).
///
/// The alias reads `datapath id=<id> ns=<dev>:<ino> if=<ifname>
/// name=<name> path=<netns path>`; the path comes last and runs to the end,
/// so it may contain spaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethTag {
    /// The container's id.
    pub id: u32,
    /// The container's name.
    pub name: String,
    /// Its interface inside its namespace.
    pub ifname: String,
    /// Its namespace's identity.
    pub netns_id: NetnsId,
    /// Its namespace's path.
    pub netns: PathBuf,
}

/// The first word of every tag.
const TAG_MAGIC: &str = "datapath";

impl fmt::Display for VethTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TAG_MAGIC} id={} ns={} if={} name={} path={}",
            self.id,
            self.netns_id,
            self.ifname,
            self.name,
            self.netns.display()
        )
    }
}

impl VethTag {
    /// The alias text, or `None` if it would not fit in an alias (the
    /// namespace path is checked to be short enough when a container is
    /// added, so this does not happen to the agent's own containers).
    pub fn alias(&self) -> Option<String> {
        let text = self.to_string();
        (text.len() <= MAX_ALIAS_LEN && self.netns.to_str().is_some()).then_some(text)
    }

    /// Reads an alias; `None` if it is not a tag the agent writes, or any
    /// part of it is invalid.
    pub fn parse(alias: &str) -> Option<Self> {
        if alias.len() > MAX_ALIAS_LEN {
            return None;
        }
        let rest = alias.strip_prefix(TAG_MAGIC)?.strip_prefix(' ')?;
        let (path_part, path) = match rest.find(" path=") {
            Some(i) => (&rest[..i], &rest[i + " path=".len()..]),
            None => return None,
        };
        let mut id = None;
        let mut netns_id = None;
        let mut ifname = None;
        let mut name = None;
        for word in path_part.split(' ') {
            let (key, value) = word.split_once('=')?;
            let slot_filled = match key {
                "id" => id.replace(value.parse::<u32>().ok()?).is_some(),
                "ns" => netns_id.replace(value.parse::<NetnsId>().ok()?).is_some(),
                "if" => ifname.replace(value.to_owned()).is_some(),
                "name" => name.replace(value.to_owned()).is_some(),
                _ => return None,
            };
            if slot_filled {
                return None;
            }
        }
        let (id, netns_id, ifname, name) = (id?, netns_id?, ifname?, name?);
        if id == 0
            || validate_container_name(&name).is_err()
            || ifname.len() > MAX_IFNAME_LEN
            || validate_ifname(&ifname).is_err()
            || !path.starts_with('/')
            || path.bytes().any(|b| b.is_ascii_control())
        {
            return None;
        }
        Some(Self {
            id,
            name,
            ifname,
            netns_id,
            netns: PathBuf::from(path),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag() -> VethTag {
        VethTag {
            id: 0x1f,
            name: "web-1".into(),
            ifname: "eth0".into(),
            netns_id: NetnsId {
                dev: 4,
                ino: 4026532,
            },
            netns: "/var/run/netns/a b".into(),
        }
    }

    #[test]
    fn a_tag_reads_back_as_written() {
        let t = tag();
        let alias = t.alias().expect("fits");
        assert_eq!(
            alias,
            "datapath id=31 ns=4:4026532 if=eth0 name=web-1 path=/var/run/netns/a b"
        );
        assert_eq!(VethTag::parse(&alias), Some(t));
    }

    #[test]
    fn aliases_that_are_not_the_agents_tags_are_refused() {
        for alias in [
            "",
            "web server",
            "datapath",
            "datapath id=1 ns=1:2 if=eth0 name=x",
            "datapath id=0 ns=1:2 if=eth0 name=x path=/p",
            "datapath id=1 ns=1 if=eth0 name=x path=/p",
            "datapath id=1 ns=1:2 if=eth0 name=a/b path=/p",
            "datapath id=1 ns=1:2 if=e:0 name=x path=/p",
            "datapath id=1 ns=1:2 if=eth0 name=x path=relative",
            "datapath id=1 id=2 ns=1:2 if=eth0 name=x path=/p",
            "datapath id=1 ns=1:2 if=eth0 name=x extra=1 path=/p",
            "datapath id=1 ns=1:2 if=eth0 name=x path=/p\n",
            "xdatapath id=1 ns=1:2 if=eth0 name=x path=/p",
        ] {
            assert_eq!(VethTag::parse(alias), None, "{alias:?}");
        }
    }

    #[test]
    fn a_tag_too_long_for_an_alias_is_not_written() {
        let t = VethTag {
            netns: PathBuf::from(format!("/{}", "p".repeat(300))),
            ..tag()
        };
        assert_eq!(t.alias(), None);
    }

    #[test]
    fn namespace_identities_read_back_and_refuse_other_text() {
        let id = NetnsId { dev: 4, ino: 42 };
        assert_eq!(id.to_string().parse::<NetnsId>(), Ok(id));
        for bad in ["", "4", "4:", ":4", "a:1", "1:+2", "1:2:3", "-1:2"] {
            assert!(bad.parse::<NetnsId>().is_err(), "{bad:?}");
        }
    }
}
