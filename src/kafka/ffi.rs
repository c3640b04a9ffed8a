//! The librdkafka mock-cluster controls that rdkafka does not wrap: two settings
//! and a broker's outage (down, then up again), for outage tests.
//!
//! `unsafe` is denied crate-wide; this module and `alloc.rs` are the exceptions. Each call
//! passes a mock-cluster handle that librdkafka itself returned for a client that
//! outlives the call, and strings that live across the call; librdkafka copies what
//! it keeps and takes the cluster's lock inside.
#![allow(unsafe_code)]

use std::ffi::CString;

use rdkafka::bindings as rdsys;
use rdkafka::client::{Client, ClientContext};

/// The mock cluster owned by `client` (created with `test.mock.num.brokers`).
fn mock_cluster<C: ClientContext>(client: &Client<C>) -> Option<*mut rdsys::rd_kafka_mock_cluster_t> {
    // SAFETY: `native_ptr` is a live handle for as long as `client` is borrowed.
    let cluster = unsafe { rdsys::rd_kafka_handle_mock_cluster(client.native_ptr()) };
    (!cluster.is_null()).then_some(cluster)
}

/// Sets how long a new consumer group waits for more members before its first
/// assignment (Kafka's `group.initial.rebalance.delay.ms`; 3000 in the mock).
pub fn set_initial_rebalance_delay<C: ClientContext>(client: &Client<C>, delay_ms: i32) -> bool {
    let Some(cluster) = mock_cluster(client) else {
        return false;
    };
    // SAFETY: `cluster` belongs to `client`, which is borrowed for this call.
    unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, delay_ms) };
    true
}

/// Sets the address a mock broker advertises in metadata (its listener stays
/// where it is; the dev broker forwards the advertised port to it).
pub fn set_advertised_listener<C: ClientContext>(client: &Client<C>, broker_id: i32, host: &str, port: u16) -> bool {
    let Some(cluster) = mock_cluster(client) else {
        return false;
    };
    let Ok(host) = CString::new(host) else { return false };
    // SAFETY: `cluster` belongs to `client`; librdkafka copies `host` before returning.
    unsafe { rdsys::rd_kafka_mock_broker_set_host_port(cluster, broker_id, host.as_ptr(), i32::from(port)) };
    true
}

/// Takes mock broker `broker_id` down (connections cut, new ones refused) or
/// brings it back up.
pub fn set_broker_up<C: ClientContext>(client: &Client<C>, broker_id: i32, up: bool) -> bool {
    let Some(cluster) = mock_cluster(client) else {
        return false;
    };
    // SAFETY: `cluster` belongs to `client`, which is borrowed for this call.
    let err = unsafe {
        if up {
            rdsys::rd_kafka_mock_broker_set_up(cluster, broker_id)
        } else {
            rdsys::rd_kafka_mock_broker_set_down(cluster, broker_id)
        }
    };
    err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
}
