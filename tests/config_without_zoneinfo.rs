//! Group time zones validate on a host without a system time zone database
//! (minimal containers): the IANA database bundled into the binary is used.
//!
//! A test binary of its own: it points `TZDIR` at an empty directory before
//! jiff first looks for the system database, which happens once per process.

use callbridge::config::{values, Config};

#[test]
fn time_zones_resolve_without_a_system_database() {
    let empty = tempfile::tempdir().expect("tempdir");
    // Single test in this binary: nothing else reads the environment.
    std::env::set_var("TZDIR", empty.path());

    let tz = values::time_zone("America/Sao_Paulo").expect("bundled database");
    assert_eq!(tz.iana_name(), Some("America/Sao_Paulo"));
    assert!(values::time_zone("Mars/Olympus_Mons").is_err());

    let lab = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lab.toml");
    Config::load(&lab).unwrap_or_else(|e| panic!("{e}"));
}
