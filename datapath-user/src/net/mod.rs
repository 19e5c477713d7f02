//! The kernel's network objects the datapath configures and reads, over
//! rtnetlink: container veth pairs with their addresses and routes
//! ([`link`]), reading links back ([`inspect`]), network namespaces
//! ([`netns`]), the node's address changes ([`watch`]), and the node's
//! own sockets and reserved ports ([`sockets`]).

pub mod inspect;
pub mod link;
pub mod netns;
pub mod sockets;
pub mod watch;

use nix::errno::Errno;

/// The errno of a netlink error answer, if the error is one.
pub fn errno(error: &rtnetlink::Error) -> Option<Errno> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message
            .code
            .map(|code| Errno::from_raw(code.get().saturating_abs())),
        _ => None,
    }
}

/// Whether the kernel answered that the link, address or route does not
/// exist (ENODEV or ENOENT).
pub fn is_not_found(error: &rtnetlink::Error) -> bool {
    matches!(errno(error), Some(Errno::ENODEV | Errno::ENOENT))
}
