//! `gpualloc-bench`: measures what gpualloc exists for, each number next to
//! a baseline measured in the same run (timings on a shared machine are
//! noisy; ratios are what compare across runs). It starts the mesh as real
//! processes (see [`mesh`]) and runs named scenarios (see [`scenarios`]);
//! each writes latency histograms, throughputs and the services' peak
//! memory and CPU time. Results go to a JSON file, a markdown table and an
//! SVG plot ([`report`]).

use std::{path::PathBuf, time::Duration};

pub mod floor;
pub mod load;
pub mod mesh;
pub mod pgbench;
pub mod report;
pub mod scenarios;

#[derive(clap::Parser, Debug)]
#[command(name = "gpualloc-bench", about = "gpualloc benchmark harness")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Run scenarios and write the report.
    Run(RunArgs),
    /// Run one service in this process (used by the harness itself).
    #[command(hide = true)]
    Node {
        service: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// A short run of every scenario that checks the harness, not the speed.
    #[arg(long)]
    pub smoke: bool,
    /// Scenarios to run (default: all): quota-check, create, saga, churn, scale, fanout.
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the JSON, markdown and SVG go.
    #[arg(long, default_value = "docs/benchmarks")]
    pub out: PathBuf,
    /// Stored allocations at the far end of `scale`'s history curve (it
    /// measures 10³, 10⁴, … up to this).
    #[arg(long, default_value_t = 1_000_000)]
    pub scale_large: u64,
    /// Run the saga's open-loop phases at half of this rate instead of half
    /// of its measured maximum (the closed loop is skipped): comparing two
    /// builds at the same offered load, where their maxima differ by noise.
    #[arg(long)]
    pub saga_rate: Option<f64>,
    /// Run every scenario a second time with the services on this
    /// PostgreSQL server (an URL that may create databases; each mesh gets
    /// fresh ones), next to pgbench's simple-update TPS on the same server.
    #[arg(long)]
    pub database: Option<String>,
}

impl RunArgs {
    pub fn duration(&self) -> Duration {
        if self.smoke {
            Duration::from_millis(700)
        } else {
            Duration::from_secs_f64(self.seconds.max(0.5))
        }
    }

    pub fn runs(&self) -> usize {
        if self.smoke { 1 } else { self.runs.max(1) }
    }

    pub fn wants(&self, name: &str) -> bool {
        self.scenarios.is_empty() || self.scenarios.iter().any(|s| s == name)
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    mesh::use_postgres(None);
    for (name, f) in scenarios::ALL {
        if !args.wants(name) {
            continue;
        }
        eprintln!("bench: {name}");
        let r = f(exe.clone(), args.clone()).await?;
        eprintln!("bench: {name}: {}", r.summary());
        results.push(r);
    }
    if let Some(admin) = &args.database {
        // The same scenarios with every service on PostgreSQL, and what the
        // server itself does at its simplest on this machine right now.
        let tps = pgbench::simple_update_tps(admin, args.duration())?;
        eprintln!("bench: pgbench simple-update: {tps:.0} tps");
        mesh::use_postgres(Some(admin.clone()));
        for (name, f) in scenarios::ALL {
            if !args.wants(name) {
                continue;
            }
            eprintln!("bench: {name} on PostgreSQL");
            let mut r = f(exe.clone(), args.clone()).await?;
            r.name = Box::leak(format!("{name} (PostgreSQL)").into_boxed_str());
            for c in &mut r.curves {
                c.title.push_str(" on PostgreSQL");
            }
            r.values
                .push(("pgbench_simple_update_tps".into(), tps, "/s"));
            eprintln!("bench: {}: {}", r.name, r.summary());
            results.push(r);
        }
        mesh::use_postgres(None);
    }
    let written = report::write(&args, &results)?;
    for path in written {
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}
