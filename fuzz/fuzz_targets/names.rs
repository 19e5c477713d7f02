//! The names and identities the agent checks before it acts: container
//! names (the API's and the command line's, which keeps off the CNI
//! plugin's), interface names, network namespace paths, namespace
//! identities and the tags on the agent's veths. Whatever a validator
//! accepts has the properties the agent relies on; whatever it refuses is
//! refused with a message quoting it; tags and identities read back as
//! written.
#![no_main]

use std::path::{Component, Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use datapath::{
    model::{
        identity::{MAX_ALIAS_LEN, NetnsId, VethTag},
        names::{
            CNI_NAME_PREFIX, MAX_CONTAINER_NAME_LEN, MAX_IFNAME_LEN, validate_cli_container_name,
            validate_container_name, validate_ifname,
        },
    },
    net::netns::{MAX_NETNS_PATH_LEN, NETNS_RUN_DIR, resolve},
};
use libfuzzer_sys::fuzz_target;

/// A tag built from its parts.
#[derive(Arbitrary, Debug)]
struct Parts {
    id: u32,
    name: String,
    ifname: String,
    dev: u64,
    ino: u64,
    netns: String,
}

fn names(text: &str) {
    match validate_container_name(text) {
        Ok(()) => {
            assert!(!text.is_empty() && text.len() <= MAX_CONTAINER_NAME_LEN);
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            );
        }
        Err(e) => assert!(e.to_string().contains(&format!("{text:?}")), "{e}"),
    }
    match validate_cli_container_name(text) {
        Ok(()) => {
            assert!(validate_container_name(text).is_ok());
            assert!(!text.starts_with(CNI_NAME_PREFIX));
        }
        Err(e) => assert!(e.to_string().contains(&format!("{text:?}")), "{e}"),
    }
    if let Ok(()) = validate_ifname(text) {
        assert!(!text.is_empty() && text.len() <= MAX_IFNAME_LEN);
        assert!(text != "." && text != "..");
        assert!(
            !text
                .bytes()
                .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
        );
    }
}

fn netns_spec(text: &str) {
    let Ok(path) = resolve(text) else {
        return;
    };
    assert!(path.is_absolute(), "{text:?} gave {}", path.display());
    assert!(path.as_os_str().len() <= MAX_NETNS_PATH_LEN, "{text:?}");
    assert!(
        !path.components().any(|c| matches!(c, Component::ParentDir)),
        "{text:?}"
    );
    let shown = path.to_string_lossy();
    assert!(!shown.bytes().any(|b| b.is_ascii_control()), "{text:?}");
    if !text.contains('/') {
        assert_eq!(path, Path::new(NETNS_RUN_DIR).join(text));
    }
}

fn alias(text: &str) {
    if let Some(tag) = VethTag::parse(text) {
        let written = tag.alias().expect("a parsed tag fits an alias");
        assert!(written.len() <= MAX_ALIAS_LEN);
        assert_eq!(VethTag::parse(&written), Some(tag), "{text:?}");
    }
    if let Ok(id) = text.parse::<NetnsId>() {
        assert_eq!(id.to_string().parse::<NetnsId>(), Ok(id));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        names(text);
        netns_spec(text);
        alias(text);
    }
    if let Ok(p) = Parts::arbitrary(&mut Unstructured::new(data)) {
        let tag = VethTag {
            id: p.id,
            name: p.name,
            ifname: p.ifname,
            netns_id: NetnsId {
                dev: p.dev,
                ino: p.ino,
            },
            netns: PathBuf::from(p.netns),
        };
        let valid = tag.id != 0
            && validate_container_name(&tag.name).is_ok()
            && validate_ifname(&tag.ifname).is_ok()
            && tag.netns.is_absolute()
            && !tag
                .netns
                .to_string_lossy()
                .bytes()
                .any(|b| b.is_ascii_control());
        if let Some(text) = tag.alias()
            && valid
        {
            assert_eq!(VethTag::parse(&text), Some(tag), "{text:?}");
        }
    }
});
