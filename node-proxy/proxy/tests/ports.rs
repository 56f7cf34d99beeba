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
    assert_eq!(PROXY_PORTS.len(), 6, "no port twice, none unknown");
}
