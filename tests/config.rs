//! Configuration loading and validation (SPEC §9): every problem is listed
//! at once, each naming its field path and why; secrets are never shown.

use callbridge::config::{check_config, CheckOptions, Config, SinkConfig};
use callbridge::exit::EX_USAGE;
use std::path::{Path, PathBuf};

const SECRET: &str = "s3cret-do-not-print";

fn lab_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lab.toml")
}

/// A valid `[pbx]` section followed by `rest`.
fn doc(rest: &str) -> String {
    format!(
        r#"
[pbx]
name = "lab"

[pbx.ami]
address = "127.0.0.1:5038"
username = "callbridge"
secret = "{SECRET}"
{rest}
"#
    )
}

/// Two valid agents (maria 2000, joao 2001) after `rest`.
fn with_agents(rest: &str) -> String {
    doc(&format!(
        r#"{rest}
[[agents]]
id = "maria"
extension = "2000"

[[agents]]
id = "joao"
extension = "2001"
"#
    ))
}

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, "test.toml") {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    }
}

/// Asserts that one problem contains every fragment.
#[track_caller]
fn assert_problem(problems: &[String], fragments: &[&str]) {
    assert!(
        problems.iter().any(|p| fragments.iter().all(|f| p.contains(f))),
        "no problem contains all of {fragments:?}; problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn lab_config_is_valid() {
    let config = Config::load(&lab_path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.pbx.name, "lab");
    assert_eq!(config.groups.len(), 2);
    assert_eq!(config.groups[0].agents, ["maria", "joao"]);
    assert_eq!(config.agents[2].extension.as_deref(), Some("2002"));
    assert!(matches!(&config.sinks[..], [SinkConfig::Jsonl { path, .. }] if path == "-"));
    assert!(config.validate().is_empty(), "{:?}", config.validate());
}

#[test]
fn good_day_lists_and_ranges_are_accepted() {
    let text = with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agents = ["maria"]
timezone = "America/Sao_Paulo"
hours = [
  { days = "mon-fri", from = "08:00", to = "18:00" },
  { days = "sat,sun", from = "09:00", to = "13:00" },
  { days = "mon-wed,fri", from = "22:00", to = "02:00" },
  { days = "thu", from = "00:00", to = "24:00" },
]
holidays = ["2026-12-25"]
use_global_holidays = true
"#,
    );
    let config = Config::parse(&text, "t").unwrap_or_else(|e| panic!("{e}"));
    let hours = config.groups[0].hours[2].parse().expect("validated");
    assert_eq!(hours.days.to_string(), "mon-wed,fri");
    assert_eq!((hours.from_minute, hours.to_minute), (22 * 60, 2 * 60));
}

#[test]
fn syntax_error_names_line_and_column() {
    let p = problems("[pbx]\nname = \"lab\"\nagents = [\"a\",\n[[groups]]\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_problem(&p, &["syntax error at line 4, column"]);
}

#[test]
fn unknown_keys_are_all_listed_with_suggestions() {
    let text = with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agnets = ["maria"]
agents = ["maria"]
time_zone = "UTC"

[registry]
retention = 14400
"#,
    );
    let p = problems(&format!("colour = \"blue\"\n{text}"));
    assert_problem(&p, &["colour: unknown key", "keys of the top level: pbx, groups"]);
    assert_problem(&p, &["groups[0].agnets: unknown key", "did you mean \"agents\"?"]);
    assert_problem(&p, &["groups[0].time_zone: unknown key", "did you mean \"timezone\"?"]);
    assert_problem(&p, &["registry.retention: unknown key", "retention_seconds"]);
    assert_eq!(p.len(), 4, "{p:#?}");
}

#[test]
fn wrong_types_name_the_field() {
    let p = problems(&with_agents(
        r#"
[[groups]]
id = "support"
queue = 700
agents = "maria"
allow_transfer = "yes"

[registry]
retention_seconds = "4h"
"#,
    ));
    assert_problem(&p, &["groups[0].queue: expected a string, found an integer"]);
    assert_problem(&p, &["groups[0].agents: expected an array of strings, found a string"]);
    assert_problem(&p, &["groups[0].allow_transfer: expected a boolean"]);
    assert_problem(&p, &["registry.retention_seconds: expected an integer"]);
    // A wrong type is one problem, not also "group has no agents".
    assert_eq!(p.len(), 4, "{p:#?}");
}

#[test]
fn agent_without_extension_names_the_agent_and_its_index() {
    let p = problems(&doc(r#"
[[agents]]
id = "maria"
extension = "2000"

[[agents]]
id = "ana"
name = "Ana Costa"
"#));
    assert_problem(&p, &["agents[1].extension", "\"ana\"", "has no extension"]);
    assert_eq!(p.len(), 1, "{p:#?}");
}

#[test]
fn group_without_agents() {
    let p = problems(&with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agents = []

[[groups]]
id = "sales"
queue = "701"
"#,
    ));
    assert_problem(&p, &["groups[0].agents", "\"support\" has no agents"]);
    assert_problem(&p, &["groups[1].agents", "\"sales\" has no agents"]);
}

#[test]
fn unknown_agents_and_groups_referenced() {
    let p = problems(&with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agents = ["maria", "mario"]
admins = ["boss"]
overflow = ["salse"]

[[groups]]
id = "sales"
queue = "701"
agents = ["joao"]
"#,
    ));
    assert_problem(&p, &["groups[0].agents[1]", "unknown agent \"mario\"", "did you mean \"maria\"?"]);
    assert_problem(&p, &["groups[0].admins[0]", "unknown agent \"boss\"", "\"maria\", \"joao\""]);
    assert_problem(&p, &["groups[0].overflow[0]", "unknown group \"salse\"", "did you mean \"sales\"?"]);
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn duplicate_ids_extensions_and_queues() {
    let p = problems(&doc(r#"
[[groups]]
id = "support"
queue = "700"
agents = ["maria", "maria"]

[[groups]]
id = "support"
queue = "701"
agents = ["maria"]

[[groups]]
id = "sales"
queue = "700"
agents = ["maria"]

[[agents]]
id = "maria"
extension = "2000"

[[agents]]
id = "maria"
extension = "2001"

[[agents]]
id = "joao"
extension = "2000"
"#));
    assert_problem(&p, &["agents[1].id", "duplicate agent id \"maria\"", "agents[0]"]);
    assert_problem(&p, &["agents[2].extension", "\"2000\"", "also the extension of agent \"maria\""]);
    assert_problem(&p, &["groups[1].id", "duplicate group id \"support\"", "groups[0]"]);
    assert_problem(&p, &["groups[2].queue", "queue \"700\" already serves group \"support\""]);
    assert_problem(&p, &["groups[0].agents[1]", "\"maria\" is listed twice"]);
}

#[test]
fn overflow_cycles_are_named() {
    let p = problems(&with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agents = ["maria"]
overflow = ["sales"]

[[groups]]
id = "sales"
queue = "701"
agents = ["joao"]
overflow = ["vip", "support"]

[[groups]]
id = "vip"
queue = "702"
agents = ["joao"]
overflow = ["vip"]
"#,
    ));
    assert_problem(&p, &["groups[0].overflow[0]", "overflow cycle support → sales → support"]);
    assert_problem(&p, &["groups[2].overflow[0]", "\"vip\" overflows to itself"]);
    assert_eq!(p.len(), 2, "{p:#?}");

    let p = problems(&with_agents(
        r#"
[[groups]]
id = "a"
queue = "1"
agents = ["maria"]
overflow = ["b"]
[[groups]]
id = "b"
queue = "2"
agents = ["maria"]
overflow = ["c"]
[[groups]]
id = "c"
queue = "3"
agents = ["maria"]
overflow = ["a"]
"#,
    ));
    assert_problem(&p, &["overflow cycle a → b → c → a"]);
    assert_eq!(p.len(), 1, "{p:#?}");
}

#[test]
fn bad_time_ranges() {
    let p = problems(&with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agents = ["maria"]
hours = [
  { days = "mon-fry", from = "08:00", to = "18:00" },
  { days = "", from = "08:00", to = "18:00" },
  { days = "sat", from = "8h", to = "24:01" },
  { days = "sun", from = "24:00", to = "12:60" },
  { days = "mon", from = "10:00", to = "10:00" },
  { days = "tue", from = "10:00" },
  { days = "wed", from = "10:00", to = "12:00", until = "x" },
]
"#,
    ));
    assert_problem(&p, &["groups[0].hours[0].days", "unknown day \"fry\""]);
    assert_problem(&p, &["groups[0].hours[1].days", "empty day list"]);
    assert_problem(&p, &["groups[0].hours[2].from", "\"8h\" is not a time of day"]);
    assert_problem(&p, &["groups[0].hours[2].to", "\"24:01\""]);
    assert_problem(&p, &["groups[0].hours[3].from", "24:00 is only valid as the end"]);
    assert_problem(&p, &["groups[0].hours[3].to", "\"12:60\""]);
    assert_problem(&p, &["groups[0].hours[4]", "empty range"]);
    assert_problem(&p, &["groups[0].hours[5].to", "missing"]);
    assert_problem(&p, &["groups[0].hours[6].until", "unknown key", "days, from, to"]);
}

#[test]
fn bad_holiday_dates() {
    let p = problems(&with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agents = ["maria"]
holidays = ["2026-02-30", "25/12/2026", 2026-12-25]

[holidays]
dates = ["2026-12-25", "2027-1-1"]
"#,
    ));
    assert_problem(&p, &["groups[0].holidays[0]", "\"2026-02-30\" is not a calendar date"]);
    assert_problem(&p, &["groups[0].holidays[1]", "\"25/12/2026\"", "YYYY-MM-DD"]);
    assert_problem(&p, &["groups[0].holidays[2]", "TOML date", "quotes"]);
    assert_problem(&p, &["holidays.dates[1]", "\"2027-1-1\""]);
    assert_eq!(p.len(), 4, "{p:#?}");
}

#[test]
fn unknown_time_zone() {
    let p = problems(&with_agents(
        r#"
[[groups]]
id = "support"
queue = "700"
agents = ["maria"]
timezone = "America/Sao_Paolo"
"#,
    ));
    assert_problem(&p, &["groups[0].timezone", "unknown time zone \"America/Sao_Paolo\""]);
}

#[test]
fn secret_sources_exactly_one() {
    let base = |secret_lines: &str| {
        format!("[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"127.0.0.1:5038\"\nusername = \"u\"\n{secret_lines}\n")
    };
    let p = problems(&base(""));
    assert_problem(&p, &["pbx.ami", "no secret", "exactly one of secret, secret_file, secret_env"]);
    let p = problems(&base(&format!("secret = \"{SECRET}\"\nsecret_env = \"AMI_SECRET\"")));
    assert_problem(&p, &["pbx.ami", "secret and secret_env are both set"]);
    let p = problems(&base("secret = \"\""));
    assert_problem(&p, &["pbx.ami.secret: must not be empty"]);
    let p = problems(&base(&format!("secret_env = \"{SECRET}\"")));
    assert_problem(&p, &["pbx.ami.secret_env", "is not an environment variable name"]);
    assert!(!p.iter().any(|m| m.contains(SECRET)), "{p:?}");
    // Valid: the variable is not looked at during validation.
    assert!(problems(&base("secret_env = \"CALLBRIDGE_TEST_UNSET_VARIABLE\"")).is_empty());
    assert!(problems(&base("secret_file = \"/nonexistent/secret\"")).is_empty());
    // Sinks with secrets follow the same rule.
    let p = problems(&doc("[[sinks]]\ntype = \"webhook\"\nurl = \"https://helpdesk.example/hooks\"\n"));
    assert_problem(&p, &["sinks[0]", "no secret"]);
}

#[test]
fn secrets_are_resolved_only_when_asked() {
    let text = "[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"127.0.0.1:5038\"\nusername = \"u\"\nsecret_env = \"CALLBRIDGE_TEST_UNSET_VARIABLE\"\n[[sinks]]\ntype = \"zammad\"\nurl = \"https://zammad.example/api/v1/cti\"\nsecret_file = \"/nonexistent/token\"\n";
    let config = Config::parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
    let p = config.check_secrets();
    assert_problem(&p, &["pbx.ami", "\"CALLBRIDGE_TEST_UNSET_VARIABLE\"", "is not set"]);
    assert_problem(&p, &["sinks[0]", "cannot read secret_file \"/nonexistent/token\""]);

    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("ami.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write");
    let text = format!(
        "[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"127.0.0.1:5038\"\nusername = \"u\"\nsecret_file = {:?}\n",
        secret_file.display().to_string()
    );
    let config = Config::parse(&text, "t").unwrap_or_else(|e| panic!("{e}"));
    assert!(config.check_secrets().is_empty());
    let ami = config.pbx.ami.as_ref().expect("ami");
    assert_eq!(ami.secret.resolve().expect("readable"), SECRET);
}

#[test]
fn bad_ami_address() {
    for (address, why) in [
        ("localhost", "has no port"),
        ("pbx.example:0", "not a port"),
        ("pbx.example:http", "not a port"),
        ("::1:5038", "needs brackets"),
        ("tcp://pbx:5038", "URL scheme"),
        ("pbx example:5038", "not a host name"),
    ] {
        let text =
            format!("[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = {address:?}\nusername = \"u\"\nsecret = \"x\"\n");
        assert_problem(&problems(&text), &["pbx.ami.address", why]);
    }
}

#[test]
fn pbx_name_with_colon_and_empty_ids() {
    let p = problems(
        r#"
[pbx]
name = "lab:2"

[[groups]]
id = ""
queue = "700"
agents = ["maria"]

[[agents]]
id = ""
extension = "2000"

[[agents]]
id = "maria"
extension = "2001"
"#,
    );
    assert_problem(&p, &["pbx.name", "contains ':'", "<pbx>:<call>:<seq>"]);
    assert_problem(&p, &["groups[0].id: must not be empty"]);
    assert_problem(&p, &["agents[0].id: must not be empty"]);
    let p = problems("[pbx]\nname = \"\"\n");
    assert_problem(&p, &["pbx.name: must not be empty"]);
    let p = problems("");
    assert_problem(&p, &["pbx: missing table [pbx]"]);
}

#[test]
fn many_problems_are_listed_at_once() {
    let text = format!(
        r#"
colour = "blue"

[pbx]
name = "lab:1"

[pbx.ami]
address = "localhost"
username = "callbridge"
secret = "{SECRET}"
tls = "yes"

[[groups]]
id = "support"
queue = "700"
agents = ["maria", "mario"]
timezone = "Mars/Olympus"
hours = [{{ days = "mon-fry", from = "08:00", to = "18:00" }}]
overflow = ["sales"]

[[groups]]
id = "sales"
queue = "701"
agents = []
overflow = ["support"]

[[agents]]
id = "maria"
extension = "2000"

[[agents]]
id = "ana"

[holidays]
dates = ["2026-13-01"]
"#
    );
    let err = Config::parse(&text, "many.toml").expect_err("invalid");
    let p = &err.problems;
    for fragments in [
        &["colour: unknown key"][..],
        &["pbx.name", "':'"],
        &["pbx.ami.address"],
        &["pbx.ami.tls"],
        &["groups[0].agents[1]", "\"mario\""],
        &["groups[0].timezone", "\"Mars/Olympus\""],
        &["groups[0].hours[0].days", "\"fry\""],
        &["groups[1].agents", "no agents"],
        &["agents[1].extension", "\"ana\""],
        &["holidays.dates[0]", "\"2026-13-01\""],
        &["overflow cycle support → sales → support"],
    ] {
        assert_problem(p, fragments);
    }
    assert_eq!(p.len(), 11, "{p:#?}");
    // Display: one problem per line, each naming the file.
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), 11, "{shown}");
    assert!(shown.lines().all(|l| l.starts_with("many.toml: ")), "{shown}");
}

#[test]
fn secrets_never_appear_in_debug_output_or_errors() {
    let config = Config::load(&lab_path()).unwrap_or_else(|e| panic!("{e}"));
    let lab_secret = config.pbx.ami.as_ref().and_then(|a| a.secret.secret.clone());
    let lab_secret = lab_secret.expect("lab.toml has an inline secret");
    for shown in [format!("{config:?}"), format!("{config:#?}"), config.summary()] {
        assert!(!shown.contains(&lab_secret), "secret leaked:\n{shown}");
    }
    let serialized = toml::to_string(&config).expect("serializes");
    assert!(!serialized.contains(&lab_secret), "secret leaked:\n{serialized}");

    // Errors about the secret, or anywhere near it, never quote it.
    for text in [
        format!("[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"x\"\nusername = \"u\"\nsecret = \"{SECRET}\"\nsecret_env = \"E\"\npasword = \"{SECRET}\"\n"),
        format!("[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"127.0.0.1:1\"\nusername = \"u\"\nsecret = [\"{SECRET}\"]\n"),
        format!("[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"127.0.0.1:1\"\nusername = \"u\"\nsecret = \"{SECRET}\n"),
        format!("[pbx]\nname = \"lab\"\n[[sinks]]\ntype = \"webhook\"\nurl = \"ftp://x\"\nsecret = \"{SECRET}\"\nsecret_file = \"f\"\n"),
    ] {
        let err = Config::parse(&text, "t").expect_err("invalid");
        let shown = format!("{err}\n{err:?}");
        assert!(!shown.contains(SECRET), "secret leaked:\n{shown}");
    }
}

#[test]
fn validate_checks_a_config_built_in_code() {
    let mut config = Config::load(&lab_path()).unwrap_or_else(|e| panic!("{e}"));
    config.groups[1].overflow = vec!["support".into()];
    config.agents[0].extension = None;
    config.groups[0].timezone = "Nowhere/Special".into();
    let p = config.validate();
    assert_problem(&p, &["overflow cycle support → sales → support"]);
    assert_problem(&p, &["agents[0].extension", "\"maria\""]);
    assert_problem(&p, &["groups[0].timezone", "\"Nowhere/Special\""]);
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn check_config_prints_problems_or_a_summary() {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = check_config(&lab_path(), CheckOptions::default(), &mut out, &mut err);
    let (out_s, err_s) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    assert_eq!(code, 0, "{err_s}");
    assert!(err_s.is_empty());
    for expected in [
        "configuration OK",
        "pbx         lab",
        "127.0.0.1:5038, user \"callbridge\"",
        "secret inline (not shown)",
        "support",
        "queue 700",
        "1. maria (2000)  2. joao (2001)",
        "overflow  sales",
        "America/Sao_Paulo",
        "ana       2002",
        "2026-12-25, 2027-01-01",
        "jsonl     stdout",
    ] {
        assert!(out_s.contains(expected), "summary lacks {expected:?}:\n{out_s}");
    }
    assert!(!out_s.contains("s3cret-lab"), "secret leaked:\n{out_s}");
    assert!(out_s.lines().count() < 50, "more than a screen:\n{out_s}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, with_agents("[[groups]]\nid = \"g\"\nqueue = \"1\"\nagents = [\"x\"]\ncolour = 1\n"))
        .expect("write");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = check_config(&bad, CheckOptions::default(), &mut out, &mut err);
    let err_s = String::from_utf8_lossy(&err);
    assert_eq!(code, i32::from(EX_USAGE));
    assert_eq!(EX_USAGE, 64);
    assert!(out.is_empty());
    assert_eq!(err_s.lines().count(), 2, "{err_s}");
    assert!(err_s.contains("groups[0].agents[0]") && err_s.contains("groups[0].colour"));
    assert!(!err_s.contains(SECRET));

    let missing = dir.path().join("missing.toml");
    let code = check_config(&missing, CheckOptions::default(), &mut Vec::new(), &mut Vec::new());
    assert_eq!(code, i32::from(EX_USAGE));

    // Unresolvable secrets fail only when resolving is asked for.
    let env_only = dir.path().join("env.toml");
    std::fs::write(
        &env_only,
        "[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"127.0.0.1:5038\"\nusername = \"u\"\nsecret_env = \"CALLBRIDGE_TEST_UNSET_VARIABLE\"\n",
    )
    .expect("write");
    let code = check_config(&env_only, CheckOptions::default(), &mut Vec::new(), &mut Vec::new());
    assert_eq!(code, 0);
    let mut err = Vec::new();
    let asked = CheckOptions { resolve_secrets: true };
    let code = check_config(&env_only, asked, &mut Vec::new(), &mut err);
    assert_eq!(code, i32::from(EX_USAGE));
    assert!(String::from_utf8_lossy(&err).contains("CALLBRIDGE_TEST_UNSET_VARIABLE"));
}

/// `callbridge check-config` (as run by `ExecStartPre=`) obtains every
/// secret the daemon would, so what passes here does not fail at start:
/// an unset `secret_env`, a missing `secret_file`, a `whsec_` secret that
/// is not base64 and a Zammad token with a `/` each fail, naming the field
/// path, never the value. A secret file others can read is a warning.
#[test]
fn check_config_command_resolves_every_secret() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.secret");
    let exposed = dir.path().join("zammad.token");
    std::fs::write(&exposed, "tok/with-slash\n").expect("write");
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let readable = dir.path().join("hook.secret");
    std::fs::write(&readable, format!("{SECRET}\n")).expect("write");
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let text = format!(
        "[pbx]\nname = \"lab\"\n[pbx.ami]\naddress = \"127.0.0.1:5038\"\nusername = \"u\"\nsecret_env = \"CALLBRIDGE_TEST_UNSET_VARIABLE\"\n\
         [[sinks]]\ntype = \"webhook\"\nname = \"a\"\nurl = \"http://127.0.0.1:9/\"\nsecret_file = {missing:?}\n\
         [[sinks]]\ntype = \"webhook\"\nname = \"b\"\nurl = \"http://127.0.0.1:9/\"\nsecret = \"whsec_!!{SECRET}\"\n\
         [[sinks]]\ntype = \"zammad\"\nurl = \"http://127.0.0.1:9/\"\nsecret_file = {exposed:?}\n\
         [[sinks]]\ntype = \"webhook\"\nname = \"d\"\nurl = \"http://127.0.0.1:9/\"\nsecret_file = {readable:?}\n",
        missing = missing.display().to_string(),
        exposed = exposed.display().to_string(),
        readable = readable.display().to_string(),
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).expect("write");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_callbridge"))
            .args(args)
            .arg(&path)
            .env_remove("CALLBRIDGE_TEST_UNSET_VARIABLE")
            .output()
            .expect("run callbridge")
    };
    let out = run(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("pbx.ami.secret_env: environment variable \"CALLBRIDGE_TEST_UNSET_VARIABLE\" is not set"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "sinks[0].secret_file: cannot read {:?}: No such file or directory",
            missing.display().to_string()
        )),
        "{err}"
    );
    assert!(
        err.contains("sinks[1].secret: the signing secret starts with whsec_ but the rest is not valid base64"),
        "{err}"
    );
    assert!(err.contains("sinks[2].secret_file: token must be non-empty and contain no '/'"), "{err}");
    assert!(err.contains("warning: sinks[3].secret_file:") && err.contains("readable by other users"), "{err}");
    assert!(!err.contains("sinks[3].secret_file: cannot"), "{err}");
    assert!(!err.contains(SECRET) && !err.contains("tok/with-slash"), "a secret leaked:\n{err}");
    assert!(out.stdout.is_empty());

    // Away from the daemon's environment, secrets can be left unresolved.
    let out = run(&["check-config", "--no-resolve-secrets"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
