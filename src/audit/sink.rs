//! Feeds the daemon's own events into the audit log.
//!
//! A `tracing` layer ([`AuditLayer`], installed by [`crate::events::init_tracing`])
//! copies every record that carries an `event` field into a bounded channel; a
//! writer thread ([`start`]) appends them with [`super::writer::AuditWriter`], so
//! the thread that logged never waits on disk. Events are never per packet
//! (failures are throttled upstream), so the channel only overflows under a
//! fault; overflow is counted and reported in the next record that gets through.
//!
//! The layer has its own filter ([`AuditFilter`]), independent of `RUST_LOG` and
//! the stderr filter: security events reach the audit log even with
//! `RUST_LOG=off`. It takes exactly the events that carry an `event` field at
//! `info` or above, decided once per callsite, so other callsites (boringtun's
//! per-packet chatter) cost nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::Layer;

use super::writer::{AuditError, AuditWriter, HeadStore};

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
    event == "audit_error"
        || event == "audit_chain_broken"
        || fields.get("origin").and_then(Value::as_str) == Some("control")
}

static SENDER: Mutex<Option<SyncSender<Record>>> = Mutex::new(None);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The `tracing` layer; inert until [`start`] connects a writer.
#[derive(Debug, Default)]
pub struct AuditLayer;

/// The audit layer's own filter (see the module doc); attach it with
/// `AuditLayer.with_filter(AuditFilter)` so that no other filter applies.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuditFilter;

impl AuditFilter {
    fn wants(meta: &Metadata<'_>) -> bool {
        meta.is_event() && *meta.level() <= Level::INFO && meta.fields().field("event").is_some()
    }
}

impl<S> Filter<S> for AuditFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        Self::wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::wants(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }
}

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

/// How long the writer idles before the head store may retry what it holds
/// back (see [`HeadStore::retry_pending`]).
const RETRY_IDLE: Duration = Duration::from_secs(2);

/// Writes what the channel holds, a group commit at a time: it blocks for one
/// record, then sleeps out [`GROUP_COMMIT_WINDOW`] and takes what arrived (up
/// to [`BATCH`]). Sleeping rather than waiting on the channel means a burst
/// of events (3,000 handshakes a second) wakes this thread once per window,
/// not once per event: the packet loops that log them pay no futex wake.
fn drain(rx: Receiver<Record>, writer: &AuditWriter, heads: &dyn HeadStore) {
    let mut failing = false;
    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    loop {
        let first = match rx.recv_timeout(RETRY_IDLE) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                heads.retry_pending();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        batch.push(first);
        std::thread::sleep(GROUP_COMMIT_WINDOW);
        while batch.len() < BATCH {
            match rx.try_recv() {
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
            Err(e @ AuditError::Broken { .. }) if !failing => {
                failing = true;
                tracing::error!(event = "audit_chain_broken", error = %e);
            }
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
        assert!(skip("audit_chain_broken", &f));
        f.insert("origin".into(), "control".into());
        assert!(skip("peer_revoked", &f));
    }

    /// The audit filter takes `event`-carrying records at info and above, and
    /// ignores whatever filter the stderr layer has (`RUST_LOG=off`).
    #[test]
    fn audit_layer_ignores_the_log_filter() {
        use std::sync::{Arc, Mutex as StdMutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Seen(Arc<StdMutex<Vec<String>>>);
        impl<S: Subscriber> Layer<S> for Seen {
            fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
                let mut v = JsonVisitor(Map::new());
                event.record(&mut v);
                if let Some(Value::String(name)) = v.0.get("event") {
                    self.0.lock().unwrap().push(name.clone());
                }
            }
        }
        let seen = Seen::default();
        let stderr_seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(
                stderr_seen
                    .clone()
                    .with_filter(tracing_subscriber::EnvFilter::new("off")),
            )
            .with(seen.clone().with_filter(AuditFilter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(event = "handshake", peer = "a");
            tracing::warn!(event = "peer_revoked", peer = "a");
            tracing::debug!(event = "control_error", error = "x");
            tracing::info!(peer = "no event field");
        });
        assert_eq!(*seen.0.lock().unwrap(), ["handshake", "peer_revoked"]);
        assert!(stderr_seen.0.lock().unwrap().is_empty());
    }
}
