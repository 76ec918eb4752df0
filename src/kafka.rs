//! Kafka addresses and client settings shared by the consumer
//! ([`crate::source::KafkaSource`]) and the load generator's producer.
//!
//! An address is `kafka://HOST:PORT[,HOST:PORT…]/TOPIC[?key=value&…]`. Keys
//! expmon understands: `group` (consumer group, default `expmon`),
//! `dead_letter` (topic for bad messages), `idle_timeout` (a partition with no
//! event for this long stops holding the watermark back, default 10s),
//! `until_end=true` (end the run once this consumer holds every partition of
//! the topic and has read each to its end: a bounded replay by one consumer) and `partitions` (for `gen`: partitions
//! of a topic it creates, default 8). Any
//! key with a dot in it (`security.protocol`, `sasl.mechanism`,
//! `fetch.max.bytes`, …) is passed to librdkafka as is, after the settings of
//! the config file's `[kafka]` table. Each key at most once (see
//! [`crate::address`]).

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use std::time::Duration;

use crate::address::{split_query, Keys, OptionError, Options, PassedOn};
use crate::config::parse_duration_ms;

/// The options of a `kafka://` address: expmon's own, and librdkafka's
/// settings (a dot in their name, or `debug` and `acks`), passed on.
static KEYS: Keys = Keys {
    known: &["group", "dead_letter", "idle_timeout", "until_end", "partitions"],
    passed_on: Some(PassedOn {
        takes: |k| k.contains('.') || ["debug", "acks"].contains(&k),
        described: "librdkafka settings have a dot in their name",
    }),
};

/// A parsed `kafka://` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSpec {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub dead_letter: Option<String>,
    pub idle_timeout: Duration,
    pub partitions: i32,
    /// End the input once every assigned partition is at its end.
    pub until_end: bool,
    /// librdkafka settings from the address (after those of the config file).
    pub settings: Vec<(String, String)>,
}

/// Why a Kafka address is refused or Kafka cannot be used; each is one line,
/// with the values of secret settings hidden.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// `shown`: the address with its secrets hidden.
    #[error("bad kafka address {shown:?}: {why}")]
    BadAddress { shown: String, why: String },
    /// librdkafka refused to make a client (`what`: "kafka consumer", …);
    /// `error` is its message with secret values hidden.
    #[error("{what} for {brokers}: {error}")]
    Client { what: &'static str, brokers: String, error: String },
    #[error("cannot reach Kafka at {brokers} within {timeout:?}: {error}")]
    Unreachable { brokers: String, timeout: Duration, error: rdkafka::error::KafkaError },
    #[error("Kafka at {brokers} has no usable topic {topic:?}: {why}")]
    UnusableTopic { brokers: String, topic: String, why: String },
    #[error("Kafka at {brokers} has no topic {topic:?}")]
    NoTopic { brokers: String, topic: String },
    #[error("cannot create topic {topic:?} at {brokers}: {error}")]
    CreateTopic { topic: String, brokers: String, error: String },
    #[error("cannot subscribe to {topic:?}: {error}")]
    Subscribe { topic: String, error: rdkafka::error::KafkaError },
}

impl KafkaSpec {
    pub fn parse(spec: &str) -> Result<KafkaSpec, KafkaError> {
        let shown = crate::redact::redact(spec);
        let bad = |why: &str| KafkaError::BadAddress { shown: shown.clone(), why: why.to_string() };
        let rest = spec.strip_prefix("kafka://").ok_or_else(|| bad("expected kafka://HOST:PORT/TOPIC"))?;
        let (addr, query) = split_query(rest);
        let (brokers, topic) = addr.split_once('/').ok_or_else(|| bad("no /TOPIC after the brokers"))?;
        if brokers.contains('@') {
            return Err(bad("brokers are HOST:PORT: credentials go in sasl.username and sasl.password"));
        }
        let host_port =
            |b: &str| b.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if brokers.is_empty() || !brokers.split(',').all(host_port) {
            return Err(bad("brokers must be HOST:PORT[,HOST:PORT…]"));
        }
        let valid_topic = |t: &str| {
            !t.is_empty() && t.len() <= 249 && t.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        };
        if !valid_topic(topic) {
            return Err(bad("a topic name is 1 to 249 of [A-Za-z0-9._-]"));
        }
        let options = || -> Result<KafkaSpec, OptionError> {
            let o = Options::parse(query, &KEYS)?;
            let group = o.value("group", |v| match v {
                "" => Err("empty (a consumer group name)".to_string()),
                _ => Ok(v.to_string()),
            })?;
            let dead_letter = o.value("dead_letter", |v| match valid_topic(v) {
                true => Ok(v.to_string()),
                false => Err(format!("{v:?} is not a topic name (1 to 249 of [A-Za-z0-9._-])")),
            })?;
            let idle_timeout = o.value("idle_timeout", |v| {
                parse_duration_ms(v).map(|ms| Duration::from_millis(ms.max(1) as u64)).map_err(|e| e.to_string())
            })?;
            let until_end = o.value("until_end", |v| v.parse().map_err(|_| "true or false".to_string()))?;
            let partitions = o.value("partitions", |v| v.parse().ok().filter(|n| *n > 0).ok_or("not a count"))?;
            Ok(KafkaSpec {
                brokers: brokers.to_string(),
                topic: topic.to_string(),
                group: group.unwrap_or_else(|| "expmon".to_string()),
                dead_letter,
                idle_timeout: idle_timeout.unwrap_or(Duration::from_secs(10)),
                partitions: partitions.unwrap_or(8),
                until_end: until_end.unwrap_or(false),
                settings: o.passed_on().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            })
        };
        options().map_err(|e| bad(&e.to_string()))
    }

    /// `what` failed with librdkafka's error `e`, as one line: librdkafka
    /// echoes settings in its errors (an unknown property with its value), so
    /// the value of every secret setting (see [`crate::redact`]) of `base` and
    /// of the address is replaced by `***`.
    pub fn client_error(&self, base: &[(String, String)], what: &'static str, e: impl std::fmt::Display) -> KafkaError {
        let mut error = e.to_string();
        for (k, v) in base.iter().chain(&self.settings) {
            if !v.is_empty() && crate::redact::is_secret_key(k) {
                error = error.replace(v.as_str(), crate::redact::HIDDEN);
            }
        }
        KafkaError::Client { what, brokers: self.brokers.clone(), error }
    }

    /// A librdkafka configuration: brokers, then `base` (the config file's
    /// `[kafka]` table), then the address's own settings.
    pub fn client_config(&self, base: &[(String, String)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in base.iter().chain(&self.settings) {
            c.set(k, v);
        }
        c
    }
}

/// Fails with one line unless the brokers answer within `timeout` and know
/// `topic`; returns its partition count.
pub fn topic_partitions(
    consumer: &BaseConsumer<impl rdkafka::consumer::ConsumerContext>,
    spec: &KafkaSpec,
    timeout: Duration,
) -> Result<usize, KafkaError> {
    let md = consumer.fetch_metadata(Some(&spec.topic), timeout).map_err(|error| KafkaError::Unreachable {
        brokers: spec.brokers.clone(),
        timeout,
        error,
    })?;
    let t = md.topics().iter().find(|t| t.name() == spec.topic);
    match t {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len()),
        Some(t) => Err(KafkaError::UnusableTopic {
            brokers: spec.brokers.clone(),
            topic: spec.topic.clone(),
            why: t.error().map(|e| RDKafkaErrorCode::from(e).to_string()).unwrap_or_else(|| "no partitions".into()),
        }),
        None => Err(KafkaError::NoTopic { brokers: spec.brokers.clone(), topic: spec.topic.clone() }),
    }
}

/// Creates `spec.topic` with `spec.partitions` partitions unless it exists.
/// Returns the topic's partition count.
pub fn ensure_topic(spec: &KafkaSpec, base: &[(String, String)]) -> Result<usize, KafkaError> {
    let timeout = Duration::from_secs(10);
    let probe: BaseConsumer =
        spec.client_config(base).create().map_err(|e| spec.client_error(base, "kafka client", e))?;
    if let Ok(n) = topic_partitions(&probe, spec, timeout) {
        return Ok(n);
    }
    let admin: AdminClient<DefaultClientContext> =
        spec.client_config(base).create().map_err(|e| spec.client_error(base, "kafka admin client", e))?;
    let topic = NewTopic::new(&spec.topic, spec.partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
    let results = futures_executor::block_on(admin.create_topics([&topic], &opts)).map_err(|e| {
        KafkaError::CreateTopic { topic: spec.topic.clone(), brokers: spec.brokers.clone(), error: e.to_string() }
    })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::CreateTopic { topic, brokers: spec.brokers.clone(), error: code.to_string() })
            }
        }
    }
    // Metadata can lag creation by a moment.
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match topic_partitions(&probe, spec, Duration::from_secs(2)) {
            Ok(n) => return Ok(n),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_refuses_bad_ones() {
        let s =
            KafkaSpec::parse("kafka://a:9092,b:9093/events?group=g1&dead_letter=bad&security.protocol=SSL").unwrap();
        assert_eq!(s.brokers, "a:9092,b:9093");
        assert_eq!(s.topic, "events");
        assert_eq!(s.group, "g1");
        assert_eq!(s.dead_letter.as_deref(), Some("bad"));
        assert_eq!(s.settings, vec![("security.protocol".to_string(), "SSL".to_string())]);
        let s = KafkaSpec::parse("kafka://h:1/t?idle_timeout=2s&partitions=3").unwrap();
        assert_eq!((s.idle_timeout, s.partitions, s.group.as_str()), (Duration::from_secs(2), 3, "expmon"));
        for bad in [
            "kafka://h:1",
            "kafka:///t",
            "kafka://h/t",
            "kafka://h:1/",
            "kafka://h:1/a b",
            "kafka://h:1/t?grup=x",
            "kafka://h:1/t?partitions=0",
            "kafka://h:1/t?novalue",
            "kafka://h:1/t?group=a&group=b",
            "kafka://h:1/t?acks=1&acks=all",
        ] {
            let e = KafkaSpec::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad kafka address"), "{bad}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = KafkaSpec::parse("kafka://h:1/t?grup=x").unwrap_err().to_string();
        assert!(e.ends_with(": unknown option \"grup\" (expected group, dead_letter, idle_timeout, until_end, partitions; librdkafka settings have a dot in their name)"), "{e}");
        let e = KafkaSpec::parse("kafka://h:1/t?sasl.password=s3cr3t&sasl.password=s3cr3t").unwrap_err().to_string();
        assert!(e.contains("\"sasl.password\" is given twice") && !e.contains("s3cr3t"), "{e}");
        let e = KafkaSpec::parse("kafka://h:1/t?until_end=yes").unwrap_err().to_string();
        assert!(e.ends_with(": until_end: true or false"), "{e}");
    }
}
