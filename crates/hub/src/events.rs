//! Live, in-memory fleet state: which devices hold their event stream open,
//! and a wake-up signal per device when a message is stored for it.
//!
//! Messages themselves are always in the store first; this only says "look
//! again". A stream that misses a signal loses nothing, because it reads the
//! store from the last sequence number it sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use protocol::DeviceId;
use tokio::sync::watch;

#[derive(Default)]
struct Inner {
    signals: HashMap<DeviceId, watch::Sender<i64>>,
    online: HashMap<DeviceId, usize>,
}

/// Shared live state of the device streams.
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventBus")
    }
}

impl EventBus {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps inconsistent
        // (each update is a single insert or counter change), so recover.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to "new messages" signals for a device.
    pub fn subscribe(&self, id: &DeviceId) -> watch::Receiver<i64> {
        self.lock()
            .signals
            .entry(id.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Signals that a message with sequence number `seq` was stored for `id`.
    pub fn notify(&self, id: &DeviceId, seq: i64) {
        if let Some(tx) = self.lock().signals.get(id) {
            tx.send_replace(seq);
        }
    }

    /// Marks a stream of `id` open until the guard is dropped.
    pub fn online(&self, id: &DeviceId) -> OnlineGuard {
        *self.lock().online.entry(id.clone()).or_default() += 1;
        OnlineGuard {
            bus: self.clone(),
            id: id.clone(),
        }
    }

    /// True while the device holds at least one stream open.
    pub fn is_online(&self, id: &DeviceId) -> bool {
        self.lock().online.get(id).is_some_and(|n| *n > 0)
    }

    /// Number of devices with an open stream.
    pub fn online_count(&self) -> usize {
        self.lock().online.values().filter(|n| **n > 0).count()
    }
}

/// Keeps a device counted as online; see [`EventBus::online`].
pub struct OnlineGuard {
    bus: EventBus,
    id: DeviceId,
}

impl Drop for OnlineGuard {
    fn drop(&mut self) {
        let mut inner = self.bus.lock();
        if let Some(n) = inner.online.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.online.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_follows_guards() {
        let bus = EventBus::default();
        let id = DeviceId::new("dev-1");
        assert!(!bus.is_online(&id));
        let a = bus.online(&id);
        let b = bus.online(&id);
        drop(a);
        assert!(bus.is_online(&id));
        assert_eq!(bus.online_count(), 1);
        drop(b);
        assert!(!bus.is_online(&id));
    }

    #[tokio::test]
    async fn notify_wakes_subscribers() {
        let bus = EventBus::default();
        let id = DeviceId::new("dev-1");
        let mut rx = bus.subscribe(&id);
        bus.notify(&id, 7);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 7);
    }
}
