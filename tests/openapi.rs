//! The OpenAPI document: checked in as `docs/openapi.json` (a change to
//! the API shows in the diff), served without a token at
//! `/v1/openapi.json`, and listing exactly the routes the router serves
//! (read from the router itself, and probed over HTTP). The other API
//! tests check every answer they get against it (`support::openapi`).
//!
//! Refreshing the checked-in document is a deliberate act, reviewed in the
//! diff: `CALLBRIDGE_UPDATE_GOLDEN=1 cargo test --test openapi`.

mod support;

use callbridge::api::{openapi, routes, Auth, RequestLimits};
use callbridge::app::{self, RunOptions, SourceSpec};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

#[test]
fn the_document_is_checked_in() {
    let got = format!("{}\n", openapi::json());
    let path = checked_in();
    if std::env::var_os("CALLBRIDGE_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).expect("write docs/openapi.json");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with CALLBRIDGE_UPDATE_GOLDEN=1 to create)", path.display()));
    if want != got {
        let line = want.lines().zip(got.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "docs/openapi.json differs from the API at line {}:\n  checked in: {}\n  generated:  {}\n\
             If the API change is meant, refresh it: CALLBRIDGE_UPDATE_GOLDEN=1 cargo test --test openapi",
            line + 1,
            want.lines().nth(line).unwrap_or("(end)"),
            got.lines().nth(line).unwrap_or("(end)")
        );
    }
    let doc: Value = serde_json::from_str(&want).expect("docs/openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
}

/// The lab configuration with its API on `127.0.0.1:0` and events to a file.
fn lab_config(dir: &std::path::Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = std::fs::read_to_string(root.join("config/lab.toml")).expect("lab config");
    let config = config
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"")
        .replace("path = \"-\"", &format!("path = {:?}", dir.join("events.jsonl")))
        + &format!("\n[outbox]\npath = {:?}\n", dir.join("outbox"));
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

const TOKEN: &str = "lab-api-token";

/// The paths the router serves, read from its `Debug` form (axum lists
/// the path of every route there); fails loudly if that form changes.
fn served_paths(router: &axum::Router) -> BTreeSet<String> {
    let text = format!("{router:?}");
    // `Router { path_router: …, fallback_router: …, … }`: the routes only.
    let routes = text.split("fallback_router").next().unwrap_or("");
    let mut paths = BTreeSet::new();
    for part in routes.split('"').skip(1).step_by(2) {
        if part.starts_with('/') && !part.contains("__private__axum") {
            paths.insert(part.to_string());
        }
    }
    assert!(paths.contains("/v1/calls") && paths.contains("/healthz"), "axum's Debug form changed: {text}");
    paths
}

/// A concrete path for a template (`{id}` → `probe`).
fn concrete(template: &str) -> String {
    template.split('/').map(|s| if s.starts_with('{') { "probe" } else { s }).collect::<Vec<_>>().join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_served_and_lists_every_route_the_router_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = SourceSpec::Traces { paths: vec![], speed: callbridge::replay::Speed::Max };
    let running = app::start(RunOptions {
        config_path: lab_config(dir.path()),
        source,
        api_listen: None,
        shutdown_deadline: Duration::from_secs(5),
    })
    .await
    .expect("daemon starts");
    let base = format!("http://{}", running.api_addr.expect("API configured"));
    let http = reqwest::Client::new();

    // Served without a token, as generated.
    let resp = http.get(format!("{base}/v1/openapi.json")).send().await.expect("GET /v1/openapi.json");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap_or("").starts_with("application/json"));
    let served: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("the document is JSON");
    assert_eq!(&served, support::openapi::document());
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["type"], "http");
    assert!(support::openapi::dangling_refs().is_empty(), "{:?}", support::openapi::dangling_refs());

    // The router's routes are the document's, both ways.
    let router = routes::router(running.shared.clone(), Auth::new(TOKEN), RequestLimits::default());
    let documented: BTreeSet<String> = served["paths"].as_object().expect("paths").keys().cloned().collect();
    assert_eq!(served_paths(&router), documented, "routes served (left) and documented (right) differ");

    // Every documented operation is served (never 404 not_found or 405),
    // and every other method of a documented path is 405.
    for (template, item) in served["paths"].as_object().expect("paths") {
        let path = concrete(template);
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            let documented = item.get(method.to_ascii_lowercase()).is_some();
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let resp = http.request(m, format!("{base}{path}")).bearer_auth(TOKEN).send().await.expect("request");
            let status = resp.status().as_u16();
            // A stream does not end: its head is the answer.
            let streaming = resp.headers().get("content-type").is_some_and(|v| v.as_bytes() == b"text/event-stream");
            let text = if streaming { String::new() } else { resp.text().await.unwrap_or_default() };
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            let code = body["error"]["code"].as_str().unwrap_or("");
            if documented {
                assert!(!["not_found", "method_not_allowed"].contains(&code), "{method} {path}: {status} {body}");
            } else {
                assert_eq!((status, code), (405, "method_not_allowed"), "{method} {path}: {body}");
            }
            support::openapi::check(method, &path, status, &body);
        }
    }
    running.stop().await.expect("clean stop");
}

/// Routes come into the router only through `routes!` (which documents
/// them): no plain axum registration in the Rust files of `src/api/` and
/// its folders.
#[test]
fn routes_are_registered_only_with_their_documentation() {
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/api")];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/api") {
            let path = entry.expect("entry").path();
            match path.is_dir() {
                true => dirs.push(path),
                false if path.extension().is_some_and(|e| e == "rs") => files.push(path),
                false => {}
            }
        }
    }
    assert!(files.len() > 5, "too few sources found: {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("source");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or("");
            for plain in [".route(", ".route_service(", ".nest(", ".nest_service(", "routing::get(", "routing::post("] {
                assert!(
                    !line.contains(plain),
                    "{}:{}: {plain} registers a route without documenting it",
                    path.display(),
                    n + 1
                );
            }
        }
    }
}

/// The README's table of error codes, as the code lists them.
fn error_table() -> String {
    let mut t = String::from("| code | status | meaning |\n| --- | --- | --- |\n");
    for c in callbridge::api::ErrorCode::ALL {
        t.push_str(&format!("| `{}` | {} | {} |\n", c.as_str(), c.status().as_u16(), c.meaning()));
    }
    t
}

#[test]
fn the_readme_lists_every_error_code() {
    const START: &str = "<!-- error codes: generated from src/api/error.rs, checked by tests/openapi.rs -->\n";
    const END: &str = "<!-- end of error codes -->";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let (before, rest) = readme.split_once(START).expect("the README has the error code table markers");
    let (table, after) = rest.split_once(END).expect("the README's error code table ends");
    let want = error_table();
    if std::env::var_os("CALLBRIDGE_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, format!("{before}{START}{want}{END}{after}")).expect("write README.md");
        return;
    }
    assert_eq!(
        table, want,
        "the README's error codes differ from ErrorCode (CALLBRIDGE_UPDATE_GOLDEN=1 rewrites them)"
    );
}
