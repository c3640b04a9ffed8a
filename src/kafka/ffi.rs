//! What rdkafka does not wrap: the mock-cluster controls (two settings and a
//! broker's outage, down then up again, for outage tests) and the build's
//! `builtin.features`.
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

/// librdkafka's `builtin.features` of this build (e.g. `gzip,snappy,ssl,…`): a
/// property with a default that rdkafka's `ClientConfig` cannot read.
pub fn builtin_features() -> String {
    const NAME: &std::ffi::CStr = c"builtin.features";
    // SAFETY: the configuration is created and destroyed here and used by no one
    // else; librdkafka writes at most `size` bytes (its own answer for the length)
    // into the buffer, NUL included.
    unsafe {
        let conf = rdsys::rd_kafka_conf_new();
        let mut size: usize = 0;
        let mut value = String::new();
        if rdsys::rd_kafka_conf_get(conf, NAME.as_ptr(), std::ptr::null_mut(), &mut size)
            == rdsys::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK
            && size > 0
        {
            let mut buffer = vec![0u8; size];
            if rdsys::rd_kafka_conf_get(conf, NAME.as_ptr(), buffer.as_mut_ptr().cast(), &mut size)
                == rdsys::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK
            {
                value = std::ffi::CStr::from_bytes_until_nul(&buffer)
                    .map(|v| v.to_string_lossy().into_owned())
                    .unwrap_or_default();
            }
        }
        rdsys::rd_kafka_conf_destroy(conf);
        value
    }
}
