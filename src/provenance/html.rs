//! The ladder as one self-contained HTML page (inline CSS and JS, nothing
//! fetched): a swimlane per call — the caller, the queue, each agent, the
//! customer, the PBX — with the AMI frames and the lifecycle events in
//! their lanes; hovering shows an item's provenance, clicking (or Enter)
//! pins it in the side panel.

use super::rule::clock_time;
use super::text::{headline, is_outcome, summary};
use super::{CallLadder, Cause, Explanation};
use crate::event::EventKind;
use std::fmt::Write;

const STYLE: &str = r#"
:root { --fg:#1b1f24; --muted:#57606a; --line:#d0d7de; --frame:#eef2f7; --event:#dff3e4; --miss:#fde2e1; --end:#e8e4fb; --focus:#0550ae; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); display: grid; grid-template-columns: minmax(0,1fr) 26em; height: 100vh; }
main { overflow: auto; padding: 1em 1.5em; }
aside { border-left: 1px solid var(--line); padding: 1em; overflow: auto; background: #fafbfc; }
aside pre { white-space: pre-wrap; word-break: break-word; font: 13px/1.45 ui-monospace, monospace; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin: 1.6em 0 .3em; }
nav a { margin-right: .8em; }
.summary { margin: .2em 0 .6em; color: var(--muted); }
.summary b { color: var(--fg); }
.lanes { display: grid; border-top: 1px solid var(--line); font-size: 12.5px; }
.lanes > div { border-bottom: 1px solid #eef0f2; padding: 2px 4px; min-height: 1.6em; }
.lanes .head { font-weight: 600; position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); }
.lanes .t, .lanes .l { color: var(--muted); font-variant-numeric: tabular-nums; }
.lane { border-left: 1px dashed var(--line); }
button.ev { display: block; width: 100%; text-align: left; font: inherit; margin: 1px 0; padding: 1px 4px; border: 1px solid var(--line); border-radius: 4px; background: var(--frame); cursor: pointer; color: var(--fg); }
button.ev.out { background: var(--event); }
button.ev.missed { background: var(--miss); }
button.ev.ended { background: var(--end); }
button.ev:focus-visible, button.ev.pinned { outline: 2px solid var(--focus); }
"#;

const SCRIPT: &str = r#"
(function () {
  var panel = document.getElementById("detail");
  var pinned = null;
  function show(b) {
    if (pinned) { pinned.classList.remove("pinned"); }
    pinned = b;
    b.classList.add("pinned");
    panel.textContent = b.getAttribute("title");
  }
  document.addEventListener("click", function (e) {
    var b = e.target.closest("button.ev");
    if (b) { show(b); }
  });
  document.body.dataset.ready = "1";
})();
"#;

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The whole explanation as one HTML page.
pub fn render_html(x: &Explanation) -> String {
    let title = format!("callbridge explain — {}", x.trace.display());
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{}</h1>\n<p>{} call(s), {} frame(s); times are UTC. Hover an item for its provenance; click it to pin it on the right.</p>\n<nav>",
        esc(&title),
        esc(&title),
        x.calls.len(),
        x.frames
    );
    for call in &x.calls {
        let _ = write!(s, "<a href=\"#call-{}\">{}</a>", esc(call.id.as_str()), esc(call.id.as_str()));
    }
    s.push_str("</nav>\n");
    for line in &x.malformed {
        let _ = writeln!(s, "<p>warning: line {line}: malformed frame skipped (as replay skips it)</p>");
    }
    for call in &x.calls {
        render_call(&mut s, call);
    }
    let _ = write!(
        s,
        "</main>\n<aside aria-live=\"polite\"><h2>Provenance</h2><pre id=\"detail\">Click an item of a swimlane.</pre></aside>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    );
    s
}

fn render_call(s: &mut String, call: &CallLadder) {
    let lanes = &call.lanes;
    let _ = writeln!(s, "<section id=\"call-{}\" class=\"call\">", esc(call.id.as_str()));
    let _ = writeln!(s, "<h2>{}</h2>", esc(&headline(call)));
    for (_, p) in call.products() {
        if matches!(p.event.kind, EventKind::Missed { .. } | EventKind::Answered { .. } | EventKind::Ended { .. }) {
            let _ = writeln!(s, "<p class=\"summary\"><b>{}</b> {}</p>", esc(p.event.kind.type_name()), esc(&p.rule));
        }
    }
    let _ = writeln!(
        s,
        "<div class=\"lanes\" style=\"grid-template-columns: 7.5em 4.5em repeat({}, minmax(10em, 1fr))\">",
        lanes.len()
    );
    s.push_str("<div class=\"head\">time</div><div class=\"head\">line</div>");
    for lane in lanes {
        let _ = write!(s, "<div class=\"head lane\" data-lane=\"{}\">{}</div>", esc(lane), esc(lane));
    }
    s.push('\n');
    for rung in &call.rungs {
        let line = if rung.line == 0 { "-".to_string() } else { rung.line.to_string() };
        let _ = write!(s, "<div class=\"t\">{}</div><div class=\"l\">{line}</div>", clock_time(rung.time));
        let rung_text = rung_detail(rung, line.as_str());
        for lane in lanes {
            s.push_str("<div class=\"lane\">");
            if &rung.lane == lane {
                let _ = write!(
                    s,
                    "<button type=\"button\" class=\"ev\" title=\"{}\">{}</button>",
                    esc(&rung_text),
                    esc(rung.cause.name())
                );
            }
            for p in rung.products.iter().filter(|p| &p.lane == lane) {
                let class = match p.event.kind {
                    EventKind::Missed { .. } => "ev out missed",
                    EventKind::Ended { .. } => "ev out ended",
                    _ => "ev out",
                };
                let detail = format!(
                    "#{} {} {}\n\nwhy: {}\n\nproduced by:\n{}",
                    p.event.seq,
                    p.event.kind.type_name(),
                    summary(&p.event.kind),
                    p.rule,
                    rung_text
                );
                let _ = write!(
                    s,
                    "<button type=\"button\" class=\"{class}\" title=\"{}\">{}</button>",
                    esc(&detail),
                    esc(p.event.kind.type_name())
                );
            }
            s.push_str("</div>");
        }
        s.push('\n');
    }
    s.push_str("</div>\n</section>\n");
}

/// What the side panel shows for a rung: where it is in the trace, what
/// it says, and what it produced.
fn rung_detail(rung: &super::Rung, line: &str) -> String {
    let mut d = match &rung.cause {
        Cause::Frame { event, channel, details } => {
            let mut d = format!("{event} at {} UTC, trace line {line}\nChannel: {channel}", clock_time(rung.time));
            for (k, v) in details {
                let _ = write!(d, "\n{k}: {v}");
            }
            d
        }
        _ => format!("{} ({})", rung.cause.name(), super::rule::cite(rung)),
    };
    for p in &rung.products {
        let _ = write!(d, "\n=> #{} {} {}", p.event.seq, p.event.kind.type_name(), summary(&p.event.kind));
        if is_outcome(&p.event.kind) {
            let _ = write!(d, "\n   why: {}", p.rule);
        }
    }
    d
}
