//! The built-in web dashboard at `GET /dashboard`: one self-contained page (`dashboard.html`, compiled into the
//! binary: no build step, nothing fetched from the internet), light and dark, laptop and phone.
//!
//! Static content only. The page polls the JSON and text routes — `/status` (health, breakers, recent check
//! latencies), `/metrics` (requests, errors, failovers, cost, in flight) and `/api/stats` (cost today and
//! budgets; "no budgets" while that route answers 404) — and keeps the last ten minutes of samples itself, so it
//! cannot drift from them and costs the gateway nothing between polls.

/// The page served at `GET /dashboard`.
pub const PAGE: &str = include_str!("dashboard.html");
