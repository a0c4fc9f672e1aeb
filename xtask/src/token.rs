//! `cargo xtask token --tenant T` / `--admin`: a bearer token signed by the
//! development key under the state folder, on stdout and nothing else, so
//! that `$(cargo xtask token --tenant demo)` works in scripts.

use std::{path::PathBuf, time::Duration};

use anyhow::bail;

#[derive(clap::Args)]
pub struct Args {
    /// A token of this tenant.
    #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
    tenant: Option<String>,
    /// A token with the admin role.
    #[arg(long)]
    admin: bool,
    /// The subject (`sub`); defaults to `<tenant>-user` or `admin`.
    #[arg(long)]
    subject: Option<String>,
    /// How long the token is valid: 30s, 15m, 8h, ...
    #[arg(long, default_value = "8h", value_parser = parse_ttl)]
    ttl: Duration,
    /// The state folder of `cargo xtask up` (its key is created there if
    /// there is none yet).
    #[arg(long, default_value = ".gpualloc")]
    state_dir: PathBuf,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 15m or 8h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: use s, m, h or d")),
    };
    if secs == 0 || secs > 366 * 86_400 {
        return Err(format!("{s:?}: between 1s and 366d"));
    }
    Ok(Duration::from_secs(secs))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let state = crate::up::state_dir(&args.state_dir);
    let issuer = crate::up::dev_issuer(&state)?;
    let token = match (&args.tenant, args.admin) {
        (Some(t), false) => {
            if t.is_empty() {
                bail!("--tenant needs a tenant id");
            }
            let subject = args.subject.clone().unwrap_or_else(|| format!("{t}-user"));
            issuer.token(&subject, Some(t), &[], args.ttl)
        }
        (None, true) => {
            let subject = args.subject.clone().unwrap_or_else(|| "admin".into());
            issuer.token(&subject, None, &["admin"], args.ttl)
        }
        _ => bail!("give --tenant T or --admin"),
    }
    .map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(())
}
