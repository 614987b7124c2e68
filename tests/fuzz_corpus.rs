//! Every input kept by the fuzzers — the corpora (`fuzz/corpus/<target>/`)
//! and the crashes they found (`fuzz/crashes/<target>/`) — through its
//! target's body, on every `cargo test`, without AFL: a crash found once
//! stays fixed, and the seeds stay meaningful (the README's "Fuzzing").

use callbridge::fuzzing::TARGETS;
use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_kept_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} has no seeds");
        for path in corpus.iter().chain(&inputs(&root.join("crashes").join(name))) {
            let data = std::fs::read(path).unwrap();
            if let Err(e) = std::panic::catch_unwind(|| target(&data)) {
                let why =
                    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                failures.push(format!("{}: {}", path.display(), why.unwrap_or_default()));
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail their target:\n{}", failures.join("\n"));
}

#[test]
fn the_seeds_reach_the_parsers() {
    // Seeds that a parser refuses at once would leave the fuzzer to find
    // the format by itself.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for path in inputs(&root.join("trace")) {
        let frames = callbridge::fuzzing::messages(&std::fs::read(&path).unwrap())
            .into_iter()
            .filter(|m| matches!(m, callbridge::ami::codec::AmiMessage::Frame(_)))
            .count();
        assert!(frames > 0, "{}: no frames", path.display());
    }
    let parsed = inputs(&root.join("sip_message"))
        .iter()
        .filter(|p| callbridge::sip::message::Message::parse(&std::fs::read(p).unwrap(), 65_535).is_ok())
        .count();
    assert!(parsed > 30, "{parsed} SIP seeds parse");
    let docs = inputs(&root.join("dialog_info"))
        .iter()
        .filter(|p| callbridge::sip::dialog_info::DialogInfo::parse(&std::fs::read(p).unwrap()).is_ok())
        .count();
    assert!(docs > 20, "{docs} dialog-info seeds parse");
    for p in inputs(&root.join("config")) {
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(callbridge::config::Config::parse(&text, "seed").is_ok(), "{}", p.display());
    }
}
