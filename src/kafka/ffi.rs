//! What rdkafka does not wrap: the mock-cluster controls (two settings and a
//! broker's outage, down then up again, for outage tests), the build's
//! `builtin.features`, and the topic ids of KIP-516 (Admin DescribeTopics).
//!
//! `unsafe` is denied crate-wide; this module and `alloc.rs` are the exceptions. Each call
//! passes a mock-cluster handle that librdkafka itself returned for a client that
//! outlives the call, and strings that live across the call; librdkafka copies what
//! it keeps and takes the cluster's lock inside.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::time::Duration;

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

/// The topic id (KIP-516, base64 as Kafka's own tools print it) of each of
/// `topics` that exists, by Admin DescribeTopics. A topic that does not exist,
/// or a broker that assigns no ids (before Kafka 2.8: the all-zero id), gives
/// no entry; so does a cluster whose metadata names a controller that is none
/// of its brokers (librdkafka's mock cluster), which would leave the request
/// waiting for it. Blocking, for at most about twice `timeout`.
pub fn topic_ids<C: ClientContext>(
    client: &Client<C>,
    topics: &[String],
    timeout: Duration,
) -> Result<HashMap<String, String>, String> {
    let names: Vec<CString> = topics
        .iter()
        .map(|t| CString::new(t.as_str()).map_err(|_| format!("topic name {t:?} holds a NUL")))
        .collect::<Result<_, _>>()?;
    let mut pointers: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = client.native_ptr();
    // Any metadata answer names the brokers and the controller: ask for one
    // topic's, not the whole cluster's.
    let brokers = client
        .fetch_metadata(topics.first().map(String::as_str), timeout)
        .map_err(|e| format!("cannot read the cluster's metadata: {e}"))?;
    // SAFETY: `rk` is live while `client` is borrowed; the call reads metadata
    // the fetch above brought.
    let controller = unsafe { rdsys::rd_kafka_controllerid(rk, 0) };
    if !brokers.brokers().iter().any(|b| b.id() == controller) {
        return Ok(HashMap::new());
    }
    // SAFETY: `rk` is live while `client` is borrowed. The collection, options
    // and queue are created, used and destroyed here; librdkafka copies the
    // names into the collection. The event is destroyed after its results are
    // read: the descriptions and their ids live as long as the event.
    unsafe {
        let collection = rdsys::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len());
        let options =
            rdsys::rd_kafka_AdminOptions_new(rk, rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS);
        let mut errstr = [0 as std::ffi::c_char; 256];
        rdsys::rd_kafka_AdminOptions_set_request_timeout(options, millis, errstr.as_mut_ptr(), errstr.len());
        let queue = rdsys::rd_kafka_queue_new(rk);
        rdsys::rd_kafka_DescribeTopics(rk, collection, options, queue);
        // The request times out by itself; the poll waits a little longer.
        let event = rdsys::rd_kafka_queue_poll(queue, millis.saturating_add(1_000));
        let answer = if event.is_null() {
            Err(format!("no answer to DescribeTopics within {} ms", millis))
        } else if rdsys::rd_kafka_event_error(event) != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let why = rdsys::rd_kafka_event_error_string(event);
            Err(if why.is_null() {
                "DescribeTopics failed".to_owned()
            } else {
                format!("DescribeTopics failed: {}", CStr::from_ptr(why).to_string_lossy())
            })
        } else {
            let result = rdsys::rd_kafka_event_DescribeTopics_result(event);
            let mut ids = HashMap::new();
            if !result.is_null() {
                let mut count = 0usize;
                let described = rdsys::rd_kafka_DescribeTopics_result_topics(result, &mut count);
                for i in 0..count {
                    let topic = *described.add(i);
                    if !rdsys::rd_kafka_TopicDescription_error(topic).is_null() {
                        continue;
                    }
                    let id = rdsys::rd_kafka_TopicDescription_topic_id(topic);
                    let name = rdsys::rd_kafka_TopicDescription_name(topic);
                    if id.is_null()
                        || name.is_null()
                        || (rdsys::rd_kafka_Uuid_most_significant_bits(id) == 0
                            && rdsys::rd_kafka_Uuid_least_significant_bits(id) == 0)
                    {
                        continue;
                    }
                    let text = rdsys::rd_kafka_Uuid_base64str(id);
                    if text.is_null() {
                        continue;
                    }
                    ids.insert(
                        CStr::from_ptr(name).to_string_lossy().into_owned(),
                        kafka_base64(&CStr::from_ptr(text).to_string_lossy()),
                    );
                }
            }
            Ok(ids)
        };
        if !event.is_null() {
            rdsys::rd_kafka_event_destroy(event);
        }
        rdsys::rd_kafka_queue_destroy(queue);
        rdsys::rd_kafka_AdminOptions_destroy(options);
        rdsys::rd_kafka_TopicCollection_destroy(collection);
        answer
    }
}

/// The topic ids of [`topic_ids`], and the cluster's id when the broker gives
/// one: what a topic's offsets count in. Blocking.
pub fn identities<C: ClientContext>(
    client: &Client<C>,
    topics: &[String],
    timeout: Duration,
) -> Result<(HashMap<String, String>, Option<String>), String> {
    let ids = topic_ids(client, topics, timeout)?;
    let cluster = if ids.is_empty() {
        None
    } else {
        client.fetch_cluster_id(timeout)
    };
    Ok((ids, cluster))
}

/// librdkafka prints a topic id in standard base64; Kafka (`Uuid.toString`,
/// `kafka-topics --describe`) in the URL-safe alphabet without padding.
fn kafka_base64(standard: &str) -> String {
    standard
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_ids_read_as_kafka_prints_them() {
        assert_eq!(
            super::kafka_base64("AfXxUojjQwuLUm+S33ji/g=="),
            "AfXxUojjQwuLUm-S33ji_g"
        );
        assert_eq!(super::kafka_base64("q1Sh9ISia0zwGINzRvyQAA"), "q1Sh9ISia0zwGINzRvyQAA");
    }
}
