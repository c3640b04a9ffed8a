//! The poll thread: polls the consumer, gathers records under their memory
//! permits and hands them to the owning task, pausing and resuming fetching as
//! [`super::backpressure`] decides.

use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use super::backpressure::{Backpressure, Fetching, Polled, SHORT_WAIT};
use super::context::{Context, Handed, Sent};
use super::{Event, OnPause};
use crate::kafka::memory::TableMemory;
use crate::telemetry::events::{FetchSwitched, TopicUnavailable};
use crate::telemetry::Event as _;

/// Polls `consumer` until `stop` is cancelled or the task goes away. Records are
/// handed over in batches: when [`HANDOVER_RECORDS`] are gathered, when nothing
/// more is ready, and before a rebalance. Waits are short and bounded: when a
/// record finds no memory, or the task does not take what is gathered, within
/// [`SHORT_WAIT`], the assigned partitions are paused and polling goes on
/// (serving rebalances and the group's liveness) until memory comes back and the
/// task catches up; then they resume.
pub(super) fn poll_loop(
    consumer: Arc<BaseConsumer<Context>>,
    memory: TableMemory,
    on_pause: OnPause,
    stop: CancellationToken,
) {
    let context = consumer.context();
    let runtime = &context.runtime;
    let mut bp = Backpressure::default();
    let fetching = |change: Fetching| {
        if change == Fetching::Pause {
            on_pause();
        }
        set_paused(&consumer, change != Fetching::Resume);
    };
    // Offers what is pending (waiting as long as the state allows); false when
    // the task is gone.
    let offer = |bp: &mut Backpressure<_>| match context.hand_over_within(runtime, bp.offer_wait()) {
        Handed::Gone => false,
        handed => {
            bp.offered(handed == Handed::Later);
            true
        }
    };
    while !stop.is_cancelled() {
        let released = bp.release(|permits| memory.try_take(permits));
        if !released.is_empty() {
            context
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(released);
        }
        if bp.offer_now(context.pending()) && !offer(&mut bp) {
            break;
        }
        if let Some(change) = bp.settle() {
            fetching(change);
        }
        if context.deferring() {
            context.start_deferred(&consumer, bp.is_paused());
        }
        let message = match consumer.poll(bp.poll_timeout(context.pending())) {
            None => {
                if context.pending() > 0 && !offer(&mut bp) {
                    break;
                }
                continue;
            }
            Some(Ok(message)) => message.detach(),
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(
                e @ KafkaError::MessageConsumption(
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
                ),
            )) => {
                // A topic read before is deleted: the table fails. One not
                // created yet: the start already warned about it, once.
                if !context.topic_unknown(&e) {
                    TopicUnavailable {
                        consumer: context.consumer(),
                    }
                    .emit();
                }
                continue;
            }
            Some(Err(KafkaError::MessageConsumption(
                code @ (RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange),
            ))) => {
                // The owning task decides, against the watermarks, what this means.
                let deadline = Instant::now() + context.revoke_wait;
                if context.hand_over_within(runtime, context.revoke_wait) != Handed::All
                    || context.send_by(Event::OutOfRange(code.to_string()), Some(deadline)) != Sent::Yes
                {
                    break;
                }
                continue;
            }
            Some(Err(e)) => {
                if !context.failed(&e, "") {
                    context.error("consume", "consume error", &e, true);
                }
                continue;
            }
        };
        if context.deferring() && context.awaits(message.partition()) {
            // Fetched before the pause took: read again from its start.
            continue;
        }
        context.working();
        let size = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        let permits = u32::try_from(context.role.charge(size))
            .unwrap_or(u32::MAX)
            .clamp(1, memory.max_record());
        let message = match bp.polled(message, permits) {
            Polled::Take(message) => message,
            Polled::Held(change) => {
                fetching(change);
                continue;
            }
        };
        let permit = match memory.try_take(permits) {
            Some(permit) => Some(permit),
            None if !bp.may_wait_for_memory() => None,
            None => {
                // Hand over what is gathered first (its memory must be able to
                // come back), then wait a moment for memory.
                if context.hand_over_within(runtime, SHORT_WAIT) == Handed::Gone {
                    break;
                }
                runtime.block_on(memory.take_within(permits, SHORT_WAIT))
            }
        };
        match permit {
            Some(permit) => context
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((message, permit)),
            None => {
                if let Some(change) = bp.no_memory(message, permits) {
                    fetching(change);
                }
            }
        }
    }
}

/// Pauses or resumes fetching of every assigned partition.
fn set_paused(consumer: &BaseConsumer<Context>, pause: bool) {
    let context = consumer.context();
    let mut assignment = match consumer.assignment() {
        Ok(assignment) => assignment,
        Err(e) => {
            context.error("pause", "cannot read the assignment to pause or resume it", &e, true);
            return;
        }
    };
    if !pause && context.deferring() {
        // Partitions waiting for their start stay paused until it comes.
        let awaiting = context.awaiting();
        let mut fetchable = rdkafka::TopicPartitionList::new();
        for element in assignment.elements() {
            if !(element.topic() == context.topic && awaiting.contains(&element.partition())) {
                fetchable.add_partition(element.topic(), element.partition());
            }
        }
        assignment = fetchable;
    }
    FetchSwitched {
        consumer: context.consumer(),
        paused: pause,
    }
    .emit();
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(e) = result {
        let what = if pause {
            "cannot pause fetching"
        } else {
            "cannot resume fetching"
        };
        context.error("pause", what, &e, true);
    }
}
