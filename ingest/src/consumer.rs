//! The tenant-bound event consumer.
//!
//! A consumer on one topic, in one of two modes: a consumer-group member ([`EventConsumer::new`],
//! for several instances sharing the work) or the reader of a fixed set of partitions with no
//! group coordinator at all ([`EventConsumer::assigned`], for one instance; no session to time
//! out, no rebalance to wait for). The [`PartitionSink`] decides where each newly assigned
//! partition resumes (the ledger answers from its own durable state, so exactly-once does not depend
//! on the group's committed offsets) and is told, inside the rebalance and before the partition is
//! gone, which partitions are revoked so it can finish their work.
//!
//! Invariants:
//! * A batch holds only messages of partitions assigned at the moment it is returned: messages
//!   buffered from a partition that is revoked mid-poll are dropped (its next owner re-reads them
//!   from its resume offset).
//! * Within a partition, deliveries come in offset order.
//! * Every message becomes a [`Delivery`], valid or not; nothing is filtered out silently.
//!
//! librdkafka polling blocks, so each poll runs on tokio's blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_schemas::{decode_message, Decoded, Rejection};

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

/// Where a newly assigned partition resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// At this offset (the next one to read).
    At(i64),
    /// At the start of the partition.
    Beginning,
    /// At the group's committed offset, or the start when there is none.
    Committed,
}

impl Resume {
    /// The librdkafka position it names.
    fn offset(self) -> Offset {
        match self {
            Resume::At(o) => Offset::Offset(o),
            Resume::Beginning => Offset::Beginning,
            Resume::Committed => Offset::Stored,
        }
    }
}

/// The owner of what is consumed: it decides where partitions resume and is told of revocations.
/// Both calls run inside a rebalance, on the librdkafka poll thread, and may block, briefly;
/// `resume` runs for several partitions at once, each on a thread of its own.
pub trait PartitionSink: Send + Sync + 'static {
    fn resume(&self, topic: &str, partition: i32) -> Resume;
    /// Called before `partitions` are taken away. Every delivery of theirs returned so far has
    /// reached the caller; the sink should make its work on them durable before returning.
    fn partitions_revoked(&self, topic: &str, partitions: &[i32]);
    /// Called after `partitions` are assigned (with the resume positions already applied).
    fn partitions_assigned(&self, _topic: &str, _partitions: &[i32]) {}
    /// Called when a partition is assigned at `resume`, but the broker's partition ends before
    /// it (`high`, its next offset): the topic was deleted and recreated, or the broker lost
    /// data. Offsets below `resume` would be taken for messages already recorded.
    fn resume_beyond_end(&self, _topic: &str, _partition: i32, _resume: i64, _high: i64) {}
}

/// How long the check of a resume offset against the partition's end may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an assigned consumer waits for the topic's metadata at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// One consumed message with its source and its verdict.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (ms since the epoch), when the broker gave one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub outcome: std::result::Result<Decoded, Rejection>,
}

struct SinkContext {
    topic: String,
    sink: Arc<dyn PartitionSink>,
    /// Partitions revoked by rebalances since the poll loop last looked.
    revoked: Mutex<BTreeSet<i32>>,
    /// Messages behind the high watermark per assigned partition, from librdkafka statistics.
    lag: Mutex<BTreeMap<i32, i64>>,
}

impl SinkContext {
    fn new(topic: &str, sink: Arc<dyn PartitionSink>) -> SinkContext {
        SinkContext { topic: topic.to_string(), sink, revoked: Mutex::new(BTreeSet::new()), lag: Mutex::new(BTreeMap::new()) }
    }
}

impl ClientContext for SinkContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
        lag.clear();
        if let Some(topic) = statistics.topics.get(&self.topic) {
            // -1 is librdkafka's partition for internal use; a negative lag means "not known yet".
            // librdkafka measures lag from committed offsets; an assigned consumer commits none,
            // so its lag is measured from the position it has handed out instead.
            for (p, stats) in topic.partitions.iter().filter(|(p, _)| **p >= 0) {
                let measured = if stats.consumer_lag >= 0 {
                    stats.consumer_lag
                } else if stats.hi_offset >= 0 && stats.app_offset >= 0 {
                    (stats.hi_offset - stats.app_offset).max(0)
                } else {
                    continue;
                };
                lag.insert(*p, measured);
            }
        }
    }
}

impl SinkContext {
    /// Asks the sink where each of `partitions` resumes and writes it into `tpl`. Partitions
    /// are asked (and their resume points checked with the broker) by as many threads as the
    /// machine has cores, each taking the next partition when it is done: a sink's `resume`
    /// opens the partition from disk, and a restart waits for all of them.
    fn set_resume_positions(&self, consumer: &BaseConsumer<Self>, partitions: &[i32], tpl: &mut TopicPartitionList) {
        let at_once = std::thread::available_parallelism().map_or(1, |n| n.get()).min(partitions.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let offsets: Vec<(i32, Offset)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..at_once)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        while let Some(&p) = partitions.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                            done.push((p, self.resume_position(consumer, p)));
                        }
                        done
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        for (p, offset) in offsets {
            if let Err(e) = tpl.set_partition_offset(&self.topic, p, offset) {
                tracing::error!(partition = p, error = %e, "cannot set resume offset");
            }
        }
    }

    /// Where partition `p` resumes, as the sink says, checked against the partition's end.
    fn resume_position(&self, consumer: &BaseConsumer<Self>, p: i32) -> Offset {
        match self.sink.resume(&self.topic, p) {
            Resume::At(o) => {
                // A resume point past the partition's end means the offsets behind it are not
                // the ones recorded: never read on as if they were.
                match consumer.fetch_watermarks(&self.topic, p, WATERMARK_TIMEOUT) {
                    Ok((_, high)) if high < o => self.sink.resume_beyond_end(&self.topic, p, o, high),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(partition = p, error = %e, "cannot check the resume offset against the partition's end"),
                }
                Offset::Offset(o)
            }
            other => other.offset(),
        }
    }
}

impl ConsumerContext for SinkContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect();
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.set_resume_positions(consumer, &partitions, tpl);
                let result = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                // librdkafka keeps an application's pause across an unassign and a new assign: a
                // partition paused by its previous owner here (`pause`) would be assigned and
                // never fetched. Resuming one that is not paused does nothing.
                let result = result.and_then(|()| consumer.resume(tpl));
                match result {
                    Ok(()) => {
                        tracing::info!(topic = %self.topic, ?partitions, "partitions assigned");
                        self.sink.partitions_assigned(&self.topic, &partitions);
                    }
                    Err(e) => tracing::error!(error = %e, ?partitions, "assign failed"),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoked.lock().unwrap_or_else(PoisonError::into_inner).extend(partitions.iter().copied());
                self.sink.partitions_revoked(&self.topic, &partitions);
                let result = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = result {
                    tracing::error!(error = %e, ?partitions, "unassign failed");
                }
                tracing::info!(topic = %self.topic, ?partitions, "partitions revoked");
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.revoked.lock().unwrap_or_else(PoisonError::into_inner).extend(partitions.iter().copied());
                self.sink.partitions_revoked(&self.topic, &partitions);
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
        }
    }
}

/// A consumer yielding batches of [`Delivery`]s: a group member, or a reader of assigned
/// partitions.
pub struct EventConsumer {
    consumer: Arc<BaseConsumer<SinkContext>>,
    topic: String,
    max_batch: usize,
    max_wait: Duration,
    /// Whether this consumer is in a group (it commits offsets and leaves the group on close).
    in_group: bool,
    /// Without a group: the partitions it was given, all revoked at close.
    assigned: Vec<i32>,
}

impl EventConsumer {
    /// Joins `group` and subscribes to `topic`. `max_batch` bounds a batch; a batch is returned
    /// when full, when librdkafka's queue is drained after at least one message, or when
    /// `max_wait` has passed with nothing to deliver (empty).
    pub fn new(config: &KafkaConfig, group: &str, topic: &str, sink: Arc<dyn PartitionSink>, max_batch: usize, max_wait: Duration) -> Result<Self> {
        let mut client = Self::client(config)?;
        let consumer: BaseConsumer<SinkContext> = client.set("group.id", group).create_with_context(SinkContext::new(topic, sink)).map_err(Error::Client)?;
        consumer.subscribe(&[topic]).map_err(Error::Consume)?;
        Ok(EventConsumer {
            consumer: Arc::new(consumer),
            topic: topic.to_string(),
            max_batch: max_batch.max(1),
            max_wait,
            in_group: true,
            assigned: Vec::new(),
        })
    }

    /// Reads `partitions` of `topic` (all of them when `None`) without a consumer group: no
    /// group coordinator, no session, no rebalances. The sink is asked where each resumes before
    /// this returns, and told of all of them at [`EventConsumer::close`]. For a single instance
    /// that owns every partition; two such consumers on one partition would both read it (the
    /// ledger's partition lock refuses the second). Blocks: the metadata request, and the sink's
    /// `resume` for each partition.
    ///
    /// `group` is only a name here: librdkafka needs a `group.id` to assign partitions at all,
    /// but a consumer that never subscribes never joins the group, and this one commits nothing.
    pub fn assigned(
        config: &KafkaConfig,
        group: &str,
        topic: &str,
        partitions: Option<&[i32]>,
        sink: Arc<dyn PartitionSink>,
        max_batch: usize,
        max_wait: Duration,
    ) -> Result<Self> {
        let mut client = Self::client(config)?;
        let consumer: BaseConsumer<SinkContext> =
            client.set("group.id", group).create_with_context(SinkContext::new(topic, Arc::clone(&sink))).map_err(Error::Client)?;
        let mut this = EventConsumer {
            consumer: Arc::new(consumer),
            topic: topic.to_string(),
            max_batch: max_batch.max(1),
            max_wait,
            in_group: false,
            assigned: Vec::new(),
        };
        let count = this.partition_count(METADATA_TIMEOUT)?;
        let chosen: Vec<i32> = match partitions {
            None => (0..count).collect(),
            Some(list) => {
                if let Some(bad) = list.iter().find(|p| !(0..count).contains(*p)) {
                    return Err(Error::Config(format!("partition {bad} does not exist: topic {topic} has partitions 0..{}", count - 1)));
                }
                list.iter().copied().collect::<BTreeSet<i32>>().into_iter().collect()
            }
        };
        let mut tpl = TopicPartitionList::new();
        for &p in &chosen {
            tpl.add_partition(topic, p);
        }
        this.consumer.context().set_resume_positions(&this.consumer, &chosen, &mut tpl);
        this.consumer.assign(&tpl).map_err(Error::Consume)?;
        tracing::info!(%topic, partitions = ?chosen, "partitions assigned (no consumer group)");
        sink.partitions_assigned(topic, &chosen);
        this.assigned = chosen;
        Ok(this)
    }

    /// The client settings both modes share.
    fn client(config: &KafkaConfig) -> Result<rdkafka::ClientConfig> {
        config.validate()?;
        let mut client = config.client_config();
        // librdkafka's 45 s default session timeout is how long a SIGKILLed member keeps its
        // partitions; 6 s is the smallest a stock Kafka broker accepts. Overridable.
        // Statistics every 5 s feed `consumer_lag`. A caught-up fetch returns after at most
        // 100 ms (librdkafka waits 500 ms; Tansu holds a fetch for the whole wait), which bounds
        // the latency of a new event. 10 ms cuts event → budget state p50 from 174 to 43 ms
        // (bench/README.md) at the price of 100 idle fetches a second; set it when that matters.
        let defaults = [("session.timeout.ms", "6000"), ("heartbeat.interval.ms", "1000"), ("statistics.interval.ms", "5000"), ("fetch.wait.max.ms", "100")];
        for (key, default) in defaults {
            if !config.librdkafka.contains_key(key) {
                client.set(key, default);
            }
        }
        client
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        Ok(client)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The number of partitions of the topic (a metadata request; blocks up to `timeout`).
    pub fn partition_count(&self, timeout: Duration) -> Result<i32> {
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), timeout).map_err(Error::Consume)?;
        let count = metadata.topics().iter().find(|t| t.name() == self.topic).map_or(0, |t| t.partitions().len());
        i32::try_from(count)
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| Error::Consume(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)))
    }

    /// Messages between the committed offset and the high watermark, per assigned partition, as
    /// of librdkafka's last statistics (`statistics.interval.ms`). Empty until the first report.
    pub fn consumer_lag(&self) -> BTreeMap<i32, i64> {
        self.consumer.context().lag.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Polls until a batch is full, the queue is drained, or `max_wait` has passed with nothing.
    /// Rebalances happen inside this call.
    pub async fn next_batch(&self) -> Result<Vec<Delivery>> {
        Self::joined(self.spawn_poll().await)
    }

    /// [`EventConsumer::next_batch`] as a task of its own: dropping the handle does not stop the
    /// poll, so a caller that waits for something else as well must keep the handle and await it
    /// later ([`EventConsumer::joined`]), or the batch it polled is lost.
    pub fn spawn_poll(&self) -> tokio::task::JoinHandle<Result<Vec<Delivery>>> {
        let consumer = Arc::clone(&self.consumer);
        let (max_batch, max_wait) = (self.max_batch, self.max_wait);
        tokio::task::spawn_blocking(move || poll_batch(&consumer, max_batch, max_wait))
    }

    /// The batch of a finished [`EventConsumer::spawn_poll`].
    pub fn joined(joined: std::result::Result<Result<Vec<Delivery>>, tokio::task::JoinError>) -> Result<Vec<Delivery>> {
        joined.map_err(|e| Error::PollThread(e.to_string()))?
    }

    /// Commits `next_offset` per partition to the group, so standard lag tools see progress.
    /// The ledger never resumes from these; they are informational.
    /// Without a group there is nowhere to commit: a no-op.
    pub fn commit(&self, next_offsets: &[(i32, i64)]) -> Result<()> {
        if next_offsets.is_empty() || !self.in_group {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, o) in next_offsets {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(o)).map_err(Error::Commit)?;
        }
        self.consumer.commit(&tpl, CommitMode::Async).map_err(Error::Commit)
    }

    /// Stops fetching `partition` (still assigned) until [`EventConsumer::rewind`]: for a
    /// partition whose owner cannot take its messages for a while (its storage failed).
    /// Messages of it already polled may still arrive in the next batch; the caller drops them.
    pub fn pause(&self, partition: i32) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        self.consumer.pause(&tpl).map_err(Error::Consume)
    }

    /// Moves a paused (or fetching) `partition` back to `resume` and fetches it again. librdkafka
    /// raises the partition's version barrier on a seek, so nothing it fetched before comes
    /// through afterwards: the next delivery of `partition` is the one at `resume`. Call it
    /// between polls (no [`EventConsumer::spawn_poll`] running), so no batch in the making
    /// straddles the seek. Blocks until the seek is done (up to [`WATERMARK_TIMEOUT`]).
    pub fn rewind(&self, partition: i32, resume: Resume) -> Result<()> {
        self.consumer.seek(&self.topic, partition, resume.offset(), WATERMARK_TIMEOUT).map_err(Error::Consume)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        self.consumer.resume(&tpl).map_err(Error::Consume)
    }

    /// The partitions currently assigned to this member.
    pub fn assignment(&self) -> Result<Vec<i32>> {
        let tpl = self.consumer.assignment().map_err(Error::Consume)?;
        Ok(tpl.elements().iter().map(|e| e.partition()).collect())
    }

    /// Leaves the group, or gives up the assigned partitions: the sink is told of the final
    /// revocation before this returns.
    pub async fn close(self) -> Result<()> {
        let consumer = self.consumer;
        if !self.in_group {
            // The partitions it was given, not librdkafka's view of them: close must revoke
            // (and so commit) every one even if the client can no longer say what it holds.
            let partitions = self.assigned;
            return tokio::task::spawn_blocking(move || {
                let context = consumer.context();
                context.revoked.lock().unwrap_or_else(PoisonError::into_inner).extend(partitions.iter().copied());
                context.sink.partitions_revoked(&context.topic, &partitions);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            })
            .await
            .map_err(|e| Error::PollThread(e.to_string()));
        }
        tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            // The revocation callback is served by poll; a few polls let it run before drop.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                consumer.poll(Duration::from_millis(50));
                if consumer.assignment().map(|a| a.count() == 0).unwrap_or(true) {
                    break;
                }
            }
        })
        .await
        .map_err(|e| Error::PollThread(e.to_string()))
    }
}

fn poll_batch(consumer: &BaseConsumer<SinkContext>, max_batch: usize, max_wait: Duration) -> Result<Vec<Delivery>> {
    let context = consumer.context();
    let deadline = Instant::now() + max_wait;
    let mut batch = Vec::new();
    while batch.len() < max_batch {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Wait for the first message only; after it, take what librdkafka already holds and stop
        // when its queue is drained, so a trickle of events is not held back for `max_wait`.
        let polled = consumer.poll(if batch.is_empty() { deadline - now } else { Duration::ZERO });
        // Rebalance callbacks run inside poll, before the message it returns: drop what we hold
        // of partitions revoked there, but keep what arrives after (possibly re-)assignment.
        let revoked = std::mem::take(&mut *context.revoked.lock().unwrap_or_else(PoisonError::into_inner));
        if !revoked.is_empty() {
            batch.retain(|d: &Delivery| !revoked.contains(&d.partition));
        }
        let message = match polled {
            None if !batch.is_empty() => break,
            None => continue,
            Some(Ok(m)) => m,
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(e)) => {
                // Transient broker errors are reported and polling continues; librdkafka recovers.
                tracing::warn!(error = %e, "consumer error");
                continue;
            }
        };
        let headers: Vec<(String, Vec<u8>)> =
            message.headers().map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()).unwrap_or_default();
        let value = message.payload().unwrap_or_default().to_vec();
        let key = message.key().map(<[u8]>::to_vec);
        let header_refs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        let outcome = decode_message(key.as_deref(), &value, &header_refs);
        batch.push(Delivery {
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key,
            value,
            headers,
            outcome,
        });
    }
    Ok(batch)
}
