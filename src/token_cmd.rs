//! `tally token new`: mint a bearer token (roles: docs/http-api.md). The token is printed once; the token file
//! only ever receives its SHA-256, name, role and tenants.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use tally_ledger::auth::{check_token_file, new_token, stanza, Role};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Mint a token, append its hash to the token file and print the token (shown only once).
    New(NewArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Tenant,
    Regulator,
    Billing,
    /// Reads both services' `/metrics` only (for a Prometheus scraper).
    Metrics,
    Admin,
}

#[derive(Args)]
pub struct NewArgs {
    /// Who holds the token (unique in the file; appears in logs).
    #[arg(long)]
    name: String,
    #[arg(long, value_enum)]
    role: RoleArg,
    /// The tenant (role tenant: exactly one; role regulator: repeat for each tenant).
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    /// Token file the services read (`tokens` in their config); created with mode 0600.
    #[arg(long)]
    file: PathBuf,
}

pub fn run(command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::New(args) = command;
    let role = match args.role {
        RoleArg::Tenant => Role::Tenant,
        RoleArg::Regulator => Role::Regulator,
        RoleArg::Billing => Role::Billing,
        RoleArg::Metrics => Role::Metrics,
        RoleArg::Admin => Role::Admin,
    };
    let (token, entry) = new_token(&args.name, role, args.tenants)?;
    let existing = match std::fs::read_to_string(&args.file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", args.file.display())),
    };
    // Validate the file as it will be, so a duplicate name is refused before anything is written.
    let candidate = format!("{existing}{}{}", if existing.is_empty() || existing.ends_with('\n') { "" } else { "\n" }, stanza(&entry)?);
    check_token_file(&candidate).with_context(|| format!("the new token would make {} invalid", args.file.display()))?;
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    file.write_all(&candidate.as_bytes()[existing.len()..]).with_context(|| format!("writing {}", args.file.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", args.file.display()))?;
    println!("{token}");
    eprintln!("token {:?} ({}) added to {}; this is the only time it is shown", args.name, role.as_str(), args.file.display());
    Ok(())
}
