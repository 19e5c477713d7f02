//! The agent's state file, from any bytes: a file the loader accepts can be
//! used as the agent uses it (listing its containers and their published
//! ports, checking new ports against them through the port index,
//! allocating the next address and id) without a panic or a wrapped-around
//! number.
#![no_main]

use datapath::store::{State, index::Ipam};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut state) = serde_json::from_slice::<State>(data) else {
        return;
    };
    let ids: Vec<u32> = state.containers().values().map(|c| c.id).collect();
    for c in state.containers().values() {
        for m in &c.publish {
            let shown = m.to_string();
            assert_eq!(shown.parse().as_ref(), Ok(m), "{c:?} publishes {shown}");
            assert_eq!(m.ports().count(), usize::from(m.count));
            // Accepted mappings never overlap: the index finds each one as
            // its own container's.
            assert_eq!(
                state.ports().overlap(m),
                Some((c.name.as_str(), m)),
                "{c:?} publishes {m}"
            );
        }
    }
    let pool = "198.19.0.0/28".parse().expect("a pool");
    let ipam = Ipam::new(pool, state.containers().values().map(|c| c.addr));
    if let Some(addr) = ipam.lowest() {
        assert!(!state.containers().values().any(|c| c.addr == addr));
    }
    let id = state.take_id();
    assert!(id != 0, "id 0 means no container");
    assert!(!ids.contains(&id), "id {id} handed out twice");
});
