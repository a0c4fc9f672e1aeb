//! A short run of every scenario: the harness starts the mesh, drives each
//! scenario, and writes a JSON, a markdown table and an SVG. This checks
//! that the harness works, not how fast anything is (`cargo xtask bench`
//! does that, in release).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;

#[test]
fn every_scenario_runs_and_is_reported() {
    let out = tempfile::tempdir().unwrap();
    // With a PostgreSQL server to use (`cargo xtask test` provides one),
    // every scenario runs on it as well.
    let postgres = std::env::var("GPUALLOC_TEST_DATABASE_URL").ok();
    let mut bench = Command::new(env!("CARGO_BIN_EXE_gpualloc-bench"));
    bench.args(["run", "--smoke", "--out"]).arg(out.path());
    if let Some(url) = &postgres {
        bench.args(["--database", url]);
    }
    let status = bench.status().unwrap();
    assert!(status.success(), "the smoke run failed: {status:?}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("smoke.json")).unwrap())
            .unwrap();
    let scenarios = json["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let sqlite = ["quota-check", "create", "saga", "churn", "scale", "fanout"];
    assert_eq!(names[..sqlite.len()], sqlite);
    if postgres.is_some() {
        let on_postgres: Vec<String> = sqlite.iter().map(|n| format!("{n} (PostgreSQL)")).collect();
        assert_eq!(names[sqlite.len()..], on_postgres);
        // Each read against pgbench on the same server, in the same run.
        for s in &scenarios[sqlite.len()..] {
            let tps = s["values"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "pgbench_simple_update_tps")
                .unwrap();
            assert!(tps["value"].as_f64().unwrap() > 0.0, "{s}");
        }
    } else {
        assert_eq!(names.len(), sqlite.len());
    }
    for s in scenarios {
        let name = s["name"].as_str().unwrap();
        // Something was measured, with each service's memory and CPU.
        assert!(
            s["values"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["value"].as_f64().is_some_and(f64::is_finite)),
            "{name}: {s}"
        );
        assert!(!s["latencies"].as_array().unwrap().is_empty(), "{name}");
        for l in s["latencies"].as_array().unwrap() {
            assert!(
                l["distribution"]["count"].as_u64().unwrap() > 0,
                "{name}: {l}"
            );
        }
        let services = s["services"].as_array().unwrap();
        assert_eq!(services.len(), 3, "{name}");
        assert!(
            services
                .iter()
                .all(|u| u["peak_rss_mib"].as_f64().unwrap() > 1.0),
            "{name}"
        );
    }
    // The saga ran to ALLOCATED in the viewer for every request, and churn
    // gave every GPU back.
    let saga = &scenarios[2];
    let lost = saga["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "lost_at_half")
        .unwrap();
    assert_eq!(lost["value"], 0.0);
    assert!(
        scenarios[3]["checks"][0]
            .as_str()
            .unwrap()
            .contains("0 used, 0 held")
    );
    // The create scenario measured its floor: the same RPC on the same
    // stack committing the same rows, nothing else.
    let floor = scenarios[1]["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "floor_rps")
        .unwrap();
    assert!(floor["value"].as_f64().unwrap() > 0.0, "{floor}");
    // The scale scenario's cost curves: by stored history and by pool
    // count, p50 and p99 of both calls measured at every point.
    let curves = scenarios[4]["curves"].as_array().unwrap();
    let xs: Vec<&serde_json::Value> = curves.iter().map(|c| &c["xs"]).collect();
    assert_eq!(
        xs,
        [
            &serde_json::json!([1000.0, 10000.0]),
            &serde_json::json!([10.0, 100.0])
        ]
    );
    for c in curves {
        let series = c["series"].as_array().unwrap();
        assert_eq!(series.len(), 4, "{c}");
        for s in series {
            let ms = s["ms"].as_array().unwrap();
            assert_eq!(ms.len(), 2, "{c}");
            assert!(ms.iter().all(|v| v.as_f64().unwrap() > 0.0), "{c}");
        }
    }
    let md = std::fs::read_to_string(out.path().join("smoke.md")).unwrap();
    assert!(md.contains("Cost by pools"), "{md}");
    assert!(
        md.contains("| scenario | target | measured | goal | met |"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.path().join("smoke.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("Cost by stored allocations"), "{svg}");
}
