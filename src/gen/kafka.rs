//! `expmon gen --out kafka://…`: sends generated events to a topic, keyed by
//! session id (so a session's events share a partition and keep their order),
//! creating the topic (`partitions=N`, default 8) if it does not exist.

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use super::GenError;
use crate::failures::lock;
use crate::kafka::{ensure_topic, KafkaSpec};

#[derive(Default)]
struct Delivery {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

struct Ctx(Arc<Delivery>);

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.delivered.fetch_add(1, Relaxed),
            Err((e, _)) => {
                lock(&self.0.first_error).get_or_insert_with(|| e.to_string());
                self.0.failed.fetch_add(1, Relaxed)
            }
        };
    }
}

pub struct KafkaOut {
    producer: ThreadedProducer<Ctx>,
    delivery: Arc<Delivery>,
    topic: String,
}

impl KafkaOut {
    pub fn open(spec: &str) -> Result<KafkaOut, GenError> {
        let spec = KafkaSpec::parse(spec)?;
        ensure_topic(&spec, &[])?;
        let delivery = Arc::new(Delivery::default());
        let mut cfg = spec.client_config(&[]);
        for (k, v) in [("linger.ms", "5"), ("batch.num.messages", "10000"), ("queue.buffering.max.messages", "200000")]
        {
            cfg.set(k, v);
        }
        for (k, v) in &spec.settings {
            cfg.set(k, v);
        }
        let producer = cfg
            .create_with_context(Ctx(delivery.clone()))
            .map_err(|e| GenError::Kafka(spec.client_error(&[], "kafka producer", e)))?;
        Ok(KafkaOut { producer, delivery, topic: spec.topic })
    }

    /// Queues one event; blocks while librdkafka's queue is full.
    pub fn send(&self, line: &[u8]) -> Result<(), GenError> {
        let key = session_of(line);
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic).payload(line);
        if let Some(k) = key {
            record = record.key(k);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => return Err(GenError::Send { topic: self.topic.clone(), error }),
            }
        }
    }

    /// Waits for every queued event to be acknowledged by the broker.
    /// Returns how many were delivered, or why some were not.
    pub fn finish(self) -> Result<u64, GenError> {
        let topic = self.topic.clone();
        self.producer.flush(Duration::from_secs(60)).map_err(|error| GenError::Flush { topic, error })?;
        let failed = self.delivery.failed.load(Relaxed);
        if failed > 0 {
            let first = lock(&self.delivery.first_error).clone().unwrap_or_default();
            return Err(GenError::Undelivered { failed, topic: self.topic.clone(), first });
        }
        Ok(self.delivery.delivered.load(Relaxed))
    }
}

/// The session id of a generated line, used as its message key.
fn session_of(line: &[u8]) -> Option<&[u8]> {
    const FIELD: &[u8] = b"\"session\":\"";
    let start = memchr::memmem::find(line, FIELD)? + FIELD.len();
    let len = memchr::memchr(b'"', &line[start..])?;
    Some(&line[start..start + len])
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_session_ids() {
        assert_eq!(super::session_of(br#"{"ts":1,"session":"ab-1","mp":"x"}"#), Some(&b"ab-1"[..]));
        assert_eq!(super::session_of(b"GET / HTTP/1.1"), None);
    }
}
