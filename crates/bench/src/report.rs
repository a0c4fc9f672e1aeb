//! The run's report: `bench.json` (everything, for comparing runs),
//! `bench.md` (the tables docs/benchmarks.md quotes) and `bench.svg`
//! (latency percentiles and throughputs per scenario, and cost curves).

use std::{fmt::Write as _, path::PathBuf};

use serde_json::{Value, json};

use crate::{
    RunArgs,
    scenarios::{Curve, ScenarioResult},
};

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu,
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

fn percentiles(h: &hdrhistogram::Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(0.5),
        "p90_ms": ms(0.9),
        "p99_ms": ms(0.99),
        "max_ms": h.max() as f64 / 1000.0,
    })
}

pub fn to_json(args: &RunArgs, results: &[ScenarioResult]) -> Value {
    let scenarios: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "values": r.values.iter().map(|(n, v, u)| json!({"name": n, "value": v, "unit": u})).collect::<Vec<_>>(),
                "latencies": r.latencies.iter().map(|(l, h)| json!({"label": l, "distribution": percentiles(h)})).collect::<Vec<_>>(),
                "services": r.usage.iter().map(|(s, u)| json!({
                    "service": s,
                    "peak_rss_mib": (u.peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
                    "cpu_seconds": u.cpu_seconds,
                })).collect::<Vec<_>>(),
                "targets": r.targets.iter().map(|t| json!({
                    "what": t.what, "value": t.value, "goal": t.goal, "met": t.met(),
                })).collect::<Vec<_>>(),
                "checks": r.checks,
                "curves": r.curves.iter().map(|c| json!({
                    "title": c.title,
                    "x": c.x_label,
                    "xs": c.xs,
                    "series": c.series.iter().map(|(l, ys)| json!({"label": l, "ms": ys})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "time_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "machine": machine(),
        "smoke": args.smoke,
        "seconds_per_measurement": args.duration().as_secs_f64(),
        "runs": args.runs(),
        "scenarios": scenarios,
    })
}

pub fn to_markdown(results: &[ScenarioResult]) -> String {
    let m = machine();
    let mut out = format!(
        "Machine: {} CPUs ({}), {} GiB, Linux {}, {} build.\n\n",
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        m["profile"].as_str().unwrap_or("")
    );
    out.push_str("| scenario | target | measured | goal | met |\n|---|---|---:|---:|---|\n");
    for r in results {
        for t in &r.targets {
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {} {} | {} |",
                r.name,
                t.what,
                t.value,
                if t.at_least { "≥" } else { "≤" },
                t.goal,
                if t.met() { "yes" } else { "**no**" }
            );
        }
    }
    side_by_side(&mut out, results);
    for r in results {
        let _ = writeln!(out, "\n### {}\n\n| value | |\n|---|---:|", r.name);
        for (n, v, u) in &r.values {
            let _ = writeln!(out, "| {n} | {v:.2} {u} |");
        }
        if !r.latencies.is_empty() {
            out.push_str("\n| latency | n | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n");
            for (l, h) in &r.latencies {
                let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
                let _ = writeln!(
                    out,
                    "| {l} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    h.len(),
                    q(0.5),
                    q(0.9),
                    q(0.99),
                    h.max() as f64 / 1000.0
                );
            }
        }
        for c in &r.curves {
            let _ = write!(out, "\n{}:\n\n| {} |", c.title, c.x_label);
            for (l, _) in &c.series {
                let _ = write!(out, " {l} ms |");
            }
            let _ = write!(out, "\n|---:|{}\n", "---:|".repeat(c.series.len()));
            for (i, x) in c.xs.iter().enumerate() {
                let _ = write!(out, "| {x} |");
                for (_, ys) in &c.series {
                    let _ = write!(out, " {:.2} |", ys.get(i).copied().unwrap_or(f64::NAN));
                }
                out.push('\n');
            }
        }
        if !r.usage.is_empty() {
            out.push_str("\n| service | peak RSS MiB | CPU s |\n|---|---:|---:|\n");
            for (s, u) in &r.usage {
                let _ = writeln!(
                    out,
                    "| {s} | {:.1} | {:.1} |",
                    u.peak_rss_kib as f64 / 1024.0,
                    u.cpu_seconds
                );
            }
        }
        for c in &r.checks {
            let _ = writeln!(out, "\nCheck: {c}.");
        }
    }
    out
}

/// Every value measured on both backends, one row each: the PostgreSQL
/// pass's scenarios are named "<scenario> (PostgreSQL)".
fn side_by_side(out: &mut String, results: &[ScenarioResult]) {
    let mut rows = String::new();
    for pg in results {
        let Some(name) = pg.name.strip_suffix(" (PostgreSQL)") else {
            continue;
        };
        let Some(sqlite) = results.iter().find(|r| r.name == name) else {
            continue;
        };
        for (value, v, unit) in &pg.values {
            let on_sqlite = sqlite.values.iter().find(|(n, _, _)| n == value);
            let shown = on_sqlite.map_or("—".to_owned(), |(_, s, _)| format!("{s:.2}"));
            let _ = writeln!(rows, "| {name} | {value} ({unit}) | {shown} | {v:.2} |");
        }
    }
    if !rows.is_empty() {
        out.push_str("\n### SQLite and PostgreSQL side by side\n\n");
        out.push_str("| scenario | value | SQLite | PostgreSQL |\n|---|---|---:|---:|\n");
        out.push_str(&rows);
    }
}

/// Latency percentiles per distribution (log scale) and throughputs.
pub fn to_svg(results: &[ScenarioResult]) -> String {
    let rows: Vec<(String, [f64; 4])> = results
        .iter()
        .flat_map(|r| {
            r.latencies.iter().map(move |(l, h)| {
                let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
                (
                    format!("{}: {l}", r.name),
                    [q(0.5), q(0.9), q(0.99), h.max() as f64 / 1000.0],
                )
            })
        })
        .collect();
    let rates: Vec<(String, f64)> = results
        .iter()
        .flat_map(|r| {
            r.values
                .iter()
                .filter(|(_, _, u)| *u == "/s")
                .map(move |(n, v, _)| (format!("{}: {n}", r.name), *v))
        })
        .collect();
    let curves: Vec<&Curve> = results.iter().flat_map(|r| &r.curves).collect();
    let (w, label_w, row_h) = (960.0, 330.0, 22.0);
    let plot_w = w - label_w - 40.0;
    let lat_h = 60.0 + rows.len() as f64 * row_h;
    let rates_end = lat_h + 80.0 + rates.len() as f64 * row_h;
    let h = rates_end + curves.len() as f64 * CURVE_H;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="15" font-weight="bold">Latency (ms, log scale): p50 ● p90 ◆ p99 ▲ max ✕</text>
"#
    );
    let (lo, hi) = (0.05f64.ln(), 10_000f64.ln());
    let x = |ms: f64| label_w + (ms.max(0.05).ln() - lo) / (hi - lo) * plot_w;
    for tick in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        let tx = x(tick);
        let _ = writeln!(
            s,
            r##"<line x1="{tx:.1}" y1="30" x2="{tx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{tick}</text>"##,
            lat_h - 10.0,
            lat_h + 4.0
        );
    }
    for (i, (label, q)) in rows.iter().enumerate() {
        let y = 45.0 + i as f64 * row_h;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#4a78b5" stroke-width="2"/>"##,
            label_w - 8.0,
            y + 4.0,
            escape(label),
            x(q[0]),
            x(q[3])
        );
        for (k, v) in q.iter().enumerate() {
            let colour = ["#1b5e20", "#4a78b5", "#e65100", "#b71c1c"][k];
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{y:.1}" r="{}" fill="{colour}"/>"#,
                x(*v),
                [5, 4, 4, 3][k]
            );
        }
    }
    let max_rate = rates.iter().map(|(_, v)| *v).fold(1.0, f64::max);
    let _ = writeln!(
        s,
        r#"<text x="10" y="{:.1}" font-size="15" font-weight="bold">Throughput (per second)</text>"#,
        lat_h + 40.0
    );
    for (i, (label, v)) in rates.iter().enumerate() {
        let y = lat_h + 55.0 + i as f64 * row_h;
        let bw = v / max_rate * plot_w;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{label_w}" y="{:.1}" width="{bw:.1}" height="14" fill="#4a78b5"/><text x="{:.1}" y="{:.1}">{v:.0}</text>"##,
            label_w - 8.0,
            y + 11.0,
            escape(label),
            y,
            label_w + bw + 6.0,
            y + 11.0
        );
    }
    for (i, c) in curves.iter().enumerate() {
        curve_svg(&mut s, c, rates_end + i as f64 * CURVE_H, w);
    }
    s.push_str("</svg>\n");
    s
}

/// Height of one curve chart in the SVG.
const CURVE_H: f64 = 300.0;

/// A line chart of `c` at `top`: x on a log scale (the points are decades
/// apart), latency linear from 0 so growth reads as height.
fn curve_svg(s: &mut String, c: &Curve, top: f64, w: f64) {
    let (left, right) = (80.0, w - 220.0);
    let (y0, y1) = (top + 40.0, top + CURVE_H - 50.0);
    let _ = writeln!(
        s,
        r#"<text x="10" y="{:.1}" font-size="15" font-weight="bold">{} (ms)</text>"#,
        top + 20.0,
        escape(&c.title)
    );
    let lo = c.xs.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = c.xs.iter().copied().fold(1.0, f64::max);
    let span = (hi.ln() - lo.ln()).max(1e-9);
    let x = |v: f64| left + (v.max(1.0).ln() - lo.ln()) / span * (right - left);
    let y_max = c
        .series
        .iter()
        .flat_map(|(_, ys)| ys.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(0.1)
        * 1.1;
    let y = |v: f64| y1 - v / y_max * (y1 - y0);
    for k in 0..=4 {
        let v = y_max * k as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{:.1}" x2="{right}" y2="{:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.1}</text>"##,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
    }
    for v in &c.xs {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{v}</text>"#,
            x(*v),
            y1 + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        y1 + 34.0,
        escape(c.x_label)
    );
    let colours = [
        "#1b5e20", "#4a78b5", "#e65100", "#b71c1c", "#6a1b9a", "#00838f",
    ];
    for (k, (label, ys)) in c.series.iter().enumerate() {
        let colour = colours[k % colours.len()];
        let dash = if label.ends_with("p99") {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let points: Vec<(f64, f64)> =
            c.xs.iter()
                .zip(ys)
                .filter(|(_, v)| v.is_finite())
                .map(|(a, b)| (x(*a), y(*b)))
                .collect();
        let line: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
            line.join(" ")
        );
        for (px, py) in &points {
            let _ = writeln!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{colour}"/>"#
            );
        }
        let ly = y0 + k as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            right + 15.0,
            right + 40.0,
            right + 46.0,
            ly + 4.0,
            escape(label)
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes the three files under `args.out`; returns their paths.
pub fn write(args: &RunArgs, results: &[ScenarioResult]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)?;
    let stem = if args.smoke { "smoke" } else { "latest" };
    let json = args.out.join(format!("{stem}.json"));
    let md = args.out.join(format!("{stem}.md"));
    let svg = args.out.join(format!("{stem}.svg"));
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&to_json(args, results))?,
    )?;
    std::fs::write(&md, to_markdown(results))?;
    std::fs::write(&svg, to_svg(results))?;
    Ok(vec![json, md, svg])
}
