//! `tally token`: mint, list and revoke the bearer tokens both services accept (roles:
//! docs/http-api.md). A token is printed once; the token file only ever receives its SHA-256,
//! name, role, tenants and expiry. Every change is validated as the services would load it before
//! anything is written, and written with the file's mode kept at 0600.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use tally_ledger::auth::{check_token_file, new_token_expiring, parse_token_file, render_token_file, stanza, Role};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Mint a token, append its hash to the token file and print the token (shown only once).
    New(NewArgs),
    /// List the tokens of a token file: name, role, tenants, expiry (never a secret).
    List(FileArg),
    /// Remove a token from the token file; the services refuse it within a second, without a restart.
    Revoke(RevokeArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Tenant,
    /// Authorize, release and budget state for the tenants it names (`--tenant '*'`: every
    /// tenant); never audit reads.
    Gateway,
    Regulator,
    Billing,
    /// Reads both services' `/metrics` only (for a Prometheus scraper).
    Metrics,
    Admin,
}

#[derive(Args)]
pub struct FileArg {
    /// Token file the services read (`tokens` in their config).
    #[arg(long)]
    file: PathBuf,
}

#[derive(Args)]
pub struct NewArgs {
    /// Who holds the token (unique in the file; appears in logs).
    #[arg(long)]
    name: String,
    #[arg(long, value_enum)]
    role: RoleArg,
    /// The tenant (role tenant: exactly one; regulator and gateway: repeat for each tenant).
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    /// Refuse the token after this long: a number and a unit, `m` (minutes), `h`, `d` or `w`,
    /// such as `30d`. Without it the token lasts until revoked.
    #[arg(long, value_parser = parse_lifetime)]
    expires_in: Option<jiff::SignedDuration>,
    /// Token file the services read (`tokens` in their config); created with mode 0600.
    #[arg(long)]
    file: PathBuf,
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The token's name.
    name: String,
    #[command(flatten)]
    file: FileArg,
}

pub fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New(args) => new(args),
        TokenCommand::List(args) => list(&args.file),
        TokenCommand::Revoke(args) => revoke(&args.name, &args.file.file),
    }
}

fn new(args: NewArgs) -> anyhow::Result<()> {
    let role = match args.role {
        RoleArg::Tenant => Role::Tenant,
        RoleArg::Gateway => Role::Gateway,
        RoleArg::Regulator => Role::Regulator,
        RoleArg::Billing => Role::Billing,
        RoleArg::Metrics => Role::Metrics,
        RoleArg::Admin => Role::Admin,
    };
    let expires_at = match args.expires_in {
        Some(d) => Some(jiff::Timestamp::now().checked_add(d).context("--expires-in is too far in the future")?),
        None => None,
    };
    let (token, entry) = new_token_expiring(&args.name, role, args.tenants, expires_at)?;
    let existing = read_if_exists(&args.file)?;
    // Validate the file as it will be, so a duplicate name is refused before anything is written.
    let candidate = format!("{existing}{}{}", if existing.is_empty() || existing.ends_with('\n') { "" } else { "\n" }, stanza(&entry)?);
    check_token_file(&candidate).with_context(|| format!("the new token would make {} invalid", args.file.display()))?;
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    file.write_all(&candidate.as_bytes()[existing.len()..]).with_context(|| format!("writing {}", args.file.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", args.file.display()))?;
    println!("{token}");
    let until = expires_at.map(|t| format!(", valid until {t}")).unwrap_or_default();
    eprintln!("token {:?} ({}{until}) added to {}; this is the only time it is shown", args.name, role.as_str(), args.file.display());
    Ok(())
}

fn list(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let entries = parse_token_file(&text).with_context(|| format!("{} is not a valid token file", path.display()))?;
    let now = jiff::Timestamp::now();
    println!("{:<24} {:<10} {:<25} {:<10} tenants", "name", "role", "expires_at", "state");
    for e in entries {
        let (expires, state) = match e.expires_at {
            Some(at) if at <= now => (at.to_string(), "expired"),
            Some(at) => (at.to_string(), "valid"),
            None => ("never".to_string(), "valid"),
        };
        println!("{:<24} {:<10} {:<25} {:<10} {}", e.name, e.role.as_str(), expires, state, e.tenants.join(","));
    }
    Ok(())
}

fn revoke(name: &str, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut entries = parse_token_file(&text).with_context(|| format!("{} is not a valid token file", path.display()))?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    if entries.len() == before {
        anyhow::bail!("{} has no token named {name:?} (`tally token list --file {}` shows them)", path.display(), path.display());
    }
    let rendered = render_token_file(entries)?;
    // One atomic replace: a service re-reading the file sees the old or the new one, never half.
    tally_log::durable::replace_file_with(path, |f| {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(rendered.as_bytes())
    })
    .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("token {name:?} removed from {}; the services refuse it within a second", path.display());
    Ok(())
}

fn read_if_exists(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `30d`, `12h`, `90m`, `2w`: a token's lifetime.
fn parse_lifetime(text: &str) -> Result<jiff::SignedDuration, String> {
    let bad = || format!("{text:?} is not a lifetime: a positive number and a unit, m, h, d or w (such as 30d)");
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: i64 = text[..unit_at].parse().map_err(|_| bad())?;
    let minutes = match &text[unit_at..] {
        "m" => 1,
        "h" => 60,
        "d" => 24 * 60,
        "w" => 7 * 24 * 60,
        _ => return Err(bad()),
    };
    match n.checked_mul(minutes).filter(|m| *m > 0 && *m <= 100 * 366 * 24 * 60) {
        Some(m) => Ok(jiff::SignedDuration::from_mins(m)),
        None => Err(format!("{text:?}: a lifetime is more than zero and at most 100 years")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_lifetime;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("30d").unwrap(), jiff::SignedDuration::from_hours(720));
        assert_eq!(parse_lifetime("90m").unwrap(), jiff::SignedDuration::from_mins(90));
        assert_eq!(parse_lifetime("2w").unwrap(), jiff::SignedDuration::from_hours(336));
        for bad in ["", "d", "30", "30 d", "-1d", "0h", "1y", "99999999999999999999d", "400000w"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }
}
