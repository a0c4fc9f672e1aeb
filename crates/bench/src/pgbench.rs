//! The PostgreSQL baseline: pgbench's built-in simple-update script (one
//! UPDATE, one SELECT, one INSERT per transaction, durable commits) on the
//! server the services use, in the same run, so that what the services
//! reach on PostgreSQL can be read against what the server does at its
//! simplest on this machine at that moment.

use std::{path::PathBuf, process::Command, time::Duration};

use crate::mesh::{create_database, drop_database};

/// `pgbench` from `GPUALLOC_PG_BIN` (where `cargo xtask` put the
/// server's binaries), else from PATH.
fn binary() -> PathBuf {
    std::env::var_os("GPUALLOC_PG_BIN")
        .map(|dir| PathBuf::from(dir).join("pgbench"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// Transactions per second of `pgbench -b simple-update` with 8 clients
/// for `duration`, on a fresh database of `admin`'s server (dropped after).
pub fn simple_update_tps(admin: &str, duration: Duration) -> anyhow::Result<f64> {
    let name = format!("gpualloc_bench_pgbench_{}", std::process::id());
    let url = create_database(admin, &name)?;
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(binary()).args(args).arg(&url).output()?;
        anyhow::ensure!(
            out.status.success(),
            "pgbench {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let result = (|| {
        run(&["-i", "-q", "-s", "1"])?;
        let seconds = duration.as_secs().max(1).to_string();
        let out = run(&[
            "-n",
            "-b",
            "simple-update",
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            &seconds,
        ])?;
        parse_tps(&out).ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output:\n{out}"))
    })();
    drop_database(admin, &name);
    result
}

/// The `tps = …` line of pgbench's report.
fn parse_tps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tps_line() {
        let out = "number of failed transactions: 0 (0.000%)\nlatency average = 1.2 ms\ninitial connection time = 5.1 ms\ntps = 6543.210987 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(6543.210987));
        assert_eq!(parse_tps("nothing"), None);
    }
}
