//! A real browser for tests: headless Chromium driven through
//! `chromedriver` over the W3C WebDriver protocol (JSON over HTTP on
//! loopback, spoken with reqwest: no driver crate needed).
//!
//! [`Browser::start`] returns `None`, after printing why, when Chromium or
//! chromedriver is not installed (Debian: `chromium`, `chromium-driver`),
//! except under CI, where their absence is a failure. [`Browser::run`]
//! saves a screenshot under `target/test-artifacts/` when the test fails.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file()).or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).flat_map(|d| candidates.iter().map(move |c| d.join(c))).find(|p| p.is_file())
    })
}

/// A running chromedriver with one headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
    pub artifacts: PathBuf,
    name: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `None` (the test is
    /// skipped) when either is missing outside CI.
    pub async fn start(test: &str) -> Option<Browser> {
        let chromium = find(&["/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"]);
        let driver = find(&["/usr/bin/chromedriver", "chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{test}: chromium or chromedriver missing; CI must run the browser tests (.ci/run installs them)"
                );
            }
            eprintln!("SKIPPED {test}: chromium or chromedriver not found (apt-get install chromium chromium-driver to run the browser tests)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut b = Browser {
            driver: child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            artifacts: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts"),
            name: test.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = b.http.get(format!("{}/status", b.base)).send().await;
            if let Ok(r) = ready {
                let v: Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver not ready within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1366,900", "--no-first-run", "--disable-extensions"],
            },
        }}});
        let session = b.post_raw("/session", caps).await;
        let id = session["sessionId"].as_str().expect("a WebDriver session id").to_string();
        b.base = format!("{}/session/{id}", b.base);
        Some(b)
    }

    async fn post_raw(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let r = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let v: Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
        if let Some(err) = v["value"].get("error") {
            panic!("WebDriver {path}: {err}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.post_raw(path, body).await
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let v: Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
        if let Some(err) = v["value"].get("error") {
            panic!("WebDriver {path}: {err}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// The first element matching `css`, waiting up to `super::WAIT` for it.
    pub async fn element(&self, css: &str) -> String {
        let deadline = Instant::now() + super::WAIT;
        loop {
            let found = self
                .http
                .post(format!("{}/element", self.base))
                .header("content-type", "application/json")
                .body(json!({"using": "css selector", "value": css}).to_string())
                .send()
                .await
                .expect("WebDriver element");
            let v: Value = serde_json::from_str(&found.text().await.unwrap_or_default()).unwrap_or_default();
            if let Some(id) = v["value"][ELEMENT].as_str() {
                return id.to_string();
            }
            assert!(Instant::now() < deadline, "no element {css:?} within {:?}", super::WAIT);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    /// Types `text` into the element (as keystrokes).
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text })).await;
    }

    /// Sends keys to whatever has the focus (`\u{E007}` is Enter).
    pub async fn keys(&self, css: &str, keys: &str) {
        self.type_into(css, keys).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args })).await
    }

    /// Polls `script` until it returns something truthy; panics after
    /// `within` naming `what`.
    pub async fn wait_for(&self, what: &str, within: Duration, script: &str) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(script, json!([])).await;
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the page under the artifacts folder.
    pub async fn screenshot(&self, file: &str) -> PathBuf {
        let v = self.get("/screenshot").await;
        let png = base64_decode(v.as_str().unwrap_or(""));
        std::fs::create_dir_all(&self.artifacts).expect("artifacts folder");
        let path = self.artifacts.join(file);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Runs the test `steps`; on failure saves a screenshot
    /// (`target/test-artifacts/<test>-failure.png`) before failing.
    pub async fn run<F>(self: std::sync::Arc<Self>, steps: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Err(e) = tokio::spawn(steps).await {
            let file = format!("{}-failure.png", self.name);
            let saved = tokio::time::timeout(Duration::from_secs(10), self.screenshot(&file)).await;
            match saved {
                Ok(p) => eprintln!("screenshot of the failure: {}", p.display()),
                Err(_) => eprintln!("no screenshot of the failure (the browser did not answer)"),
            }
            self.close().await;
            std::panic::resume_unwind(e.into_panic());
        }
        self.close().await;
    }

    async fn close(&self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).expect("a base64 screenshot")
}
