//! `GET /ui`: the live monitor page for group administrators (SPEC §1,
//! §8): indicators per group, live calls, agents with a switch, stuck calls
//! with a remove button — all read from this API with the token the user
//! gives the page.
//!
//! One static page embedded in the binary (HTML, CSS and JavaScript in
//! `ui/`, no build step, nothing fetched from elsewhere: it works on a
//! network without Internet). The page itself needs no token; every call it
//! makes does. Its Content-Security-Policy allows exactly its own inline
//! style and script (by hash) and connections to this origin.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const HTML: &str = include_str!("ui/monitor.html");
const CSS: &str = include_str!("ui/monitor.css");
const JS: &str = include_str!("ui/monitor.js");

struct Page {
    html: String,
    csp: HeaderValue,
}

fn hash(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
}

fn page() -> &'static Page {
    static PAGE: OnceLock<Page> = OnceLock::new();
    PAGE.get_or_init(|| {
        let html = HTML.replace("{{style}}", CSS).replace("{{script}}", JS);
        let csp = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash(JS),
            hash(CSS)
        );
        // Base64 and ASCII only: always a valid header value.
        let csp = HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"));
        Page { html, csp }
    })
}

/// The live monitor page (HTML); it asks for the API token.
#[utoipa::path(get, path = "/ui", tag = "monitor", responses(
    (status = 200, description = "The monitor page", body = String, content_type = "text/html"),
))]
pub async fn ui() -> Response {
    let page = page();
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
        (header::CONTENT_SECURITY_POLICY, page.csp.clone()),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    (headers, page.html.as_str()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_its_style_and_script_and_nothing_from_elsewhere() {
        let p = page();
        assert!(!p.html.contains("{{style}}") && !p.html.contains("{{script}}"));
        assert!(p.html.contains(CSS) && p.html.contains(JS));
        for external in ["http://", "https://", "//cdn", "src=\"", "href=\"http"] {
            assert!(!HTML.contains(external), "the page refers to {external}");
        }
        let csp = p.csp.to_str().expect("ASCII");
        assert!(csp.contains(&format!("'sha256-{}'", hash(JS))) && csp.contains("connect-src 'self'"));
        assert!(!csp.contains("unsafe"), "{csp}");
    }
}
