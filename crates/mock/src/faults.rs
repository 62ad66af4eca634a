//! Fault injection: the modes the mock can misbehave in and the fault state in force.
//!
//! Owns: [`FaultMode`], the change a client posts to `/_mock/faults` ([`Faults`]), the state it changes
//! ([`FaultState`]) and how a change applies (fields left out are kept, rates clamped to 0..=1).
//! Must not: act on a fault. Resetting connections, hanging, delaying and drawing errors are the server's
//! work; this module is plain data with no I/O, no clock and no randomness.

use serde::{Deserialize, Serialize};

/// `latency_ms` of the fault state at start: the added delay of `slow` mode.
const DEFAULT_SLOW_LATENCY_MS: u64 = 1000;
/// `retry_after_s` of the fault state at start: the `Retry-After` of `error_429` mode.
const DEFAULT_RETRY_AFTER_S: u64 = 1;

/// Behaviour of the mock for every path but `/_mock/*`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FaultMode {
    /// Normal answers (`error_rate` still applies).
    #[default]
    #[serde(rename = "ok")]
    Ok,
    /// Every request gets 500 with an OpenAI `server_error` body.
    #[serde(rename = "error_500")]
    Error500,
    /// Every request gets 429 with `Retry-After` and an OpenAI rate-limit body.
    #[serde(rename = "error_429")]
    Error429,
    /// Requests are read and never answered, until the client (or the mock) closes the connection.
    #[serde(rename = "hang")]
    Hang,
    /// The connection is reset (TCP RST) after the request is read; no HTTP answer.
    #[serde(rename = "reset")]
    Reset,
    /// Normal answers delayed by `latency_ms` more, with stream chunks four times slower.
    #[serde(rename = "slow")]
    Slow,
    /// Streams send a few chunks and then the connection is cut mid-body; other requests as `reset`.
    #[serde(rename = "break_stream")]
    BreakStream,
}

/// A change of the fault state: the JSON body of `POST /_mock/faults`. A field left out keeps its value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// New mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<FaultMode>,
    /// Delay added to every answer in `slow` mode (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Fraction (0..=1) of requests answered 500 in `ok` and `slow` modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// `Retry-After` seconds of `error_429` answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

impl Faults {
    /// Checks the values: `error_rate` within 0..=1.
    pub fn validate(&self) -> Result<(), String> {
        match self.error_rate {
            Some(r) if !(0.0..=1.0).contains(&r) => Err(format!("error_rate must be between 0 and 1, got {r}")),
            _ => Ok(()),
        }
    }
}

/// The complete fault state in force (`GET /_mock/faults`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct FaultState {
    /// Current mode.
    pub mode: FaultMode,
    /// Delay added to every answer in `slow` mode (milliseconds); 1000 at start.
    pub latency_ms: u64,
    /// Fraction of requests answered 500 in `ok` and `slow` modes; `--error-rate` at start.
    pub error_rate: f64,
    /// `Retry-After` seconds of `error_429` answers; 1 at start.
    pub retry_after_s: u64,
}

impl FaultState {
    /// The state at start: mode `ok`, the given error rate (clamped), the default slow latency and `Retry-After`.
    pub(crate) fn initial(error_rate: f64) -> Self {
        Self {
            mode: FaultMode::Ok,
            latency_ms: DEFAULT_SLOW_LATENCY_MS,
            error_rate: clamp_rate(error_rate),
            retry_after_s: DEFAULT_RETRY_AFTER_S,
        }
    }

    /// Applies a change: fields set in `f` replace the current ones; `error_rate` is clamped to 0..=1.
    pub fn apply(&mut self, f: &Faults) {
        if let Some(mode) = f.mode {
            self.mode = mode;
        }
        if let Some(ms) = f.latency_ms {
            self.latency_ms = ms;
        }
        if let Some(rate) = f.error_rate {
            self.error_rate = clamp_rate(rate);
        }
        if let Some(s) = f.retry_after_s {
            self.retry_after_s = s;
        }
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fault_changes_keep_fields_left_out() {
        let mut state = FaultState::initial(0.25);
        assert_eq!(state.mode, FaultMode::Ok);
        assert_eq!(state.latency_ms, DEFAULT_SLOW_LATENCY_MS);
        assert_eq!(state.retry_after_s, DEFAULT_RETRY_AFTER_S);

        let f: Faults =
            serde_json::from_str(r#"{"mode": "error_429", "retry_after_s": 9}"#).unwrap_or_else(|e| panic!("{e}"));
        state.apply(&f);
        assert_eq!(state.mode, FaultMode::Error429);
        assert_eq!(state.retry_after_s, 9);
        assert_eq!(state.error_rate, 0.25);

        let f: Faults = serde_json::from_str(r#"{"latency_ms": 250}"#).unwrap_or_else(|e| panic!("{e}"));
        state.apply(&f);
        assert_eq!(state.mode, FaultMode::Error429);
        assert_eq!(state.latency_ms, 250);

        state.apply(&Faults::default());
        assert_eq!(state.latency_ms, 250);

        for (text, mode) in [
            ("ok", FaultMode::Ok),
            ("error_500", FaultMode::Error500),
            ("error_429", FaultMode::Error429),
            ("hang", FaultMode::Hang),
            ("reset", FaultMode::Reset),
            ("slow", FaultMode::Slow),
            ("break_stream", FaultMode::BreakStream),
        ] {
            let f: Faults =
                serde_json::from_str(&format!(r#"{{"mode": "{text}"}}"#)).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(f.mode, Some(mode));
            assert_eq!(serde_json::to_value(mode).ok(), Some(json!(text)));
        }
    }

    #[test]
    fn fault_changes_reject_bad_input() {
        assert!(serde_json::from_str::<Faults>(r#"{"mode": "broken"}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"latency": 5}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"latency_ms": -5}"#).is_err());
        let f: Faults = serde_json::from_str(r#"{"error_rate": 1.5}"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(f.validate().is_err());
        let mut state = FaultState::initial(0.0);
        state.apply(&f);
        assert_eq!(state.error_rate, 1.0, "programmatic changes are clamped");
    }
}
