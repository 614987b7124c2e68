//! Structure gates: the crate's top-level modules form a graph without
//! cycles, and the components never reach back to the configuration file.
//!
//! The graph is read from the source (`crate::x` paths, `use crate::{x, y}`
//! groups), outside comments and `#[cfg(test)]` modules: a test may reach
//! anywhere, the product may not. When this fails it prints the modules of
//! each cycle and, for every edge inside it, the files that make it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `from → to → files making the edge`.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// Modules that must not name `crate::config`: they take settings of
/// their own, built by `settings`.
const CONFIG_FREE: &[&str] = &["ami", "sip", "normalize", "directory"];

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = crate_graph(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(graph.len() > 10, "the module graph looks empty: {graph:?}");
    let cycles = cycles(&graph);
    let mut report = String::new();
    for cycle in &cycles {
        report.push_str(&format!("cycle: {}\n", cycle.join(" ⇄ ")));
        for from in cycle {
            for (to, files) in &graph[from] {
                if cycle.contains(to) {
                    report.push_str(&format!(
                        "  {from} → {to}: {}\n",
                        files.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "the module graph has cycles:\n{report}");
}

#[test]
fn components_do_not_import_the_configuration_file() {
    let graph = crate_graph(Path::new(env!("CARGO_MANIFEST_DIR")));
    let offenders: Vec<String> = CONFIG_FREE
        .iter()
        .filter_map(|m| graph.get(*m).and_then(|to| to.get("config")).map(|files| format!("{m}: {files:?}")))
        .collect();
    assert!(offenders.is_empty(), "components naming crate::config: {offenders:?}");
}

/// The gate itself can fail: a cycle added to a copy of a small tree is found.
#[test]
fn a_cycle_is_detected() {
    let dir = std::env::temp_dir().join(format!("callbridge-arch-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("b")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::Thing;\n// crate::c in a comment is no edge\n").unwrap();
    std::fs::write(src.join("b/mod.rs"), "mod inner;\n").unwrap();
    std::fs::write(src.join("b/inner.rs"), "use crate::{c::X, a};\n").unwrap();
    std::fs::write(src.join("c.rs"), "pub struct X;\n#[cfg(test)]\nmod tests { use crate::a; }\n").unwrap();
    let graph = crate_graph(&dir);
    let found = cycles(&graph);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found, vec![vec!["a".to_string(), "b".to_string()]], "graph: {graph:?}");
    assert!(!graph["c"].contains_key("a"), "a test module's import counted: {graph:?}");
}

fn crate_graph(root: &Path) -> Graph {
    let src = root.join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let modules: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';').trim().to_string())
        .collect();
    let mut graph = Graph::new();
    for module in &modules {
        let mut files = Vec::new();
        let single = src.join(format!("{module}.rs"));
        if single.exists() {
            files.push(single);
        }
        collect_rs(&src.join(module), &mut files);
        let edges = graph.entry(module.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("readable source");
            let rel = file.strip_prefix(&src).unwrap_or(&file).display().to_string();
            for target in crate_paths(&product_code(&text)) {
                if &target != module && modules.contains(&target) {
                    edges.entry(target).or_default().insert(rel.clone());
                }
            }
        }
    }
    graph
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "tests.rs") {
            out.push(path);
        }
    }
}

/// The source without comments, string literals' contents and
/// `#[cfg(test)]` items (the attribute and the braced item after it).
fn product_code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i..].starts_with(&['/', '*']) {
                    depth += 1;
                    i += 2;
                } else if chars[i..].starts_with(&['*', '/']) {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if chars[i] == '\'' && chars.get(i + 1) == Some(&'\\') {
            // A char literal with an escape: '\'', '\\', '\n', '\u{…}'.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if chars[i] == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3; // 'x' (but not a lifetime such as 'a)
        } else if let Some(hashes) = raw_string_start(&chars, i) {
            i += 2 + hashes; // r, the hashes, the quote
            let close: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            while i < chars.len() && !chars[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if chars[i] == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if rest.iter().take(12).collect::<String>() == "#[cfg(test)]" {
            // Skip to the item's body and past its closing brace (or `;`).
            while i < chars.len() && chars[i] != '{' && chars[i] != ';' {
                i += 1;
            }
            if i < chars.len() && chars[i] == '{' {
                let mut depth = 0;
                while i < chars.len() {
                    match chars[i] {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            i += 1;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// `r"…"`, `r#"…"#`, `br"…"` at `i`: how many `#` it uses.
fn raw_string_start(chars: &[char], i: usize) -> Option<usize> {
    if chars[i] != 'r'
        || i.checked_sub(1).and_then(|p| chars.get(p)).is_some_and(|c| c.is_alphanumeric() && *c != 'b' || *c == '_')
    {
        return None;
    }
    let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
    (chars.get(i + 1 + hashes) == Some(&'"')).then_some(hashes)
}

/// The first segment of every `crate::…` path, braces included
/// (`crate::{a::X, b}` names `a` and `b`).
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `$crate::` or `mycrate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    found.push(first_ident(&item));
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
        } else {
            found.push(first_ident(rest));
        }
    }
    found.retain(|s| !s.is_empty());
    found
}

fn first_ident(s: &str) -> String {
    s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// Strongly connected components with more than one module (Tarjan),
/// each sorted, in a stable order.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(lw));
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}
