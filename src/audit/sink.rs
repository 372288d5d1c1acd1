//! Feeds the daemon's own events into the audit log.
//!
//! A `tracing` layer ([`AuditLayer`], installed by [`crate::events::init_tracing`])
//! copies every record that carries an `event` field into a bounded channel; a
//! writer thread ([`start`]) appends them with [`super::writer::AuditWriter`], so
//! the thread that logged never waits on disk. Events are never per packet
//! (failures are throttled upstream), so the channel only overflows under a
//! fault; overflow is counted and reported in the next record that gets through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use super::writer::{AuditWriter, HeadStore};

/// Records buffered between the logging threads and the writer.
pub const CHANNEL_DEPTH: usize = 4096;

/// One record on its way to the file.
#[derive(Debug)]
pub struct Record {
    pub ts: String,
    pub event: String,
    pub fields: Map<String, Value>,
}

/// Events that are never audited: the writer's own failures (auditing them
/// could loop) and admin events relayed over the control socket, which the
/// admin command has already appended itself.
fn skip(event: &str, fields: &Map<String, Value>) -> bool {
    event == "audit_error" || fields.get("origin").and_then(Value::as_str) == Some("control")
}

static SENDER: Mutex<Option<SyncSender<Record>>> = Mutex::new(None);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The `tracing` layer; inert until [`start`] connects a writer.
#[derive(Debug, Default)]
pub struct AuditLayer;

struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}").into());
    }
}

impl<S: Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Ok(guard) = SENDER.lock() else { return };
        let Some(tx) = guard.as_ref() else { return };
        let mut visitor = JsonVisitor(Map::new());
        event.record(&mut visitor);
        let mut fields = visitor.0;
        let Some(Value::String(name)) = fields.remove("event") else {
            return;
        };
        if skip(&name, &fields) {
            return;
        }
        fields.remove("message");
        fields.insert("level".into(), event.metadata().level().as_str().into());
        let ts = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            fields.insert("audit_dropped_before".into(), dropped.into());
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(Record {
            ts,
            event: name,
            fields,
        }) {
            DROPPED.fetch_add(1 + dropped, Ordering::Relaxed);
        }
    }
}

/// The running writer thread; [`Sink::stop`] drains the channel and joins.
pub struct Sink {
    thread: JoinHandle<()>,
}

/// Connects the layer to a writer thread appending to `writer` with `heads`.
///
/// # Errors
/// The thread cannot be spawned.
pub fn start<H: HeadStore + Send + 'static>(
    writer: AuditWriter,
    heads: H,
) -> std::io::Result<Sink> {
    let (tx, rx) = sync_channel(CHANNEL_DEPTH);
    let thread = std::thread::Builder::new()
        .name("sg-audit".into())
        .spawn(move || drain(rx, &writer, &heads))?;
    if let Ok(mut g) = SENDER.lock() {
        *g = Some(tx);
    }
    Ok(Sink { thread })
}

impl Sink {
    /// Disconnects the layer, writes what is queued, and waits for the thread.
    pub fn stop(self) {
        if let Ok(mut g) = SENDER.lock() {
            *g = None;
        }
        let _ = self.thread.join();
    }
}

/// Records written per group commit at most.
const BATCH: usize = 256;
/// How long a group commit waits for more records after the first: a burst of
/// events (a thousand sites renewing) then costs a store transaction and an
/// fsync per window instead of one per event. Audit lines appear this much later.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(20);

/// Writes what the channel holds, a group commit at a time: it blocks for one
/// record, then takes what arrives within [`GROUP_COMMIT_WINDOW`] (up to
/// [`BATCH`]).
fn drain(rx: Receiver<Record>, writer: &AuditWriter, heads: &dyn HeadStore) {
    let mut failing = false;
    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let deadline = Instant::now() + GROUP_COMMIT_WINDOW;
        while batch.len() < BATCH {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let records: Vec<(&str, &str, &Map<String, Value>)> = batch
            .iter()
            .map(|r| (r.ts.as_str(), r.event.as_str(), &r.fields))
            .collect();
        match writer.append_batch(heads, &records) {
            Ok(_) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::error!(event = "audit_error", error = %e);
            }
            Err(_) => {}
        }
        drop(records);
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relayed admin events and the writer's own errors are not re-audited.
    #[test]
    fn skip_rules() {
        let mut f = Map::new();
        assert!(!skip("handshake", &f));
        assert!(skip("audit_error", &f));
        f.insert("origin".into(), "control".into());
        assert!(skip("peer_revoked", &f));
    }
}
