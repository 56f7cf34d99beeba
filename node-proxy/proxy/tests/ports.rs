//! The ports inbound delivery refuses (`proxy::PROXY_PORTS`) are every
//! port the proxy listens on, wherever each is defined.

use weft_node_proxy::admin::{ADMIN_PORT, HEALTH_PORT, METRICS_PORT};
use weft_node_proxy::proxy::PROXY_PORTS;

#[test]
fn every_listening_port_is_a_proxy_port() {
    for port in [
        ADMIN_PORT,
        METRICS_PORT,
        HEALTH_PORT,
        weft_redirector::OUTBOUND_PORT,
        weft_redirector::INBOUND_PORT,
        weft_redirector::HBONE_PORT,
        weft_hbone::HBONE_PORT,
    ] {
        assert!(PROXY_PORTS.contains(&port), "{port}");
    }
    // And nothing else, none twice: the list is exactly the listening ports.
    let listening: std::collections::BTreeSet<u16> = [
        ADMIN_PORT,
        METRICS_PORT,
        HEALTH_PORT,
        weft_redirector::OUTBOUND_PORT,
        weft_redirector::INBOUND_PORT,
        weft_hbone::HBONE_PORT,
    ]
    .into();
    let listed: std::collections::BTreeSet<u16> = PROXY_PORTS.into();
    assert_eq!(listed, listening);
    assert_eq!(listed.len(), PROXY_PORTS.len(), "a port listed twice");
}
