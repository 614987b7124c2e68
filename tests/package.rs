//! What the Debian package installs: a conffile without secrets that says
//! what is left to fill in, and no file carrying the lab's secrets.

use callbridge::config::{check_config, CheckOptions, Config};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(source, destination)` of every `[package.metadata.deb] assets` entry.
fn assets() -> Vec<(String, String)> {
    let manifest: toml::Table =
        std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml").parse().expect("toml");
    manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|a| (a[0].as_str().expect("source").to_string(), a[1].as_str().expect("destination").to_string()))
        .collect()
}

/// The inline secret values of config/lab.toml.
fn lab_secrets() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("config/lab.toml")).expect("lab.toml");
    let secrets: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("secret"))
        .filter_map(|l| l.trim_start().strip_prefix('='))
        .filter_map(|v| v.trim().strip_prefix('"').and_then(|v| v.split('"').next()).map(String::from))
        .collect();
    assert!(secrets.len() >= 3, "lab.toml's inline secrets: {secrets:?}");
    secrets
}

#[test]
fn no_packaged_file_carries_the_lab_secrets() {
    let secrets = lab_secrets();
    for (source, dest) in assets() {
        if source.starts_with("target/") {
            continue; // the binary
        }
        let text = std::fs::read_to_string(root().join(&source)).expect("asset readable");
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{source} (installed as {dest}) contains the lab secret {s:?}");
        }
    }
}

#[test]
fn the_conffile_keeps_secrets_in_files_and_says_what_is_left() {
    let (source, _) = assets()
        .into_iter()
        .find(|(_, dest)| dest == "etc/callbridge/callbridge.toml")
        .expect("the conffile is packaged");
    let path = root().join(&source);
    let text = std::fs::read_to_string(&path).expect("conffile");
    assert!(!text.lines().any(|l| l.trim_start().starts_with("secret ")), "inline secret in {source}");
    let config = Config::load(&path).expect("the shipped configuration is valid as it is");
    assert!(config
        .secrets()
        .iter()
        .all(|(_, s)| s.secret_file.as_deref().is_some_and(|f| f.starts_with("/etc/callbridge/"))));
    // Secret files not created yet: check-config names each one (exit 64).
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = check_config(Path::new(&path), CheckOptions { resolve_secrets: true }, &mut out, &mut err);
    let err = String::from_utf8_lossy(&err);
    assert_eq!(code, 64, "{err}");
    for file in ["/etc/callbridge/ami.secret", "/etc/callbridge/api.token"] {
        assert!(err.contains(file), "check-config does not name {file}: {err}");
    }
}
