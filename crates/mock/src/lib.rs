//! The simulated OpenAI-compatible upstream behind `sheepdog mock`.
//!
//! Owns: the mock HTTP/1.1 server (chat completions with and without streaming, embeddings, the model list,
//! `/health`), its deterministic answers ([`answer_pieces`], [`prompt_tokens`]), fault injection
//! (`/_mock/faults`, [`MockHandle::set_faults`]) and request accounting (`/_mock/stats`).
//!
//! It is the test double of every other module, so it must stay faithful to the OpenAI wire format and cheap
//! enough to feed a thousand concurrent streams: one task per connection, streams are a body state machine
//! (no task, no channel per stream), and no lock is ever held across an `.await`.
//! It knows nothing about the gateway: no config file, no metrics, no dependency on other sheepdog crates.
//! [`demo`] runs three of them in-process for the embedded demo.
//!
//! Layout: `options` (the settings), `faults` (the fault state), `stats` (the accounting), `answers` (what the
//! mock says), `server` (shared state, accept loop, connections), `routes` (what a request gets), `sse` (the
//! response bodies and the stream state machine) and `error` (why a connection ends without an answer). The
//! modules are private; this file holds the entry points ([`spawn`], [`run`], [`MockHandle`]) and re-exports
//! everything public at the crate root, so the public paths do not depend on the layout.

mod answers;
pub mod demo;
mod error;
mod faults;
mod options;
mod routes;
mod server;
mod sse;
mod stats;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;

pub use answers::{answer_pieces, answer_pieces_of, base64_encode, prompt_tokens, DEFAULT_ANSWER_TOKENS};
pub use faults::{FaultMode, FaultState, Faults};
pub use options::{MockArgs, MockOptions};
pub use stats::MockStats;

use server::Shared;

/// Handle to a running mock: change its faults, read its stats, stop it. Cheap to clone.
#[derive(Clone)]
pub struct MockHandle {
    shared: Arc<Shared>,
}

impl MockHandle {
    /// The address the mock listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Changes the fault state at once, exactly as `POST /_mock/faults` does.
    pub fn set_faults(&self, f: Faults) {
        self.shared.faults.lock().apply(&f);
    }

    /// The fault state in force.
    pub fn faults(&self) -> FaultState {
        *self.shared.faults.lock()
    }

    /// What reached the mock so far.
    pub fn stats(&self) -> MockStats {
        self.shared.stats.snapshot()
    }

    /// Stops accepting connections and closes the open ones (requests in progress are cut).
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// Starts a mock on an already-bound listener and returns at once; it serves on spawned tasks, so this must
/// be called inside a Tokio runtime. Fails on invalid options or when the listener has no local address.
pub fn spawn(listener: TcpListener, opts: MockOptions) -> io::Result<MockHandle> {
    opts.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(opts, addr));
    tokio::spawn(server::accept_loop(listener, shared.clone()));
    Ok(MockHandle { shared })
}

/// `sheepdog mock` on a listener bound to `args.listen` by the caller: prints `sheepdog mock NAME listening on
/// ADDR` to stdout and serves until SIGINT/SIGTERM.
pub async fn run(args: MockArgs, listener: TcpListener) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write as _;

    let opts = MockOptions::from(&args);
    opts.validate()?;
    let name = opts.name.clone();
    let handle = spawn(listener, opts)?;
    // Handlers go in before the ready line: whoever reads it may signal at once.
    let stop = shutdown_signal()?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "sheepdog mock {name} listening on {}", handle.local_addr())?;
        out.flush()?;
    }
    stop.await;
    handle.shutdown();
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers at once; the returned future ends at the first signal.
fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            // Without a handler there is nothing to wait for: stop as if signalled.
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// The wall clock as Unix microseconds (0 if the clock is before 1970); seconds are this divided by a million.
pub(crate) fn unix_now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
