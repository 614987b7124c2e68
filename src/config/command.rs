//! `callbridge check-config FILE`: validates a configuration and prints
//! either every problem (stderr, exit 64) or a one-screen summary of what
//! callbridge will do with it (stdout, exit 0).
//!
//! Meant for people and for `ExecStartPre=`/`ExecReload=` in systemd. The
//! command obtains every secret (reads secret files and environment
//! variables) and checks it is usable, so that what passes here does not
//! fail when `run` starts; `--no-resolve-secrets` skips that, for checking a
//! file away from the daemon's environment. It never prints a secret's value.

use super::{Config, ConfigError, SinkConfig};
use crate::exit::EX_USAGE;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

/// Options of [`check_config`].
///
/// `Default` does not resolve secrets (the library's behaviour since its
/// first callers); the `check-config` command resolves them unless told not
/// to ([`CheckOptions::COMMAND`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Also obtain every secret (read `secret_file`s and `secret_env`
    /// variables) and report those that cannot be used: unreadable, empty,
    /// or malformed for their use (a webhook `whsec_` secret that is not
    /// base64, a Zammad token with a `/`). Warns about secret files other
    /// users can read.
    pub resolve_secrets: bool,
}

impl CheckOptions {
    /// What `callbridge check-config` does by default.
    pub const COMMAND: CheckOptions = CheckOptions { resolve_secrets: true };
}

/// `check-config` printing to stdout/stderr. Returns the process exit code:
/// 0 valid, 64 invalid.
pub fn check_config_main(path: &Path, options: CheckOptions) -> i32 {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    check_config(path, options, &mut stdout.lock(), &mut stderr.lock())
}

/// `check-config` writing to the given streams. Returns the exit code.
pub fn check_config(path: &Path, options: CheckOptions, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{e}");
            return i32::from(EX_USAGE);
        }
    };
    if options.resolve_secrets {
        let report = config.inspect_secrets();
        for warning in &report.warnings {
            let _ = writeln!(err, "{}: warning: {warning}", path.display());
        }
        if !report.problems.is_empty() {
            let e = ConfigError { source_name: path.display().to_string(), problems: report.problems };
            let _ = writeln!(err, "{e}");
            return i32::from(EX_USAGE);
        }
    }
    let _ = writeln!(out, "{}: configuration OK\n", path.display());
    let _ = out.write_all(config.summary().as_bytes());
    0
}

impl Config {
    /// A one-screen description of the configuration, for people. Secret
    /// values are never included (only where a secret comes from).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = self.write_summary(&mut s);
        s
    }

    fn write_summary(&self, s: &mut String) -> std::fmt::Result {
        self.write_pbx(s)?;
        self.write_groups(s)?;
        self.write_agents(s)?;
        self.write_services(s)?;
        self.write_sinks(s)
    }

    fn write_pbx(&self, s: &mut String) -> std::fmt::Result {
        writeln!(
            s,
            "pbx         {} (event ids {}:<call id>:<seq>, ticket variable {})",
            self.pbx.name, self.pbx.name, self.pbx.ticket_variable
        )?;
        match &self.pbx.ami {
            Some(ami) => writeln!(
                s,
                "ami         {}{}, user {:?}, {} login, secret {}",
                ami.address,
                if ami.tls { " (TLS)" } else { "" },
                ami.username,
                ami.auth.as_str(),
                ami.secret.describe()
            )?,
            None => writeln!(s, "ami         not configured (replay only)")?,
        }
        Ok(())
    }

    fn write_groups(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "\ngroups ({})", self.groups.len())?;
        for g in &self.groups {
            let name = g.name.as_deref().map(|n| format!("{n:?}, ")).unwrap_or_default();
            writeln!(s, "  {:<10}{name}queue {}, time zone {}", g.id, g.queue, g.timezone)?;
            let agents: Vec<String> = g
                .agents
                .iter()
                .enumerate()
                .map(|(i, a)| match self.agent(a).and_then(|a| a.extension.as_deref()) {
                    Some(ext) => format!("{}. {a} ({ext})", i + 1),
                    None => format!("{}. {a}", i + 1),
                })
                .collect();
            writeln!(s, "    agents    {}", agents.join("  "))?;
            if !g.admins.is_empty() {
                writeln!(s, "    admins    {}", g.admins.join(", "))?;
            }
            writeln!(s, "    hours     {}", hours_text(g))?;
            writeln!(s, "    holidays  {}", holidays_text(g, self.holidays.dates.len()))?;
            if !g.overflow.is_empty() {
                writeln!(s, "    overflow  {}", g.overflow.join(" → "))?;
            }
            for (who, to) in [("unknown", &g.redirect_unknown_to), ("inactive", &g.redirect_inactive_to)] {
                if let Some(to) = to {
                    writeln!(s, "    redirect  {who} callers → {to}")?;
                }
            }
            writeln!(s, "    transfer  {}", if g.allow_transfer { "allowed" } else { "not allowed" })?;
        }
        Ok(())
    }

    fn write_agents(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "\nagents ({})", self.agents.len())?;
        for a in &self.agents {
            let groups: Vec<&str> =
                self.groups.iter().filter(|g| g.agents.contains(&a.id)).map(|g| g.id.as_str()).collect();
            writeln!(
                s,
                "  {:<10}{:<8}{:<22}{}",
                a.id,
                a.extension.as_deref().unwrap_or("-"),
                a.name.as_deref().unwrap_or(""),
                if groups.is_empty() { "in no group".to_string() } else { format!("groups: {}", groups.join(", ")) }
            )?;
        }
        Ok(())
    }

    fn write_services(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s)?;
        if self.holidays.dates.is_empty() {
            writeln!(s, "holidays    none")?;
        } else {
            writeln!(s, "holidays    {}", short_list(&self.holidays.dates, 8))?;
        }
        match &self.recordings.url_base {
            Some(base) => writeln!(s, "recordings  {base}<file name>")?,
            None => writeln!(s, "recordings  the PBX's file path, as is")?,
        }
        match &self.outbound.context {
            Some(ctx) => writeln!(s, "outbound    context {ctx}, prefix {:?}", self.outbound.prefix)?,
            None => writeln!(s, "outbound    click-to-call not configured")?,
        }
        match &self.agi {
            Some(agi) => writeln!(
                s,
                "agi         FastAGI routing on {}, at most {} sessions of {} s",
                agi.listen, agi.max_sessions, agi.session_timeout_seconds
            )?,
            None => writeln!(s, "agi         FastAGI routing not configured")?,
        }
        if let Some(l) = &self.caller_lookup {
            let token = if l.secret.is_set() { format!(", token {}", l.secret.describe()) } else { String::new() };
            writeln!(
                s,
                "lookup      {:?} {}{token}, {} ms, cache {} s × {}, {} at once",
                l.kind,
                without_userinfo(&l.url),
                l.timeout_ms,
                l.cache_ttl_seconds,
                l.cache_max_entries,
                l.max_concurrent
            )?;
        }
        writeln!(
            s,
            "registry    ended calls kept {} ({} s), at most {}",
            human_duration(self.registry.retention_seconds),
            self.registry.retention_seconds,
            self.registry.max_ended_calls
        )
    }

    fn write_sinks(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "\nsinks ({})", self.sinks.len())?;
        for sink in &self.sinks {
            match sink {
                SinkConfig::Jsonl { path, .. } => {
                    writeln!(s, "  jsonl     {}", if path == "-" { "stdout" } else { path.as_str() })?
                }
                SinkConfig::Webhook { url, secret, batch_size, .. } => writeln!(
                    s,
                    "  webhook   {}, signing secret {}, {} event(s) per request",
                    without_userinfo(url),
                    secret.describe(),
                    batch_size
                )?,
                SinkConfig::Zammad { url, secret, honour_reject, .. } => writeln!(
                    s,
                    "  zammad    {}, token {}, rejected callers {}",
                    without_userinfo(url),
                    secret.describe(),
                    if *honour_reject { "hung up" } else { "not hung up" }
                )?,
                SinkConfig::Nats { connection, subject, stream, batch_size, .. } => writeln!(
                    s,
                    "  nats      {}, subject {subject}, stream {stream}, {batch_size} event(s) per batch",
                    connection.url.split(',').map(|u| without_userinfo(u.trim())).collect::<Vec<_>>().join(",")
                )?,
            }
        }
        if let Some(ha) = &self.ha {
            writeln!(
                s,
                "\nhot standby: lease {}/{} on {}, {} s, this node {}",
                ha.bucket,
                ha.key(self),
                ha.connection.url.split(',').map(|u| without_userinfo(u.trim())).collect::<Vec<_>>().join(","),
                ha.lease_seconds,
                ha.node_name()
            )?;
        }
        Ok(())
    }
}

fn hours_text(g: &super::GroupConfig) -> String {
    if g.hours.is_empty() {
        return "always open".to_string();
    }
    g.hours
        .iter()
        .map(|h| match h.parse() {
            Ok(p) => format!("{} {}–{}", p.days, clock(p.from_minute), clock(p.to_minute)),
            Err(_) => format!("{} {}–{}", h.days, h.from, h.to),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn clock(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

fn holidays_text(g: &super::GroupConfig, global: usize) -> String {
    let mut parts = Vec::new();
    if !g.holidays.is_empty() {
        parts.push(short_list(&g.holidays, 6));
    }
    if g.use_global_holidays {
        parts.push(format!("the global calendar ({global} dates)"));
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" + ")
    }
}

fn short_list(items: &[String], max: usize) -> String {
    let mut s = items.iter().take(max).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > max {
        let _ = write!(s, ", … ({} in all)", items.len());
    }
    s
}

fn human_duration(seconds: u64) -> String {
    match seconds {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// A URL with any `user:password@` part masked.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", rest.get(at + 1..).unwrap_or_default()),
        None => url.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    #[test]
    fn userinfo_is_masked() {
        assert_eq!(super::without_userinfo("https://u:p@h.example/x@y"), "https://***@h.example/x@y");
        assert_eq!(super::without_userinfo("https://h.example/x@y"), "https://h.example/x@y");
    }

    #[test]
    fn the_command_resolves_secrets_the_library_default_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        let text = "[pbx]\nname = \"lab\"\n[[sinks]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\nsecret = \"whsec_!!\"\n";
        std::fs::write(&path, text).expect("write");
        let run = |options| super::check_config(&path, options, &mut Vec::new(), &mut Vec::new());
        assert_eq!(run(super::CheckOptions::default()), 0);
        assert_eq!(run(super::CheckOptions::COMMAND), 64);
    }
}
