//! The CNI plugin's network configuration (what a runtime writes on the
//! plugin's stdin), from any bytes: it decodes or is refused with a CNI
//! error; a decoded one yields only valid port mappings and limits, and
//! every accessor the plugin calls answers without a panic.
#![no_main]

use datapath::{cni::config::NetConf, model::PortMapping};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let conf = match NetConf::parse(data) {
        Ok(conf) => conf,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let _ = conf.agent_socket();
    if let Ok(mappings) = conf.port_mappings() {
        for (i, m) in mappings.iter().enumerate() {
            assert!(
                m.host_port >= 1 && m.container_port >= 1 && m.count == 1,
                "{m:?}"
            );
            let shown = m.to_string();
            assert_eq!(shown.parse::<PortMapping>().as_ref(), Ok(m));
            assert!(!mappings[..i].contains(m), "{m} twice");
        }
    }
    if let Ok(limits) = conf.limits() {
        for l in [&limits.ingress, &limits.egress].into_iter().flatten() {
            assert!(
                l.rate.ends_with("bit") && l.burst.as_ref().is_none_or(|b| b.ends_with('b')),
                "{l:?}"
            );
        }
    }
    let _ = conf.cgroup("0123456789abcdef");
    let _ = conf.prev_result();
    let _ = conf.valid_attachments();
});
