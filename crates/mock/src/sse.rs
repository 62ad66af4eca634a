//! The response bodies of the mock, above all the chat completion stream.
//!
//! Owns: [`MockBody`] (a complete buffer or a paced SSE stream), the stream as a state machine polled by hyper
//! ([`SseBody`]: pacing, the `break_stream` cut, `[DONE]`) and the wire shape of its chunks.
//! Must not: spawn a task, use a channel or take a lock per stream. A thousand concurrent streams are a
//! thousand of these structs and their timers, and dropping one (the client left) frees everything it holds.
//! What a stream says is decided before it starts ([`SsePlan`]); this module only paces and encodes it.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;
use tokio::time::{Instant, Sleep};

use crate::answers::Usage;
use crate::error::MockError;
use crate::stats::GaugeGuard;
use crate::unix_now_us;

/// Pause before a `break_stream` cut, so the chunks before it are flushed to the client first.
const BREAK_FLUSH_PAUSE: Duration = Duration::from_millis(30);

/// The response body of the mock: a complete buffer or a paced SSE stream.
pub(crate) struct MockBody(BodyKind);

impl MockBody {
    /// A complete body, sent in one frame.
    pub(crate) fn full(data: Bytes) -> Self {
        Self(BodyKind::Full(Some(data)))
    }

    /// A paced SSE stream.
    pub(crate) fn stream(sse: SseBody) -> Self {
        Self(BodyKind::Sse(Box::new(sse)))
    }
}

enum BodyKind {
    Full(Option<Bytes>),
    Sse(Box<SseBody>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        match &mut self.0 {
            BodyKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyKind::Sse(sse) => sse.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Full(data) => data.is_none(),
            BodyKind::Sse(sse) => sse.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyKind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
            BodyKind::Sse(_) => SizeHint::default(),
        }
    }
}

/// Everything a stream will say.
pub(crate) struct SsePlan {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) pieces: Vec<String>,
    pub(crate) finish_reason: &'static str,
    pub(crate) usage: Usage,
    pub(crate) include_usage: bool,
    pub(crate) stamp: bool,
}

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice<'a>],
    /// Absent without `include_usage`; `null` on every chunk but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
    /// With `--stamp`: when the chunk was written, Unix microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_at_us: Option<u64>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// A chat completion stream as a state machine polled by hyper. Step 0 is the role chunk, steps 1..=n the
/// pieces, then the finish chunk, the usage chunk (with `include_usage`) and `[DONE]`. The role chunk waits for
/// `start`; piece k waits for `start + (k-1) * interval`. Dropped with the connection, so nothing leaks.
pub(crate) struct SseBody {
    plan: SsePlan,
    step: usize,
    start: Instant,
    interval: Option<Duration>,
    break_after: Option<usize>,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    done: bool,
    _in_flight: GaugeGuard,
}

impl SseBody {
    pub(crate) fn new(
        plan: SsePlan,
        start: Instant,
        interval: Option<Duration>,
        break_after: Option<usize>,
        in_flight: GaugeGuard,
    ) -> Self {
        Self {
            plan,
            step: 0,
            start,
            interval,
            break_after,
            sleep: Box::pin(tokio::time::sleep_until(start)),
            armed: false,
            done: false,
            _in_flight: in_flight,
        }
    }

    /// When the chunk of `step` may go out (`None` = right after the previous one).
    fn deadline(&self, step: usize) -> Option<Instant> {
        match step {
            0 => Some(self.start),
            k if k >= 2 && k <= self.plan.pieces.len() => {
                let gaps = u32::try_from(k - 1).unwrap_or(u32::MAX);
                self.interval.map(|i| self.start + i * gaps)
            }
            _ => None,
        }
    }

    /// Whether `step` is where a `break_stream` stream is cut (before the finish chunk at the latest).
    fn is_break_step(&self, step: usize) -> bool {
        self.break_after.is_some_and(|b| step == b.min(self.plan.pieces.len() + 1))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.is_break_step(self.step) {
            // Always pause once: hyper flushes what it holds while the body is pending, so the chunks
            // before the cut reach the client before the connection goes.
            if !self.armed {
                self.sleep.as_mut().reset(Instant::now() + BREAK_FLUSH_PAUSE);
                self.armed = true;
            }
            ready!(self.sleep.as_mut().poll(cx));
            self.done = true;
            return Poll::Ready(Some(Err(MockError::StreamBroken)));
        }
        if let Some(deadline) = self.deadline(self.step) {
            if deadline > Instant::now() {
                if !self.armed {
                    self.sleep.as_mut().reset(deadline);
                    self.armed = true;
                }
                ready!(self.sleep.as_mut().poll(cx));
            }
            self.armed = false;
        }
        let frame = match self.render(self.step) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Err(e) => {
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
        };
        self.step += 1;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    /// The SSE event of `step`, or `None` after `[DONE]`.
    fn render(&self, step: usize) -> Result<Option<Bytes>, MockError> {
        let plan = &self.plan;
        let n = plan.pieces.len();
        let usage_step = plan.include_usage.then_some(n + 2);
        let done_step = n + 2 + usize::from(plan.include_usage);
        if step == done_step {
            return Ok(Some(Bytes::from_static(b"data: [DONE]\n\n")));
        }
        if step > done_step {
            return Ok(None);
        }
        let null_usage = plan.include_usage.then_some(None);
        let (choices, usage) = if Some(step) == usage_step {
            (Vec::new(), Some(Some(plan.usage)))
        } else if step == 0 {
            let delta = Delta { role: Some("assistant"), content: Some("") };
            (one_choice(delta, None), null_usage)
        } else if step <= n {
            let delta = Delta { role: None, content: Some(&plan.pieces[step - 1]) };
            (one_choice(delta, None), null_usage)
        } else {
            (one_choice(Delta::default(), Some(plan.finish_reason)), null_usage)
        };
        let chunk = ChunkOut {
            id: &plan.id,
            object: "chat.completion.chunk",
            created: plan.created,
            model: &plan.model,
            system_fingerprint: "fp_sheepdog_mock",
            choices: &choices,
            usage,
            sent_at_us: plan.stamp.then(unix_now_us),
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut out, &chunk)?;
        out.extend_from_slice(b"\n\n");
        Ok(Some(Bytes::from(out)))
    }
}

fn one_choice<'a>(delta: Delta<'a>, finish_reason: Option<&'a str>) -> Vec<ChunkChoice<'a>> {
    vec![ChunkChoice { index: 0, delta, logprobs: None, finish_reason }]
}
