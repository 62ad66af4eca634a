//! Client keys of a snapshot: who may ask, for which models, and each client's live rate-limit state.
//!
//! Keys are never kept: a presented key is hashed (SHA-256) and compared with every configured hash in constant
//! time, scanning all of them whatever matches, so neither the timing nor the order of clients tells anything
//! about a key. A client's live state (its buckets and in-flight count) is carried over a reload when its name
//! stays, so a reload neither refills anyone's allowance nor forgets requests in flight. Decisions are the
//! policy crate's ([`sheepdog_policy::ratelimit`]); this module holds the state under short locks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use sheepdog_policy::ratelimit::Limits;

use crate::config::{hash_client_key, hashes_equal, ClientConfig};

/// A client's state that outlives snapshots.
pub struct ClientLive {
    /// Its rpm / tpm buckets.
    pub limits: Mutex<Limits>,
    /// Requests in flight now.
    pub in_flight: AtomicU32,
    /// The (rpm, tpm) the buckets were made for.
    made_for: Mutex<(Option<u32>, Option<u64>)>,
}

/// One configured client.
pub struct Client {
    /// Its configuration.
    pub cfg: ClientConfig,
    /// Its name, shared with request-log entries.
    pub name: Arc<str>,
    /// Live state.
    pub live: Arc<ClientLive>,
}

impl Client {
    /// Whether it may ask for `model` (a configured model or a route alias).
    pub fn allows(&self, model: &str) -> bool {
        self.cfg.models.as_ref().is_none_or(|m| m.iter().any(|x| x == model))
    }

    /// Count one more request in flight unless `max_parallel` are; the guard counts it out.
    pub fn enter(self: &Arc<Self>) -> Option<ParallelGuard> {
        let max = self.cfg.max_parallel.unwrap_or(u32::MAX);
        let n = &self.live.in_flight;
        let mut cur = n.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match n.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(ParallelGuard(self.live.clone())),
                Err(now) => cur = now,
            }
        }
    }
}

/// One request of a client in flight; dropping it counts the request out.
pub struct ParallelGuard(Arc<ClientLive>);

impl Drop for ParallelGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The configured clients; none means anonymous requests are served.
#[derive(Default)]
pub struct Clients {
    list: Vec<Arc<Client>>,
}

impl Clients {
    /// Build from the config, carrying live state of clients whose name stays.
    pub fn build(cfgs: &[ClientConfig], old: Option<&Clients>) -> Clients {
        let list = cfgs
            .iter()
            .map(|c| {
                let want = (c.rpm, c.tpm);
                let live = match old.and_then(|o| o.list.iter().find(|p| p.cfg.name == c.name)) {
                    Some(p) => {
                        let mut made = p.live.made_for.lock();
                        if *made != want {
                            *p.live.limits.lock() = Limits::new(c.rpm.map(u64::from), c.tpm, 0);
                            *made = want;
                        }
                        p.live.clone()
                    }
                    None => Arc::new(ClientLive {
                        limits: Mutex::new(Limits::new(c.rpm.map(u64::from), c.tpm, 0)),
                        in_flight: AtomicU32::new(0),
                        made_for: Mutex::new(want),
                    }),
                };
                Arc::new(Client { cfg: c.clone(), name: Arc::from(c.name.as_str()), live })
            })
            .collect();
        Clients { list }
    }

    /// No clients configured: requests need no key.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The client whose key this is.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Client>> {
        let h = hash_client_key(key);
        let mut found = None;
        for c in &self.list {
            if hashes_equal(&c.cfg.key_hash, &h) {
                found = Some(c.clone());
            }
        }
        found
    }

    /// Every client, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, key: &str, rpm: Option<u32>) -> ClientConfig {
        ClientConfig {
            name: name.into(),
            key_hash: hash_client_key(key),
            models: Some(vec!["gpt-4.1".into()]),
            rpm,
            tpm: None,
            max_parallel: Some(2),
        }
    }

    #[test]
    fn keys_models_parallel_and_state_across_a_reload() {
        let c = Clients::build(&[cfg("a", "sk-a", Some(2)), cfg("b", "sk-b", None)], None);
        assert_eq!(c.authenticate("sk-b").map(|c| c.name.to_string()), Some("b".into()));
        assert!(c.authenticate("sk-c").is_none() && c.authenticate("").is_none());
        let a = c.authenticate("sk-a").unwrap();
        assert!(a.allows("gpt-4.1") && !a.allows("claude"));
        let (g1, g2) = (a.enter().unwrap(), a.enter().unwrap());
        assert!(a.enter().is_none(), "max_parallel = 2");
        drop(g1);
        let g3 = a.enter().unwrap();
        assert!(a.live.limits.lock().admit(0, 0).is_ok());
        // A reload keeps the in-flight count and the buckets of a client whose limits did not change …
        let c2 = Clients::build(&[cfg("a", "sk-a", Some(2))], Some(&c));
        let a2 = c2.authenticate("sk-a").unwrap();
        assert!(a2.enter().is_none(), "two still in flight");
        assert_eq!(a2.live.limits.lock().snapshot(0).requests.map(|r| r.1), Some(1));
        // … and makes new buckets when they did.
        let c3 = Clients::build(&[cfg("a", "sk-a", Some(5))], Some(&c2));
        assert_eq!(c3.authenticate("sk-a").unwrap().live.limits.lock().snapshot(0).requests.map(|r| r.1), Some(5));
        drop((g2, g3));
        assert_eq!(a2.live.in_flight.load(Ordering::Relaxed), 0);
    }
}
