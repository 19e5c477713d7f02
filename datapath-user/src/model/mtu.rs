//! A container link's MTU: the range the agent and the CNI plugin accept.

/// The smallest MTU (IPv4's minimum, RFC 791).
pub const MIN_MTU: u32 = 68;
/// The largest MTU a veth takes.
pub const MAX_MTU: u32 = 65535;

/// Checks an MTU asked for a container's veth pair.
pub fn validate_mtu(mtu: u32) -> Result<u32, String> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(mtu)
    } else {
        Err(format!(
            "mtu {mtu}: give {MIN_MTU}-{MAX_MTU} (IPv4 needs at least {MIN_MTU})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtus_outside_68_to_65535_are_refused() {
        assert_eq!(validate_mtu(1400), Ok(1400));
        assert_eq!(validate_mtu(68), Ok(68));
        assert_eq!(validate_mtu(65535), Ok(65535));
        assert!(validate_mtu(67).is_err());
        assert!(validate_mtu(0).is_err());
        assert!(
            validate_mtu(65536)
                .expect_err("too large")
                .contains("68-65535")
        );
    }
}
