//! *Finish* runs exactly once per request however it ends: each ending through a real socket, against real
//! `sheepdog mock` upstreams, gives exactly one request-log row and one `sheepdog_client_requests_total`
//! increment, with the status the client got (499 when it went away first).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use sheepdog::log::{open_read, read_since, Entry};

fn rows(path: &std::path::Path) -> Vec<Entry> {
    open_read(path).and_then(|c| read_since(&c, 0)).unwrap_or_default()
}

/// `sheepdog_client_requests_total` by (model, status).
fn client_requests(metrics: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("sheepdog_client_requests_total{")) {
        let labels = &line[line.find('{').unwrap() + 1..line.find('}').unwrap()];
        let get = |k: &str| {
            let at = labels.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
            labels[at..at + labels[at..].find('"').unwrap()].to_string()
        };
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        out.insert((get("model"), get("status")), n as u64);
    }
    out
}

/// Start a request and drop it once `until_first_frame` (or at once when false) — the client goes away.
async fn abandon(url: &str, body: &str, until_first_frame: bool) {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    if until_first_frame {
        let resp = client().request(req).await.unwrap();
        let mut b = resp.into_body();
        b.frame().await.unwrap().unwrap();
    } else {
        let _ = tokio::time::timeout(Duration::from_millis(300), client().request(req)).await;
    }
}

#[tokio::test]
async fn every_ending_gives_exactly_one_row_and_one_metric_increment() {
    let ok = mock("ok", "fast", &["--tokens-per-sec", "20"]);
    let dead = mock("dead", "dead", &[]);
    let slow = mock("slow", "slow", &["--latency-ms", "10000"]);
    let cfg = format!(
        "[health]\ninterval = \"1h\"\nidle_interval = \"1h\"\nprobe = \"models\"\n\n\
         [retry]\nmax_attempts = 2\nbackoff_base = \"10ms\"\ndeadline = \"1500ms\"\n\n\
         [[endpoints]]\nname = \"ok\"\nbase_url = \"http://{}/v1\"\nmodels = [\"fast\"]\n\n\
         [[endpoints]]\nname = \"dead\"\nbase_url = \"http://{}/v1\"\nmodels = [\"dead\"]\n\n\
         [[endpoints]]\nname = \"slow\"\nbase_url = \"http://{}/v1\"\nmodels = [\"slow\"]\n\n{}{}{}",
        ok.addr,
        dead.addr,
        slow.addr,
        model("fast", ""),
        model("dead", ""),
        model("slow", "")
    );
    let mut gw = gateway(&cfg, &[]);
    let db = gw.dir.path().join("sheepdog.db");
    let url = gw.url("/v1/chat/completions");
    faults(&dead, r#"{"mode":"error_500"}"#).await;
    let stream_body = |model: &str, tokens: u32| {
        format!(
            r#"{{"model":"{model}","stream":true,"max_tokens":{tokens},"messages":[{{"role":"user","content":"x"}}]}}"#
        )
    };

    // Answered: JSON and a stream to its end.
    assert_eq!(post(&url, &chat("fast")).await.status, 200);
    let s = stream(&url, &stream_body("fast", 3)).await;
    assert_eq!((s.status, s.error.as_deref()), (200, None));
    // Refused: not JSON, and a model that does not exist.
    assert_eq!(post(&url, "{not json").await.status, 400);
    assert_eq!(post(&url, &chat("no-such-model")).await.status, 404);
    // Every upstream attempt failed.
    assert_eq!(post(&url, &chat("dead")).await.status, 503);
    // The deadline passed while the upstream kept quiet.
    assert_eq!(post(&url, &chat("slow")).await.status, 504);
    // The client went away mid-stream, and before the first byte.
    abandon(&url, &stream_body("fast", 20), true).await;
    abandon(&url, &chat("slow"), false).await;

    let expected: BTreeMap<(String, String), u64> = [
        (("dead", "503"), 1),
        (("fast", "200"), 2),
        (("fast", "499"), 1),
        (("slow", "499"), 1),
        (("slow", "504"), 1),
        (("unknown", "400"), 1),
        (("unknown", "404"), 1),
    ]
    .into_iter()
    .map(|((m, s), n)| ((m.to_string(), s.to_string()), n))
    .collect();
    eventually(Duration::from_secs(10), "8 rows and 8 metric increments", || async {
        rows(&db).len() >= 8 && client_requests(&get(&gw.url("/metrics")).await.text()).values().sum::<u64>() >= 8
    })
    .await;
    assert_eq!(client_requests(&get(&gw.url("/metrics")).await.text()), expected);
    let by_row: BTreeMap<(String, String), u64> = rows(&db).iter().fold(BTreeMap::new(), |mut m, r| {
        let model = if r.model == "fast" || r.model == "dead" || r.model == "slow" {
            r.model.clone()
        } else {
            "unknown".into()
        };
        *m.entry((model, r.status.to_string())).or_default() += 1;
        m
    });
    assert_eq!(by_row, expected, "{:#?}", rows(&db));
    let gone: Vec<_> = rows(&db).into_iter().filter(|r| r.status == 499).collect();
    assert!(gone.iter().all(|r| r.error.as_deref() == Some("client_closed")), "{gone:#?}");

    // A graceful shutdown while a stream runs: the stream finishes and its one row is written before exit.
    let last_url = url.clone();
    let body = stream_body("fast", 10);
    let last = tokio::spawn(async move { stream(&last_url, &body).await });
    eventually(Duration::from_secs(10), "the stream started", || async {
        mock_stats(&ok).await["in_flight"].as_u64() >= Some(1)
    })
    .await;
    gw.proc.signal("TERM");
    let last = last.await.unwrap();
    assert_eq!((last.status, last.error.as_deref()), (200, None));
    assert!(wait_exit(&mut gw.proc, Duration::from_secs(20)).success(), "{}", gw.proc.stderr());
    let rows = rows(&db);
    assert_eq!(rows.len(), 9, "{rows:#?}");
    let drained = &rows[8];
    assert_eq!((drained.model.as_str(), drained.status, drained.error.as_deref()), ("fast", 200, None));
    // The client asked for no usage; the upstream was asked, so the row has it (reported, not estimated).
    assert_eq!((drained.completion_tokens, drained.estimated), (Some(10), false));
}
