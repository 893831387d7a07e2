//! The results: medians per row, the table, the per-case lines and JSON.

use std::fmt::Write as _;

use uring_ssh_testkit::tools;

use crate::client::Figures;
use crate::opts::Opts;
use crate::run::Row;
use crate::{GIB, MIB, OURS};

/// Medians of one row.
pub struct Medians {
    pub mbps: f64,
    pub user_gib: f64,
    pub sys_gib: f64,
    pub rate: f64,
    pub other: String,
}

pub fn medians(r: &Row) -> Medians {
    let m = |f: &dyn Fn(&Figures) -> f64| tools::median(&r.runs.iter().map(f).collect::<Vec<_>>());
    let gib = |f: &Figures| f.get("bytes") / GIB;
    let mbps = m(&|f| {
        if f.get("bytes") > 0.0 {
            f.get("bytes") / f.get("secs") / 1e6
        } else {
            f64::NAN
        }
    });
    // CPU is the median of each run's user + sys, split as that run split
    // it: the kernel's user/sys accounting is sampled, so the split varies
    // from run to run far more than the sum, and the median user plus the
    // median sys is no run's figure.
    let (user_gib, sys_gib) = median_split(
        r.runs
            .iter()
            .filter(|f| gib(f) > 0.0)
            .map(|f| (f.get("user") / gib(f), f.get("sys") / gib(f)))
            .collect(),
    );
    let rate = m(&|f| f.get("count") / f.get("secs"));
    let mut other = Vec::new();
    let per_mib = |k: &str| m(&|f| f.get(k) / (f.get("bytes") / MIB as f64));
    let syscalls = per_mib("syscalls");
    if syscalls.is_finite() {
        other.push(format!("{syscalls:.1} syscalls/MiB"));
    }
    let enters = per_mib("ring_enters");
    if r.client.contains("poll backend") && m(&|f| f.get("ring_enters")) > 0.0 {
        other.push("io_uring ring used: this build has no poll backend".into());
    }
    if enters.is_finite() && mbps.is_finite() {
        other.push(format!(
            "ring: {enters:.1} enters, {:.1} SQEs /MiB",
            per_mib("ring_sqes")
        ));
    }
    match r.scenario {
        5 => other.push(format!(
            "{rate:.1} connects/s, {:.1} ms CPU each",
            m(&|f| (f.get("user") + f.get("sys")) / f.get("count")) * 1e3
        )),
        6 => other.push(format!(
            "{:.0} KiB RSS/session",
            m(&|f| f.get("rss_kib_per_session"))
        )),
        7 => other.push(format!(
            "p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, phases leaking {:.0}",
            m(&|f| f.get("p50_us")),
            m(&|f| f.get("p99_us")),
            m(&|f| f.get("max_us")),
            m(&|f| f.get("leaks"))
        )),
        8 => other.push(format!(
            "{rate:.0} files/s, CPU {:.2} s",
            m(&|f| f.get("user") + f.get("sys"))
        )),
        _ => {}
    }
    Medians {
        mbps,
        user_gib,
        sys_gib,
        rate,
        other: other.join("; "),
    }
}

/// The (user, sys) pair of the run with the median user + sys; with an
/// even count, the mean of the two middle runs' pairs. NaN for no runs.
fn median_split(mut runs: Vec<(f64, f64)>) -> (f64, f64) {
    runs.sort_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)));
    let n = runs.len();
    match n {
        0 => (f64::NAN, f64::NAN),
        _ if n % 2 == 1 => runs[n / 2],
        _ => {
            let (a, b) = (runs[n / 2 - 1], runs[n / 2]);
            ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0)
        }
    }
}

pub fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        String::new()
    }
}

/// The one table: medians, and ours ÷ row for MB/s (or the rate) and CPU.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| # | case | client | MB/s | client CPU s/GiB (user + sys) | other | ours ÷ row: MB/s or rate | ours ÷ row: CPU/GiB |\n\
         |---|---|---|---:|---:|---|---:|---:|\n",
    );
    let mut i = 0;
    while i < rows.len() {
        let j = rows[i..]
            .iter()
            .position(|r| r.case != rows[i].case)
            .map_or(rows.len(), |k| i + k);
        let group = &rows[i..j];
        let ours = group.iter().find(|r| r.client == OURS).map(medians);
        for r in group {
            let m = medians(r);
            let (speed, cpu) = match &ours {
                Some(o) if r.error.is_none() => {
                    let speed = if o.mbps.is_finite() {
                        o.mbps / m.mbps
                    } else {
                        o.rate / m.rate
                    };
                    (speed, (o.user_gib + o.sys_gib) / (m.user_gib + m.sys_gib))
                }
                _ => (f64::NAN, f64::NAN),
            };
            let cpu_cell = if m.user_gib.is_finite() {
                format!("{} + {}", num(m.user_gib, 2), num(m.sys_gib, 2))
            } else {
                String::new()
            };
            let cell = |s: &str| s.replace('|', "\\|");
            let other = match &r.error {
                Some(e) => format!("FAILED: {}", cell(e)),
                None => cell(&m.other),
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                cell(&r.case),
                cell(&r.client),
                num(m.mbps, 0),
                cpu_cell,
                other,
                num(speed, 2),
                num(cpu, 2)
            );
        }
        i = j;
    }
    t
}

pub fn print_case(rows: &[Row]) {
    for r in rows {
        let m = medians(r);
        let line = match &r.error {
            Some(e) => format!("FAILED {e}"),
            None if m.mbps.is_finite() => format!(
                "{} MB/s, {} + {} s/GiB {}",
                num(m.mbps, 0),
                num(m.user_gib, 2),
                num(m.sys_gib, 2),
                m.other
            ),
            None => m.other,
        };
        println!("[{}] {} / {}: {line}", r.scenario, r.case, r.client);
    }
}

pub fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

pub fn json(o: &Opts, notes: &[String], rows: &[Row]) -> String {
    let mut s = format!(
        "{{\"mode\":{},\"runs\":{},\"libssh2\":{},\"notes\":[{}],\"rows\":[\n",
        json_str(if o.smoke { "smoke" } else { "full" }),
        o.runs,
        json_str(&uring_ssh::libssh2_version()),
        notes
            .iter()
            .map(|n| json_str(n))
            .collect::<Vec<_>>()
            .join(",")
    );
    let body: Vec<String> = rows
        .iter()
        .map(|r| {
            let m = medians(r);
            format!(
                "{{\"scenario\":{},\"case\":{},\"client\":{},\"mbps\":{},\"user_s_per_gib\":{},\"sys_s_per_gib\":{},\"rate_per_s\":{},\"other\":{},\"error\":{},\"runs\":[{}]}}",
                r.scenario,
                json_str(&r.case),
                json_str(&r.client),
                json_num(m.mbps),
                json_num(m.user_gib),
                json_num(m.sys_gib),
                json_num(m.rate),
                json_str(&m.other),
                r.error.as_deref().map_or("null".into(), json_str),
                r.runs.iter().map(Figures::to_json).collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    s.push_str(&body.join(",\n"));
    s.push_str("\n]}\n");
    s
}
