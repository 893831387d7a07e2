//! What the operator sees: streamed output, the progress bar (a terminal)
//! or plain per-host lines (otherwise), JSON records, gathered output and
//! the final summary. All of it is printed by the main thread: hosts on
//! pool threads report through a [`HostUi`].

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;
use ussh::hosts::fold;

use crate::engine::{Captured, Outcome, Status};

/// Output and progress of one run.
pub struct Ui {
    bar: Option<ProgressBar>,
    plain: bool,
    json: bool,
    transfer: bool,
    total: usize,
    start: Instant,
    /// Bytes moved, credited by the hosts' threads.
    bytes: Arc<AtomicU64>,
    done: Cell<usize>,
    ok: Cell<usize>,
    failed: Cell<usize>,
    running: Cell<usize>,
    last_rate: RefCell<(Instant, u64, f64)>,
    /// Bytes the whole run will move, when known up front (`put`).
    total_bytes: Cell<Option<u64>>,
    /// Threads the hosts run on.
    threads: Cell<usize>,
}

/// Complete lines of one host's output, each prefixed with `host: `.
#[derive(Debug)]
pub struct HostLines {
    /// The lines, newlines included.
    pub text: Vec<u8>,
    /// Whether they go to stderr.
    pub stderr: bool,
}

/// The [`Ui`] as a host's task sees it, on whichever thread it runs: its
/// lines go to the main thread to be printed, whole, and the bytes it
/// moves to a shared counter.
#[derive(Debug, Clone)]
pub struct HostUi {
    label: String,
    json: bool,
    lines: mpsc::Sender<HostLines>,
    bytes: Arc<AtomicU64>,
}

impl HostUi {
    /// Whether records go out as JSON.
    pub fn json(&self) -> bool {
        self.json
    }

    /// The counter of bytes moved.
    pub fn bytes(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    /// Sends complete lines of the host's output, prefixed, to be printed.
    /// The queue is bounded: a host printing faster than the output is
    /// read waits here, holding no more than a few pieces.
    pub async fn host_lines(&self, data: &[u8], stderr: bool) {
        let mut text = Vec::with_capacity(data.len() + 16);
        for line in data.split_inclusive(|&b| b == b'\n') {
            text.extend_from_slice(self.label.as_bytes());
            text.extend_from_slice(b": ");
            text.extend_from_slice(line);
        }
        // The receiver is gone only once the run is over.
        let _ = self.lines.send(HostLines { text, stderr }).await;
    }
}

/// `1.5 MiB` style.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Ui {
    /// A bar on a terminal unless `quiet`; plain lines otherwise unless
    /// `quiet`. With `json`, neither unless `progress`: standard error is
    /// then left to failures and the summary.
    pub fn new(total: usize, transfer: bool, quiet: bool, json: bool, progress: bool) -> Ui {
        let tty = std::io::stderr().is_terminal();
        let quiet = quiet || (json && !progress);
        let bar = (tty && !quiet).then(|| {
            let b = ProgressBar::with_draw_target(
                Some(total as u64),
                ProgressDrawTarget::stderr_with_hz(8),
            );
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {elapsed_precise} [{bar:28}] {pos}/{len} hosts {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Ui {
            bar,
            plain: !tty && !quiet,
            json,
            transfer,
            total,
            start: Instant::now(),
            bytes: Arc::new(AtomicU64::new(0)),
            done: Cell::new(0),
            ok: Cell::new(0),
            failed: Cell::new(0),
            running: Cell::new(0),
            last_rate: RefCell::new((Instant::now(), 0, 0.0)),
            total_bytes: Cell::new(None),
            threads: Cell::new(1),
        }
    }

    /// Whether records go out as JSON.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Runs `f` with the bar hidden.
    fn out(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// What the task of host `label` reports through: its lines go to
    /// `lines`, whose receiver hands them to [`Ui::print_lines`].
    pub fn host_ui(&self, label: &str, lines: &mpsc::Sender<HostLines>) -> HostUi {
        HostUi {
            label: label.to_string(),
            json: self.json,
            lines: lines.clone(),
            bytes: self.bytes.clone(),
        }
    }

    /// Prints lines a host sent, whole.
    pub fn print_lines(&self, l: &HostLines) {
        self.out(|| {
            let _ = if l.stderr {
                std::io::stderr().lock().write_all(&l.text)
            } else {
                std::io::stdout().lock().write_all(&l.text)
            };
        });
    }

    /// A message on stderr that stays above the bar.
    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Sets the number of threads the hosts run on: with more than one,
    /// each JSON record says which ran its host.
    pub fn set_threads(&self, n: usize) {
        self.threads.set(n);
    }

    /// Sets the bytes the run will move at most (for the ETA).
    pub fn set_total_bytes(&self, n: u64) {
        self.total_bytes.set(Some(n));
    }

    /// A host started.
    pub fn started(&self) {
        self.running.set(self.running.get() + 1);
    }

    /// A host finished: counts, plain line or JSON record (the collected
    /// output moves into the record, and is let go once it is written).
    pub fn finished(&self, o: &mut Outcome) {
        self.running.set(self.running.get().saturating_sub(1));
        self.done.set(self.done.get() + 1);
        if o.status == Status::Ok {
            self.ok.set(self.ok.get() + 1);
        } else {
            self.failed.set(self.failed.get() + 1);
        }
        if self.json {
            let mut record = json_record(o);
            if self.threads.get() > 1 {
                record["thread"] = o.thread.into();
            }
            self.out(|| {
                // Written as it is serialised: a record may hold megabytes.
                let mut w = std::io::stdout().lock();
                let _ = serde_json::to_writer(&mut w, &record);
                let _ = w.write_all(b"\n");
                let _ = w.flush();
            });
        }
        let line = format!(
            "ussh: [{}/{}] {}: {}",
            self.done.get(),
            self.total,
            o.label,
            self.describe(o)
        );
        if self.plain || (o.status != Status::Ok && !self.json) {
            self.note(&line);
        }
        if let Some(b) = &self.bar {
            b.set_position(self.done.get() as u64);
        }
        self.refresh();
    }

    fn describe(&self, o: &Outcome) -> String {
        let mut s = o.status.word().to_string();
        if let Some(c) = o.exit_code
            && o.signal.is_none()
        {
            s.push_str(&format!(" (exit {c})"));
        }
        if self.transfer {
            s.push_str(&format!(" {} files {}", o.files, human_bytes(o.bytes)));
            if o.skipped > 0 {
                s.push_str(&format!(", {} unchanged", o.skipped));
            }
            if o.links_skipped > 0 {
                s.push_str(&format!(", {} links skipped", o.links_skipped));
            }
        }
        s.push_str(&format!(" in {:.2} s", o.duration.as_secs_f64()));
        if let Some(e) = &o.error {
            s.push_str(&format!(": {e}"));
        }
        s
    }

    /// Redraws the bar's message: hosts by state, bytes, rate.
    pub fn refresh(&self) {
        let Some(b) = &self.bar else { return };
        let mut msg = format!(
            "· ok {} · failed {} · running {}",
            self.ok.get(),
            self.failed.get(),
            self.running.get()
        );
        if self.transfer {
            let now = Instant::now();
            let bytes = self.bytes.load(Ordering::Relaxed);
            let mut r = self.last_rate.borrow_mut();
            let dt = now.duration_since(r.0).as_secs_f64();
            if dt >= 0.5 {
                let inst = (bytes - r.1) as f64 / dt;
                r.2 = if r.2 == 0.0 {
                    inst
                } else {
                    0.5 * r.2 + 0.5 * inst
                };
                *r = (now, bytes, r.2);
            }
            msg.push_str(&format!(
                " · {} · {}/s",
                human_bytes(bytes),
                human_bytes(r.2 as u64)
            ));
            if let Some(total) = self.total_bytes.get()
                && r.2 > 0.0
                && total > bytes
            {
                let eta = (total - bytes) as f64 / r.2;
                msg.push_str(&format!(" · ETA {eta:.0} s"));
            }
        }
        let done = self.done.get();
        if self.total_bytes.get().is_none() && done > 0 && done < self.total {
            // Linear in hosts finished: a rough guide while hosts run
            // side by side.
            let eta = self.start.elapsed().as_secs_f64() * (self.total - done) as f64 / done as f64;
            msg.push_str(&format!(" · ETA {eta:.0} s"));
        }
        b.set_message(msg);
        b.tick();
    }

    /// Removes the bar.
    pub fn clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Time since the run began.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Standard base64 (RFC 4648, padded).
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ABC[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Sets `name` to the bytes as a JSON string when they are UTF-8 (without a
/// copy), else to null with `name_b64` holding them in base64: a tool must
/// never get replacement characters in place of the bytes sent. A cap that
/// cut a character in two drops its first bytes too (counted as dropped)
/// rather than turning the whole stream into base64.
fn put_text(v: &mut serde_json::Value, name: &str, got: &mut Captured) {
    let data = std::mem::take(&mut got.data);
    match String::from_utf8(data) {
        Ok(s) => v[name] = s.into(),
        Err(e) if got.truncated() && e.utf8_error().error_len().is_none() => {
            let valid = e.utf8_error().valid_up_to();
            let mut data = e.into_bytes();
            got.dropped += (data.len() - valid) as u64;
            data.truncate(valid);
            v[name] = String::from_utf8(data).expect("valid prefix").into();
        }
        Err(e) => {
            v[name] = serde_json::Value::Null;
            v[format!("{name}_b64")] = base64(e.as_bytes()).into();
        }
    }
}

/// The JSON record of one host; the collected output moves into it (the
/// outcome keeps whether it was truncated).
pub fn json_record(o: &mut Outcome) -> serde_json::Value {
    let mut v = serde_json::json!({
        "host": o.label,
        "status": o.status.word(),
        "exit_code": o.exit_code,
        "signal": o.signal,
        "bytes": o.bytes,
        "files": o.files,
        "skipped": o.skipped,
        "links_skipped": o.links_skipped,
        "failed_files": o.failed_files,
        "stale_parts_removed": o.stale_parts_removed,
        "duration": (o.duration.as_secs_f64() * 1000.0).round() / 1000.0,
        "attempts": o.attempts,
        "kex": o.kex,
        "error": o.error,
    });
    if o.ended() {
        let stdout = Arc::make_mut(&mut o.stdout);
        for (name, got, file) in [
            ("stdout", stdout, &o.stdout_file),
            ("stderr", &mut o.stderr, &o.stderr_file),
        ] {
            match file {
                Some(path) => {
                    v[name] = serde_json::Value::Null;
                    v[format!("{name}_file")] = path.to_string_lossy().into_owned().into();
                }
                None => put_text(&mut v, name, got),
            }
            v[format!("{name}_truncated")] = got.truncated().into();
            v[format!("{name}_dropped")] = got.dropped.into();
        }
    }
    v
}

/// `8 MiB` when exact, else bytes.
fn exact_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

/// The line that ends gathered output cut at the cap.
pub fn truncation_marker(c: &Captured) -> String {
    format!(
        "[output truncated at {}: {} bytes dropped]",
        exact_bytes(c.data.len() as u64),
        c.dropped
    )
}

/// Prints gathered stdout: hosts with identical output once, as a block
/// headed by their folded names; then the hosts that did not exit 0.
pub fn print_gathered(outcomes: &[Outcome]) {
    let mut groups: BTreeMap<&Captured, Vec<&str>> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.ended()) {
        groups.entry(&*o.stdout).or_default().push(&o.label);
    }
    let mut blocks: Vec<(String, usize, &Captured)> = groups
        .into_iter()
        .map(|(out, hosts)| (fold(&hosts), hosts.len(), out))
        .collect();
    blocks.sort();
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for (names, n, out) in blocks {
        let head = format!("{names} ({n})");
        let rule = "-".repeat(head.len().clamp(15, 78));
        let _ = writeln!(w, "{rule}\n{head}\n{rule}");
        let _ = w.write_all(&out.data);
        if !out.data.is_empty() && !out.data.ends_with(b"\n") {
            let _ = writeln!(w);
        }
        if out.truncated() {
            let _ = writeln!(w, "{}", truncation_marker(out));
        }
    }
    let _ = w.flush();
    let mut codes: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.status == Status::Failed) {
        let why = match (&o.signal, o.exit_code) {
            (Some(s), _) => format!("killed by signal {s}"),
            (None, Some(c)) => format!("exited with exit code {c}"),
            _ => continue,
        };
        codes.entry(why).or_default().push(&o.label);
    }
    for (why, hosts) in codes {
        eprintln!("ussh: {}: {why}", fold(&hosts));
    }
}

/// Client CPU of this process so far: (user, system).
pub fn cpu_times() -> (Duration, Duration) {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    // SAFETY: initialised by the successful call above (and zeroed before).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// One line on stderr saying how many connected hosts negotiated no
/// post-quantum key exchange (nothing when all did).
pub fn print_pq_line(outcomes: &[Outcome]) {
    let classic: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| {
            o.kex
                .as_deref()
                .filter(|k| !uring_ssh::is_post_quantum(k))
                .map(|_| o.label.as_str())
        })
        .collect();
    if classic.is_empty() {
        return;
    }
    let connected = outcomes.iter().filter(|o| o.kex.is_some()).count();
    let shown: Vec<&str> = classic.iter().take(5).copied().collect();
    let more = if classic.len() > shown.len() {
        ", …"
    } else {
        ""
    };
    eprintln!(
        "ussh: {} of {connected} hosts negotiated no post-quantum key exchange \
         (their servers lack mlkem768x25519-sha256; e.g. {}{more}); --no-pq-warning hides this",
        classic.len(),
        shown.join(", ")
    );
}

/// The final summary on stderr: a table (per host when there are few,
/// per status otherwise), each failing host's error, and the totals.
/// `quiet` leaves successful hosts out of the table, and prints nothing
/// when every host succeeded.
pub fn print_summary(op: &str, all: &[Outcome], transfer: bool, elapsed: Duration, quiet: bool) {
    if quiet && all.iter().all(|o| o.status == Status::Ok) {
        return;
    }
    let outcomes: Vec<Outcome>;
    let outcomes = if quiet {
        outcomes = all
            .iter()
            .filter(|o| o.status != Status::Ok)
            .cloned()
            .collect();
        &outcomes[..]
    } else {
        all
    };
    let mut w = std::io::stderr().lock();
    let per_host = outcomes.len() <= 32;
    let _ = writeln!(w);
    if per_host {
        let width = outcomes
            .iter()
            .map(|o| o.label.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = write!(w, "{:<width$}  {:<11}  {:>4}", "HOST", "STATUS", "EXIT");
        if transfer {
            let _ = write!(w, "  {:>7}  {:>7}  {:>10}", "FILES", "SKIPPED", "BYTES");
        }
        let _ = writeln!(w, "  {:>7}  ERROR", "SECONDS");
        for o in outcomes {
            let exit = match (&o.signal, o.exit_code) {
                (Some(s), _) => s.clone(),
                (None, Some(c)) => c.to_string(),
                _ => "-".into(),
            };
            let _ = write!(
                w,
                "{:<width$}  {:<11}  {:>4}",
                o.label,
                o.status.word(),
                exit
            );
            if transfer {
                let _ = write!(
                    w,
                    "  {:>7}  {:>7}  {:>10}",
                    o.files,
                    o.skipped,
                    human_bytes(o.bytes)
                );
            }
            let _ = writeln!(
                w,
                "  {:>7.2}  {}",
                o.duration.as_secs_f64(),
                o.error.as_deref().unwrap_or("")
            );
        }
    } else {
        let mut by: BTreeMap<Status, Vec<&Outcome>> = BTreeMap::new();
        for o in outcomes {
            by.entry(o.status).or_default().push(o);
        }
        let _ = write!(w, "{:<11}  {:>6}", "STATUS", "HOSTS");
        if transfer {
            let _ = write!(w, "  {:>9}  {:>9}  {:>10}", "FILES", "SKIPPED", "BYTES");
        }
        let _ = writeln!(w, "  NAMES");
        for (st, os) in &by {
            let names: Vec<&str> = os.iter().map(|o| o.label.as_str()).collect();
            let mut folded = fold(&names);
            if folded.len() > 60 {
                folded.truncate(57);
                folded.push_str("...");
            }
            let _ = write!(w, "{:<11}  {:>6}", st.word(), os.len());
            if transfer {
                let _ = write!(
                    w,
                    "  {:>9}  {:>9}  {:>10}",
                    os.iter().map(|o| o.files).sum::<u64>(),
                    os.iter().map(|o| o.skipped).sum::<u64>(),
                    human_bytes(os.iter().map(|o| o.bytes).sum())
                );
            }
            let _ = writeln!(w, "  {folded}");
        }
        let bad: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
        for o in bad.iter().take(50) {
            let _ = writeln!(
                w,
                "  {}: {}",
                o.label,
                o.error.as_deref().unwrap_or_default()
            );
        }
        if bad.len() > 50 {
            let _ = writeln!(w, "  ... and {} more", bad.len() - 50);
        }
    }
    let outcomes = all;
    let n = outcomes.len();
    let ok = outcomes.iter().filter(|o| o.status == Status::Ok).count();
    let stopped = outcomes
        .iter()
        .filter(|o| o.status == Status::Interrupted)
        .count();
    let secs = elapsed.as_secs_f64();
    let (user, sys) = cpu_times();
    let cpu = user + sys;
    let mut line = format!("ussh {op}: {n} hosts, {ok} ok, {} failed", n - ok - stopped);
    if stopped > 0 {
        line.push_str(&format!(", {stopped} interrupted"));
    }
    line.push_str(&format!(" in {secs:.2} s"));
    if transfer {
        let files: u64 = outcomes.iter().map(|o| o.files).sum();
        let skipped: u64 = outcomes.iter().map(|o| o.skipped).sum();
        let bytes: u64 = outcomes.iter().map(|o| o.bytes).sum();
        line.push_str(&format!(
            " · {files} files, {} ({}/s)",
            human_bytes(bytes),
            human_bytes((bytes as f64 / secs.max(1e-3)) as u64)
        ));
        if skipped > 0 {
            line.push_str(&format!(", {skipped} unchanged"));
        }
    }
    line.push_str(&format!(
        " · client CPU {:.2} s (user {:.2}, sys {:.2}; {:.1} ms per host)",
        cpu.as_secs_f64(),
        user.as_secs_f64(),
        sys.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0 / n.max(1) as f64
    ));
    let _ = writeln!(w, "{line}");
}

/// With several threads, one line on stderr: the hosts each thread ran
/// and, moving files, the bytes they moved.
pub fn print_threads(outcomes: &[Outcome], threads: usize, transfer: bool) {
    let mut line = format!("threads: {threads}");
    for t in 0..threads {
        let on = outcomes.iter().filter(|o| o.thread == Some(t));
        let (hosts, bytes) = on.fold((0usize, 0u64), |(n, b), o| (n + 1, b + o.bytes));
        line.push_str(&format!(" · t{t} {hosts} hosts"));
        if transfer {
            line.push_str(&format!(" {}", human_bytes(bytes)));
        }
    }
    eprintln!("{line}");
}
