//! The process exit codes callbridge uses besides 0 and 1 (sysexits.h
//! values, so that systemd units and scripts can tell them apart).

/// The command line or the configuration is unusable (sysexits
/// `EX_USAGE`): `check-config` on a bad file, `run` with a bad file.
pub const EX_USAGE: u8 = 64;
/// The work is not done but kept for later (sysexits `EX_TEMPFAIL`): a
/// replay's events still undelivered at the drain deadline stay in the
/// outbox and go first next time.
pub const EX_TEMPFAIL: u8 = 75;
/// The PBX refused callbridge's credentials (sysexits `EX_NOPERM`).
/// Retrying cannot fix a wrong secret, and hammering the Manager Interface
/// with failed logins can get callbridge's address locked out on the PBX:
/// the unit's `RestartPreventExitStatus=` keeps systemd from restarting it
/// until someone fixes the credentials.
pub const EX_NOPERM: u8 = 77;
