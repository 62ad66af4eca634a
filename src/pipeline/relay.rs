//! The *relay* phase for streams: an upstream SSE stream relayed to the client event by event as frames arrive,
//! scanned for its usage on the way and cut after `data: [DONE]` ([`SseScanner`]), and ended however it ends —
//! with *finish* called exactly once.
//!
//! A failure after the first byte cannot fail over: the relay ends the stream with an SSE error event and a
//! clean close. An idle gap longer than the endpoint's first-byte timeout, or the whole-request timeout, ends it
//! too. The relay owns the request's [`Finish`]; if the client goes away, the relay is dropped and so is it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tokio::time::{Instant, Sleep};

use super::attempt::StreamStart;
use super::finish::{Ending, Finish};
use crate::protocol::openai::{self, SseScanner};
use crate::protocol::ApiError;
use crate::upstream::UpstreamBody;

/// An upstream SSE stream on its way to the client.
pub struct Relay {
    first: Option<Bytes>,
    upstream: UpstreamBody,
    scanner: SseScanner,
    idle: Duration,
    end_by: Instant,
    /// When the last chunk arrived: the idle deadline is `last_data + idle` (capped by `end_by`).
    last_data: Instant,
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with: while it is the same and the timer is not due, the timer
    /// need not be polled again (it wakes that waker when it fires).
    timer_waker: Option<Waker>,
    /// What the client got, kept (up to [`KEEP_BYTES`]) to count the completion's tokens when the upstream
    /// does not report usage; `None` once its endpoint has shown that it does.
    kept: Option<Kept>,
    finish: Finish,
    finished: bool,
}

/// The most of a stream kept for counting its tokens; past it the count is scaled by the bytes relayed.
const KEEP_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Kept {
    frames: Vec<Bytes>,
    kept: usize,
    seen: usize,
}

impl Kept {
    fn push(&mut self, b: &Bytes) {
        self.seen += b.len();
        if self.kept + b.len() <= KEEP_BYTES {
            self.kept += b.len();
            self.frames.push(b.clone());
        }
    }

    fn completion_tokens(&self) -> u64 {
        let n = openai::content::estimate_stream_completion(&self.frames);
        if self.kept == 0 || self.seen == self.kept {
            return n;
        }
        (n as f64 * self.seen as f64 / self.kept as f64).round() as u64
    }
}

impl Relay {
    /// Relay a stream that sent its first chunk; `finish` is ended when the stream ends.
    pub(super) fn new(start: StreamStart, finish: Finish) -> Relay {
        let StreamStart { first, upstream, scanner, idle, end_by } = start;
        let now = Instant::now();
        let mut kept = finish.may_need_estimate().then(Kept::default);
        if let Some(k) = &mut kept {
            k.push(&first);
        }
        Relay {
            kept,
            first: Some(first),
            upstream,
            scanner,
            idle,
            end_by,
            last_data: now,
            timer: Box::pin(tokio::time::sleep_until((now + idle).min(end_by))),
            timer_waker: None,
            finish,
            finished: false,
        }
    }

    fn end(&mut self, ending: Ending) {
        self.finished = true;
        match (self.scanner.usage(), &self.kept) {
            (Some(u), _) => self.finish.stream_usage(u),
            (None, Some(k)) => self.finish.estimated_usage(k.completion_tokens()),
            (None, None) => {}
        }
        self.finish.end(200, ending);
    }

    fn fail(&mut self, message: &str, label: &'static str) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let e = ApiError::bad_upstream(format!(
            "The upstream stream from endpoint `{}` broke: {message}",
            self.finish.endpoint_name()
        ));
        self.end(Ending::StreamBroken(label));
        Poll::Ready(Some(Ok(Frame::data(openai::sse_error_event(&e)))))
    }

    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            match Pin::new(&mut self.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    // The idle timer is pushed back lazily, when it fires (see below): not once per chunk.
                    self.last_data = Instant::now();
                    let scanned = self.scanner.feed(data);
                    if let Some(k) = self.kept.as_mut().filter(|_| !scanned.out.is_empty()) {
                        k.push(&scanned.out);
                    }
                    if scanned.done {
                        // Nothing after `data: [DONE]` reaches the client; the connection is reused.
                        std::mem::replace(&mut self.upstream, UpstreamBody::Ended).finish();
                        self.end(Ending::Complete);
                    } else if self.scanner.overflowed() {
                        return self.fail("an event larger than 4 MB", "error");
                    } else if scanned.out.is_empty() {
                        continue;
                    }
                    return Poll::Ready((!scanned.out.is_empty()).then(|| Ok(Frame::data(scanned.out))));
                }
                Poll::Ready(Some(Err(_))) => return self.fail("connection lost mid-stream", "error"),
                Poll::Ready(None) => {
                    let rest = self.scanner.finish();
                    if let Some(k) = &mut self.kept {
                        k.push(&rest);
                    }
                    self.end(Ending::Complete);
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Pending => {
                    let armed = self.timer_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
                    if armed && Instant::now() < self.timer.deadline() {
                        return Poll::Pending;
                    }
                    if !armed {
                        self.timer_waker = Some(cx.waker().clone());
                    }
                    while self.timer.as_mut().poll(cx).is_ready() {
                        let due = (self.last_data + self.idle).min(self.end_by);
                        if Instant::now() >= due {
                            return self.fail("no data within the timeout", "timeout");
                        }
                        self.timer.as_mut().reset(due);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client went away mid-stream (or the server stopped waiting): keep what the stream used so far.
        if !self.finished {
            self.end(Ending::ClientGone);
        }
    }
}
