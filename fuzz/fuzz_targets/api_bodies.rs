//! What crosses the agent's API socket, decoded from any bytes: a request
//! body the agent accepts re-encodes to an equal request, and the answers
//! the CLI decodes never make it panic.
#![no_main]

use datapath::api::{AddContainer, ApiError, ContainerInfo, Flow, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<AddContainer>(data) {
        let again = serde_json::to_vec(&req).expect("a request encodes");
        assert_eq!(
            serde_json::from_slice::<AddContainer>(&again).ok().as_ref(),
            Some(&req),
            "{}",
            String::from_utf8_lossy(&again)
        );
    }
    if let Ok(info) = serde_json::from_slice::<ContainerInfo>(data) {
        let again = serde_json::to_vec(&info).expect("an answer encodes");
        assert_eq!(
            serde_json::from_slice::<ContainerInfo>(&again)
                .ok()
                .as_ref(),
            Some(&info)
        );
    }
    let _ = serde_json::from_slice::<ApiError>(data);
    let _ = serde_json::from_slice::<Vec<Flow>>(data);
    let _ = serde_json::from_slice::<Status>(data);
});
