//! How results are printed: aligned tables for people (short ids,
//! relative times, bars, colour only on a terminal and never with
//! `NO_COLOR`), or the API messages themselves as JSON or YAML — the
//! canonical proto3 JSON mapping, the same grpcurl prints — for scripts.

use std::{
    io::{IsTerminal, Write},
    sync::OnceLock,
};

use gpualloc_proto::allocation::v1 as apb;
use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::{Global, exit::Failure};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Wide,
    Json,
    Yaml,
    Csv,
}

/// Where output goes and in which form.
#[derive(Debug, Clone)]
pub struct Printer {
    pub format: Format,
    pub headers: bool,
    pub colour: bool,
    pub tty: bool,
}

impl Printer {
    pub fn new(global: &Global) -> Printer {
        let tty = std::io::stdout().is_terminal();
        Printer {
            format: global.output,
            headers: !global.no_headers,
            colour: tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            tty,
        }
    }

    pub fn wide(&self) -> bool {
        self.format == Format::Wide
    }

    /// Whether the API messages are printed as they are.
    pub fn raw(&self) -> bool {
        matches!(self.format, Format::Json | Format::Yaml)
    }

    /// Prints `message` as JSON or YAML.
    pub fn message<M: Named>(&self, message: &M) -> Result<(), Failure> {
        let dynamic = dynamic(message)?;
        let text = match self.format {
            Format::Yaml => {
                serde_yaml::to_string(&dynamic).map_err(|e| Failure::other(e.to_string()))?
            }
            _ => {
                let mut s = serde_json::to_string_pretty(&dynamic)
                    .map_err(|e| Failure::other(e.to_string()))?;
                s.push('\n');
                s
            }
        };
        out(&text);
        Ok(())
    }

    /// Prints a table: `columns` are the header, `rows` the cells.
    pub fn table(&self, columns: &[&str], rows: &[Vec<String>]) {
        out(&table(columns, rows, self.headers));
    }

    /// A state name, coloured on a terminal.
    pub fn state(&self, state: i32) -> String {
        let name = state_name(state);
        if !self.colour {
            return name.to_owned();
        }
        let colour = match apb::State::try_from(state) {
            Ok(apb::State::Allocated) => "32",
            Ok(apb::State::Pending | apb::State::Held | apb::State::AwaitingApproval) => "33",
            Ok(apb::State::Rejected | apb::State::Expired) => "31",
            _ => "2",
        };
        format!("\x1b[{colour}m{name}\x1b[0m")
    }
}

/// Writes to stdout; a closed pipe (`| head`) ends quietly.
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(text.as_bytes()).is_err() || stdout.flush().is_err() {
        std::process::exit(0);
    }
}

/// A message of the API and its full protobuf name (the generated types
/// do not carry it), for reflection.
pub trait Named: prost::Message {
    const NAME: &'static str;
}

macro_rules! named {
    ($($t:ty => $n:literal),* $(,)?) => {
        $(impl Named for $t { const NAME: &'static str = $n; })*
    };
}

named!(
    apb::Allocation => "gpualloc.allocation.v1.Allocation",
    gpualloc_proto::resourcepool::v1::Pool => "gpualloc.resourcepool.v1.Pool",
    gpualloc_proto::resourcepool::v1::ListPoolsResponse => "gpualloc.resourcepool.v1.ListPoolsResponse",
    gpualloc_proto::resourcepool::v1::DeletePoolResponse => "gpualloc.resourcepool.v1.DeletePoolResponse",
    gpualloc_proto::resourcepool::v1::TenantQuota => "gpualloc.resourcepool.v1.TenantQuota",
    gpualloc_proto::resourcepool::v1::ListHeldResponse => "gpualloc.resourcepool.v1.ListHeldResponse",
    gpualloc_proto::viewer::v1::ListAllocationViewsResponse => "gpualloc.viewer.v1.ListAllocationViewsResponse",
    gpualloc_proto::viewer::v1::ListAllocationHistoryResponse => "gpualloc.viewer.v1.ListAllocationHistoryResponse",
    gpualloc_proto::viewer::v1::UsageReport => "gpualloc.viewer.v1.UsageReport",
    gpualloc_proto::viewer::v1::TenantSummary => "gpualloc.viewer.v1.TenantSummary",
    gpualloc_proto::viewer::v1::WatchAllocationsResponse => "gpualloc.viewer.v1.WatchAllocationsResponse",
);

fn descriptors() -> Result<&'static DescriptorPool, Failure> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(gpualloc_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Failure::other(format!("descriptors: {e}")))
}

/// `message` as a reflected message (for its canonical JSON).
pub fn dynamic<M: Named>(message: &M) -> Result<DynamicMessage, Failure> {
    let desc = descriptors()?
        .get_message_by_name(M::NAME)
        .ok_or_else(|| Failure::other(format!("no descriptor for {}", M::NAME)))?;
    DynamicMessage::decode(desc, message.encode_to_vec().as_slice())
        .map_err(|e| Failure::other(e.to_string()))
}

/// The canonical JSON of `message`, as a value (for tests and templates).
pub fn json<M: Named>(message: &M) -> Result<serde_json::Value, Failure> {
    serde_json::to_value(dynamic(message)?).map_err(|e| Failure::other(e.to_string()))
}

/// Columns padded to their widest cell; the last column is not padded.
pub fn table(columns: &[&str], rows: &[Vec<String>], headers: bool) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(visible_len(c));
            }
        }
    }
    let mut s = String::new();
    let mut line = |cells: Vec<&str>| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(c);
            if i + 1 < n {
                let pad = widths[i].saturating_sub(visible_len(c)) + 3;
                s.push_str(&" ".repeat(pad));
            }
        }
        s.push('\n');
    };
    if headers {
        line(columns.to_vec());
    }
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    s
}

/// Length on screen: escape sequences take no room.
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut escape = false;
    for c in s.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, 'm') => escape = false,
            (true, _) => {}
            _ => n += 1,
        }
    }
    n
}

pub fn state_name(state: i32) -> &'static str {
    apb::State::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("STATE_"))
        .unwrap_or("?")
}

/// `01a22a40…bd3c`: the first and last characters of an id. The CLI
/// accepts this form, or any unambiguous prefix, wherever it takes an id.
pub fn short_id(id: &str) -> String {
    if id.len() <= 12 {
        return id.to_owned();
    }
    format!("{}…{}", &id[..8], &id[id.len() - 4..])
}

/// "3m ago", "in 2h" from a timestamp.
pub fn relative(ts: Option<&prost_types::Timestamp>, now: i64) -> String {
    let Some(ts) = ts else {
        return "-".into();
    };
    let secs = ts.seconds - now;
    let (n, unit) = {
        let a = secs.abs();
        if a < 60 {
            (a, "s")
        } else if a < 3600 {
            (a / 60, "m")
        } else if a < 86_400 {
            (a / 3600, "h")
        } else {
            (a / 86_400, "d")
        }
    };
    if secs <= 0 {
        format!("{n}{unit} ago")
    } else {
        format!("in {n}{unit}")
    }
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A bar of `width` cells, `used` of `total` filled: `[####------]`.
pub fn bar(used: i64, total: i64, width: usize) -> String {
    let filled = if total <= 0 {
        0
    } else {
        ((used.max(0) as f64 / total as f64) * width as f64).round() as usize
    };
    let filled = filled.min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// What a bundle of resources asks for, in few words: `2×A100 8cpu 64Gi`.
pub fn resources(r: Option<&gpualloc_proto::resourcepool::v1::Resources>) -> String {
    let Some(r) = r else {
        return "-".into();
    };
    let mut parts = Vec::new();
    if r.gpus > 0 {
        let model = if r.gpu_model.is_empty() {
            "GPU"
        } else {
            &r.gpu_model
        };
        parts.push(format!("{}×{model}", r.gpus));
    }
    if r.cpu_millis > 0 {
        parts.push(crate::input::format_cpu(r.cpu_millis));
    }
    if r.memory_mib > 0 {
        parts.push(crate::input::format_mib(r.memory_mib));
    }
    if r.storage_gib > 0 {
        parts.push(format!("{}Gi disk", r.storage_gib));
    }
    let mut custom: Vec<_> = r.custom.iter().collect();
    custom.sort();
    for (k, v) in custom {
        parts.push(format!("{k}={v}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_ignore_colour_codes() {
        let t = table(
            &["ID", "STATE"],
            &[
                vec!["a".into(), "\x1b[32mALLOCATED\x1b[0m".into()],
                vec!["bbbb".into(), "HELD".into()],
            ],
            true,
        );
        assert_eq!(
            t,
            "ID     STATE\na      \x1b[32mALLOCATED\x1b[0m\nbbbb   HELD\n"
        );
    }

    #[test]
    fn short_ids_relative_times_and_bars() {
        assert_eq!(
            short_id("01a22a40-3767-72dc-b4ac-6aa91db20f05"),
            "01a22a40…0f05"
        );
        let ts = |s| prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        };
        assert_eq!(relative(Some(&ts(1000)), 1180), "3m ago");
        assert_eq!(relative(Some(&ts(1000 + 7200)), 1000), "in 2h");
        assert_eq!(relative(None, 0), "-");
        assert_eq!(bar(3, 4, 8), "[######--]");
        assert_eq!(bar(0, 0, 4), "[----]");
    }
}
