//! The command line: `serve` (default), `check`, `config check`, `mock`, `report`, `drill`, `healthcheck`.
//! Parses arguments, sets up logging (text or JSON lines on stderr) and the runtime, and hands over to the module
//! that owns each command.

pub mod check;
mod healthcheck;
mod log_format;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config};
use sheepdog_mock::demo::Demo;

use crate::gateway::Gateway;

/// sheepdog: one OpenAI-compatible endpoint in front of many LLM upstreams, with health checks, circuit
/// breakers, load balancing and failover.
#[derive(Parser, Debug)]
#[command(name = "sheepdog", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log format on stderr: `text`, or `json` (one JSON object a line, for log collectors).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default). Without --config and ./sheepdog.toml: the embedded demo.
    Serve(ServeArgs),
    /// One round of probes against every endpoint and model; exit 0 all healthy, 1 not, 2 config error.
    Check(CheckArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// A simulated OpenAI-compatible upstream, for demos, tests and benchmarks.
    Mock(sheepdog_mock::MockArgs),
    /// Statistics from the request log: per model and endpoint, a timeline, charts.
    Report(ReportArgs),
    /// The outage drill against simulated upstreams: exit 0 when success >= 99.9 % and nothing was lost.
    Drill(DrillArgs),
    /// Client keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// GET a URL (default: this host's /health on port 8080); exit 0 on a 2xx answer, else 1. For containers.
    Healthcheck {
        /// The URL to ask.
        #[arg(long, default_value = "http://127.0.0.1:8080/health")]
        url: String,
        /// How long to wait for the answer (e.g. 2s).
        #[arg(long, default_value = "2s")]
        timeout: String,
    },
}

#[derive(Args, Debug)]
struct DrillArgs {
    /// Requests per second (open loop), up to 2,000 per core of this machine.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Length of the whole drill; the phases scale with it (10s to 1h).
    #[arg(long, default_value = "60s")]
    duration: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The gateway's config: its `[log]` is the default for `--db`, its pricing table prices
    /// `--project-tokens` (default: ./sheepdog.toml if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The request log: a SQLite file or a postgres:// URL (default: the config's `[log]`, else sheepdog.db).
    #[arg(long)]
    db: Option<String>,
    /// The window: requests that arrived this long ago or later (e.g. 15m, 24h, 7d).
    #[arg(long, default_value = "24h")]
    since: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: crate::report::Format,
    /// Also write SVG charts into this directory: cost.svg (cost share by model), latency.svg (latency by model
    /// against the SLA), success.svg (success rate by model), requests.svg and latency_over_time.svg.
    #[arg(long)]
    charts: Option<PathBuf>,
    /// The latency a successful answer should stay under, ms: the SLA line of latency.svg and OVER_SLA.
    #[arg(long, default_value_t = crate::report::DEFAULT_SLA_MS)]
    sla_ms: f64,
    /// Also say what this many tokens a month (e.g. 10M) would cost on each model and endpoint, from the
    /// config's prices and multipliers and the input:output ratio seen in the log.
    #[arg(long, value_parser = crate::report::projection::parse_tokens)]
    project_tokens: Option<u64>,
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// Config file (default: ./sheepdog.toml if it exists, else the embedded demo).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override `server.listen` (e.g. 127.0.0.1:0 for a free port).
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Config file (default: ./sheepdog.toml if it exists, else the embedded demo).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Append one JSON line per result to this file.
    #[arg(long)]
    log: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file: exit 0 when valid, 2 with the key and line of the mistake.
    Check {
        /// Config file (default: ./sheepdog.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Print a fresh client key (once: only its hash is kept) and the `[[clients]]` lines for the config.
    New {
        /// The client's name (request log, metrics, budgets).
        #[arg(long)]
        name: String,
    },
}

/// Log to stderr through a thread of its own: a request's access line is handed over a bounded queue, never
/// written (and never waited for) on the request path, and lines that arrive together go out in one write.
/// When the writer falls 128,000 lines behind, lines are dropped and counted
/// (`sheepdog_log_lines_dropped_total`) rather than slowing requests. The guard flushes what is queued when
/// `main` returns.
fn init_logging(format: LogFormat, default: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a terminal: a file, a pipe or a log collector gets plain text.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // The writer thread flushes whenever its queue is empty.
    let (writer, guard) =
        tracing_appender::non_blocking(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let dropped = writer.error_counter();
    crate::metrics::set_log_lines_dropped(move || dropped.dropped_lines() as u64);
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    let _ = match format {
        // Plain text writes `name=value` without the styling machinery the default field formatter runs even
        // when colours are off; the access line is written by `log_format` in the same layout.
        LogFormat::Text if !ansi => {
            let events = log_format::AccessFast::text(tracing_subscriber::fmt::format());
            fmt.fmt_fields(log_format::text_fields()).event_format(events).try_init()
        }
        LogFormat::Text => fmt.try_init(),
        // Fields at the top level of each object, beside `timestamp`, `level`, `target` and `message`.
        LogFormat::Json => {
            let events = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false);
            fmt.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(log_format::AccessFast::json(events))
                .try_init()
        }
    };
    guard
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The drill's report is the point; the breaker transitions of its gateway are logged from `warn` up.
    let default = if matches!(cli.command, Some(Command::Drill(_))) { "warn" } else { "info" };
    let _log = init_logging(cli.log_format, default);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(a) => rt.block_on(serve(a)),
        Command::Check(a) => rt.block_on(check(a)),
        Command::Config(ConfigCommand::Check { config }) => config_check(config.as_deref()),
        Command::Report(a) => report(&a),
        Command::Key(KeyCommand::New { name }) => key_new(&name),
        Command::Drill(a) => rt.block_on(crate::drill::command(a.rate, &a.duration, a.json)),
        Command::Healthcheck { url, timeout } => match config::parse_duration(&timeout) {
            Ok(t) => rt.block_on(healthcheck::run(&url, t)),
            Err(e) => {
                eprintln!("error: --timeout: {e}");
                ExitCode::from(2)
            }
        },
        Command::Mock(a) => match rt.block_on(mock(a)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn report(a: &ReportArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let since = match config::parse_duration(&a.since) {
        Ok(d) => d,
        Err(e) => return fail(format!("--since: {e}")),
    };
    if !(a.sla_ms.is_finite() && a.sla_ms > 0.0) {
        return fail(format!("--sla-ms: {} is not a latency in milliseconds above 0", a.sla_ms));
    }
    // The config is read only when something needs it: the log's location or the prices.
    let cfg = if a.db.is_none() || a.project_tokens.is_some() {
        match config::locate(a.config.as_deref()) {
            Some(path) => match config::load_file(&path) {
                Ok(c) => Some(c),
                Err(e) => return fail(e.to_string()),
            },
            None if a.project_tokens.is_some() => {
                return fail(
                    "--project-tokens needs the pricing table: pass --config FILE or run where ./sheepdog.toml is"
                        .into(),
                )
            }
            None => None,
        }
    } else {
        None
    };
    let db = match &a.db {
        Some(db) => match crate::log::Source::parse(db) {
            Ok(db) => db,
            Err(e) => return fail(format!("--db: {e}")),
        },
        None => cfg.as_ref().map_or_else(
            || crate::log::Source::Sqlite(PathBuf::from(config::DEFAULT_LOG_PATH)),
            |c| crate::log::Source::of(&c.log),
        ),
    };
    let options = crate::report::Options {
        since,
        format: a.format,
        charts: a.charts.as_deref(),
        sla_ms: a.sla_ms,
        project: a.project_tokens.zip(cfg.as_ref()),
    };
    match crate::report::run(&db, &options) {
        Ok(text) => {
            use std::io::Write;
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn config_check(path: Option<&Path>) -> ExitCode {
    let Some(path) = config::locate(path) else {
        eprintln!("error: no config file: pass --config FILE or create ./sheepdog.toml");
        return ExitCode::from(2);
    };
    match config::load_file(&path) {
        Ok(c) => {
            println!("{}: OK ({} endpoints, {} models)", path.display(), c.endpoints.len(), c.models.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The config to run with: the file, or the embedded demo with its mocks started in-process.
async fn mock(a: sheepdog_mock::MockArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (listener, _) =
        crate::http::bind(&a.listen).await.map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
    sheepdog_mock::run(a, listener).await
}

async fn load(path: Option<&Path>) -> Result<(Config, Option<PathBuf>, Option<Demo>), ExitCode> {
    match config::locate(path) {
        Some(p) => match config::load_file(&p) {
            Ok(c) => Ok((c, Some(p), None)),
            Err(e) => {
                eprintln!("error: {e}");
                Err(ExitCode::from(2))
            }
        },
        None => match Demo::start().await {
            Ok(d) => match config::parse(&d.config_toml, "<embedded demo>", &config::ProcessEnv) {
                Ok(c) => Ok((c, None, Some(d))),
                Err(e) => {
                    eprintln!("error: the embedded demo's config is invalid: {e}");
                    Err(ExitCode::from(1))
                }
            },
            Err(e) => {
                eprintln!("error: cannot start the embedded demo: {e}");
                Err(ExitCode::from(1))
            }
        },
    }
}

async fn serve(a: ServeArgs) -> ExitCode {
    let (mut config, path, demo) = match load(a.config.as_deref()).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    if let Some(l) = a.listen {
        config.server.listen = l;
    }
    let listen = config.server.listen.clone();
    let (listener, addr) = match crate::http::bind(&listen).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    // Secure by default: with no client keys, only this machine may use the gateway. The embedded demo holds
    // no provider key and is exempt.
    if demo.is_none() && config.clients.is_empty() && !config.server.allow_anonymous && !addr.ip().is_loopback() {
        eprintln!(
            "error: refusing to serve anonymous requests on {addr}, which is not a loopback address: add \
             [[clients]] keys (`sheepdog key new --name NAME`), listen on 127.0.0.1, or set \
             server.allow_anonymous = true"
        );
        return ExitCode::from(2);
    }
    let gw = match Gateway::open(config, path.clone()) {
        Ok(gw) => gw,
        Err(e) => {
            eprintln!("error: cannot open the {e}");
            return ExitCode::from(1);
        }
    };
    let shutdown = crate::http::signals(gw.clone());
    tokio::spawn(crate::health::run(gw.clone(), shutdown.clone()));
    tokio::spawn(crate::shared::run(gw.clone(), shutdown.clone()));
    if let Some(d) = &demo {
        d.misbehave(shutdown.clone());
    }
    let base = format!("http://{addr}");
    let what = match &path {
        Some(p) => format!("config {}", p.display()),
        None => "the embedded demo (3 simulated upstreams; `secondary` misbehaves now and then)".to_string(),
    };
    println!("sheepdog listening on {base} with {what}");
    println!("  API        {base}/v1  (POST /v1/chat/completions, /v1/embeddings, GET /v1/models)");
    println!("  status     {base}/status");
    println!("  metrics    {base}/metrics");
    println!("  dashboard  {base}/dashboard");
    if let Some(source) = gw.log.source() {
        println!("  log        {source} (sheepdog report --db {source})");
    }
    if demo.is_some() {
        println!(
            "  try        curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"gpt-4.1\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::http::serve(gw.clone(), listener, shutdown).await;
    gw.save_state();
    // Answered requests are queued for the log; write them all before exiting.
    let closing = gw.clone();
    let _ = tokio::task::spawn_blocking(move || closing.log.close()).await;
    drop(demo);
    ExitCode::SUCCESS
}

/// `sheepdog key new --name NAME`: the key alone on the first line, then the config lines.
fn key_new(name: &str) -> ExitCode {
    if name.trim().is_empty() || name.contains(['"', '\\', '\n']) {
        eprintln!("error: --name must be a non-empty name without quotes, backslashes or line breaks");
        return ExitCode::from(2);
    }
    let key = new_key();
    println!("{key}");
    println!();
    println!("[[clients]]");
    println!("name = \"{name}\"");
    println!("key_hash = \"{}\"", config::format_key_hash(&config::hash_client_key(&key)));
    ExitCode::SUCCESS
}

/// A fresh client key: `sk-` and 48 characters of base62 from the operating system's RNG (285 bits).
fn new_key() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..48).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect();
    format!("sk-{body}")
}

async fn check(a: CheckArgs) -> ExitCode {
    let (config, _, demo) = match load(a.config.as_deref()).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let results = check::run(config).await;
    drop(demo);
    check::report(&results, a.json, a.log.as_deref())
}

/// Start a gateway for tests and embedding: serve `config` on its listen address with the prober running.
/// Returns the bound address and a sender that stops it.
pub async fn start(
    config: Config,
    path: Option<PathBuf>,
) -> std::io::Result<(std::net::SocketAddr, Arc<Gateway>, tokio::sync::watch::Sender<bool>)> {
    let (listener, addr) = crate::http::bind(&config.server.listen).await?;
    let gw = Gateway::open(config, path).map_err(std::io::Error::other)?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(crate::health::run(gw.clone(), rx.clone()));
    tokio::spawn(crate::shared::run(gw.clone(), rx.clone()));
    tokio::spawn(crate::http::serve(gw.clone(), listener, rx));
    Ok((addr, gw, tx))
}
