//! Host lists: nodeset ranges (`web[01-64]`, `10.0.0.[1-9]`,
//! `a[1,3,5-7]`), pssh-style hosts files, `--shard I/N` (or taken from a
//! Slurm job array or a Kubernetes Indexed Job), and folding a list
//! of names back into nodeset notation for display.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// Most hosts one expression may expand to: a typo such as `[1-99999999]`
/// fails at once instead of filling memory.
pub const MAX_HOSTS: usize = 1_000_000;

/// Most bytes of host names one expression or hosts file may expand to: a
/// long name times many hosts fails at once instead of filling memory.
pub const MAX_NAME_BYTES: usize = 64 << 20;

/// Bounds of an expansion: [`expand`] and [`parse_hosts_file`] use
/// [`Limits::DEFAULT`]; the `_with` variants take others (the fuzz targets
/// use small ones to stay fast).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most hosts.
    pub hosts: usize,
    /// Most bytes of host names.
    pub bytes: usize,
}

impl Limits {
    /// [`MAX_HOSTS`] hosts, [`MAX_NAME_BYTES`] bytes.
    pub const DEFAULT: Limits = Limits {
        hosts: MAX_HOSTS,
        bytes: MAX_NAME_BYTES,
    };
}

/// One host as the operator named it: `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The user before `@`, if given.
    pub user: Option<String>,
    /// The host name or alias (looked up in the ssh config) or address.
    pub host: String,
    /// The port after `:`, if given.
    pub port: Option<u16>,
}

impl Target {
    /// Parses `[user@]host[:port]` (an IPv6 address goes in brackets when a
    /// port follows: `[::1]:22`).
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        let (user, rest) = match s.split_once('@') {
            Some((u, r)) => {
                if u.is_empty() {
                    return Err(format!("{s:?}: empty user name before '@'"));
                }
                (Some(u.to_string()), r)
            }
            None => (None, s),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            // [v6]:port or [v6]
            let Some((addr, after)) = inner.split_once(']') else {
                return Err(format!("{s:?}: unclosed '['"));
            };
            match after {
                "" => (addr, None),
                p if p.starts_with(':') => (addr, Some(&p[1..])),
                _ => return Err(format!("{s:?}: unexpected text after ']'")),
            }
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').expect("one colon");
            (h, Some(p))
        } else {
            // No colon, or a bare IPv6 address.
            (rest, None)
        };
        if host.is_empty() {
            return Err(format!("{s:?}: empty host name"));
        }
        if host.contains(char::is_whitespace) || host.contains('@') {
            return Err(format!("{s:?}: bad host name"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(format!("{s:?}: bad port {p:?}")),
            },
        };
        Ok(Target {
            user,
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') && self.port.is_some() {
            write!(f, "[{}]", self.host)?;
        } else {
            write!(f, "{}", self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Splits `s` at commas that are not inside brackets.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => {
                depth += 1;
                if depth > 1 {
                    return Err(format!("{s:?}: nested '['"));
                }
            }
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("{s:?}: ']' without '['"));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("{s:?}: unclosed '['"));
    }
    out.push(&s[start..]);
    Ok(out)
}

/// Expands the body of one bracket group (`01-64`, `1,3,5-7`, `0-10/2`).
fn expand_group(expr: &str, body: &str, limits: Limits) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in body.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("{expr:?}: empty item in [{body}]"));
        }
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u64 = s
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{expr:?}: bad step {s:?} in [{body}]"))?;
                (r, step)
            }
            None => (item, 1),
        };
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => (a, b),
            None => (range, range),
        };
        let num = |t: &str| -> Result<u64, String> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{expr:?}: {t:?} is not a number in [{body}]"));
            }
            t.parse()
                .map_err(|_| format!("{expr:?}: {t:?} is too large in [{body}]"))
        };
        let (a, b) = (num(lo)?, num(hi)?);
        if a > b {
            return Err(format!("{expr:?}: range {lo}-{hi} runs backwards"));
        }
        if (b - a) / step >= limits.hosts.saturating_sub(out.len()) as u64 {
            return Err(format!(
                "{expr:?}: [{body}] has more than {} hosts",
                limits.hosts
            ));
        }
        // Zero padding as written: `01-64` gives 01 … 64.
        let width = if lo.len() > 1 && lo.starts_with('0') {
            lo.len()
        } else {
            0
        };
        let mut n = a;
        loop {
            out.push(format!("{n:0width$}"));
            match n.checked_add(step) {
                Some(next) if next <= b => n = next,
                _ => break,
            }
        }
    }
    Ok(out)
}

/// Expands one nodeset element (no top-level commas): every bracket group
/// multiplies the names (`r[1-2]n[1-3]` gives 6).
fn expand_one(expr: &str, limits: Limits) -> Result<Vec<String>, String> {
    let mut names = vec![String::new()];
    let mut rest = expr;
    while let Some(open) = rest.find('[') {
        let close = rest[open..]
            .find(']')
            .map(|i| open + i)
            .ok_or_else(|| format!("{expr:?}: unclosed '['"))?;
        let body = &rest[open + 1..close];
        let before = &rest[..open];
        // `[::1]` or `user@[::1]:22`: an IPv6 literal, not a range.
        if body.contains(':') {
            for n in &mut names {
                n.push_str(&rest[..=close]);
            }
            rest = &rest[close + 1..];
            continue;
        }
        let values = expand_group(expr, body, limits)?;
        if names.len().saturating_mul(values.len()) > limits.hosts {
            return Err(format!(
                "{expr:?} expands to more than {} hosts",
                limits.hosts
            ));
        }
        // Every name grows by `before` and the longest value.
        let longest = names.iter().map(String::len).max().unwrap_or(0)
            + before.len()
            + values.iter().map(String::len).max().unwrap_or(0)
            + rest.len();
        if names.len() * values.len() * longest > limits.bytes {
            return Err(format!(
                "{expr:?} expands to more than {} bytes of host names",
                limits.bytes
            ));
        }
        let mut next = Vec::with_capacity(names.len() * values.len());
        for n in &names {
            for v in &values {
                next.push(format!("{n}{before}{v}"));
            }
        }
        names = next;
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return Err(format!("{expr:?}: ']' without '['"));
    }
    for n in &mut names {
        n.push_str(rest);
    }
    Ok(names)
}

/// Expands a nodeset expression: comma-separated elements, each of which
/// may hold bracket groups, `[user@]` before and `:port` after.
///
/// ```
/// let t = ussh::hosts::expand("root@web[01-03]:2222,db1").unwrap();
/// let names: Vec<String> = t.iter().map(|t| t.to_string()).collect();
/// assert_eq!(names, ["root@web01:2222", "root@web02:2222", "root@web03:2222", "db1"]);
/// ```
pub fn expand(expr: &str) -> Result<Vec<Target>, String> {
    expand_with(expr, Limits::DEFAULT)
}

/// [`expand`] within other bounds.
pub fn expand_with(expr: &str, limits: Limits) -> Result<Vec<Target>, String> {
    let mut out = Vec::new();
    expand_into(expr, &mut out, &mut 0, limits)?;
    Ok(out)
}

/// [`expand`] appending to `out`; `bytes` counts the host-name bytes of
/// `out`, so that several expressions (a hosts file) share the bounds.
fn expand_into(
    expr: &str,
    out: &mut Vec<Target>,
    bytes: &mut usize,
    limits: Limits,
) -> Result<(), String> {
    for elem in split_top(expr.trim())? {
        let elem = elem.trim();
        if elem.is_empty() {
            return Err(format!("{expr:?}: empty host name between commas"));
        }
        for name in expand_one(elem, limits)? {
            *bytes += name.len();
            out.push(Target::parse(&name)?);
            if out.len() > limits.hosts {
                return Err(format!("{expr:?}: more than {} hosts", limits.hosts));
            }
            if *bytes > limits.bytes {
                return Err(format!(
                    "{expr:?}: more than {} bytes of host names",
                    limits.bytes
                ));
            }
        }
    }
    Ok(())
}

/// Parses a hosts file in pssh's format: one `[user@]host[:port]` per line
/// (nodeset ranges allowed), `#` starts a comment, blank lines are skipped.
/// `origin` names the file in errors (`hosts.txt:3: …`). The whole file
/// shares the bounds of one expression ([`MAX_HOSTS`], [`MAX_NAME_BYTES`]).
pub fn parse_hosts_file(text: &str, origin: &str) -> Result<Vec<Target>, String> {
    parse_hosts_file_with(text, origin, Limits::DEFAULT)
}

/// [`parse_hosts_file`] within other bounds.
pub fn parse_hosts_file_with(
    text: &str,
    origin: &str,
    limits: Limits,
) -> Result<Vec<Target>, String> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let first = words.next().expect("non-empty line");
        if words.next().is_some() {
            return Err(format!(
                "{origin}:{}: expected one `[user@]host[:port]` per line, got {line:?}",
                i + 1
            ));
        }
        expand_into(first, &mut out, &mut bytes, limits)
            .map_err(|e| format!("{origin}:{}: {e}", i + 1))?;
    }
    Ok(out)
}

/// Drops repeated targets, keeping the first of each.
pub fn dedup(targets: Vec<Target>) -> Vec<Target> {
    let mut seen = HashSet::new();
    targets
        .into_iter()
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// Drops the targets an exclusion names (`-x`): the same host, and the
/// same user and port where the exclusion gives them (`-x web01` drops
/// `ops@web01:2222` too; `-x ops@web01` drops only that user's).
pub fn exclude(targets: Vec<Target>, excluded: &[Target]) -> Vec<Target> {
    targets
        .into_iter()
        .filter(|t| {
            !excluded.iter().any(|x| {
                x.host == t.host
                    && x.user.as_ref().is_none_or(|u| t.user.as_ref() == Some(u))
                    && x.port.is_none_or(|p| t.port == Some(p))
            })
        })
        .collect()
}

/// A `--shard I/N` selection: hosts whose position (from 0) modulo `count`
/// is `index - 1`. `index` counts from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 1 to `count`.
    pub index: usize,
    /// How many shards the hosts are split into.
    pub count: usize,
}

impl Shard {
    /// Parses `I/N` with `1 <= I <= N`.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("--shard {s:?}: expected I/N, e.g. 1/4"))?;
        let parse = |t: &str| t.trim().parse::<usize>().ok();
        match (parse(i), parse(n)) {
            (Some(index), Some(count)) if count >= 1 && (1..=count).contains(&index) => {
                Ok(Shard { index, count })
            }
            (Some(_), Some(0)) => Err(format!("--shard {s:?}: N must be at least 1")),
            (Some(_), Some(count)) => {
                Err(format!("--shard {s:?}: I must be between 1 and {count}"))
            }
            _ => Err(format!(
                "--shard {s:?}: expected I/N with numbers, e.g. 1/4"
            )),
        }
    }

    /// Parses a `--shard` value: `I/N`, or `auto` for a Slurm job array
    /// task, or `auto/N` for a task of a Kubernetes Indexed Job of N
    /// completions. `env` looks a variable up (unset and empty are alike).
    ///
    /// Slurm: the index is `SLURM_ARRAY_TASK_ID` less
    /// `SLURM_ARRAY_TASK_MIN` (0 when unset), divided by
    /// `SLURM_ARRAY_TASK_STEP` (1 when unset), and the count
    /// `SLURM_ARRAY_TASK_COUNT`; an array with gaps (`--array=1,4,9`) is
    /// refused, since its tasks would not cover every shard. Kubernetes:
    /// the index is `JOB_COMPLETION_INDEX` (from 0), the count N, as the
    /// pod is not told the Job's `completions`.
    pub fn from_spec(s: &str, env: impl Fn(&str) -> Option<String>) -> Result<Shard, String> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        let num = |name: &str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("--shard {s}: {name}={v:?} is not a number"))
        };
        match s.split_once('/') {
            None if s == "auto" => {
                let (Some(id), Some(count)) =
                    (var("SLURM_ARRAY_TASK_ID"), var("SLURM_ARRAY_TASK_COUNT"))
                else {
                    let missing: Vec<&str> = ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"]
                        .into_iter()
                        .filter(|n| var(n).is_none())
                        .collect();
                    let hint = if var("JOB_COMPLETION_INDEX").is_some() {
                        "; in a Kubernetes Indexed Job give the count: --shard auto/N"
                    } else {
                        " (auto needs a Slurm job array task, or --shard auto/N in a \
                         Kubernetes Indexed Job)"
                    };
                    return Err(format!(
                        "--shard auto: {} not set{hint}",
                        missing.join(" and ")
                    ));
                };
                let id = num("SLURM_ARRAY_TASK_ID", &id)?;
                let count = num("SLURM_ARRAY_TASK_COUNT", &count)?;
                let min = match var("SLURM_ARRAY_TASK_MIN") {
                    Some(v) => num("SLURM_ARRAY_TASK_MIN", &v)?,
                    None => 0,
                };
                let step = match var("SLURM_ARRAY_TASK_STEP") {
                    Some(v) => num("SLURM_ARRAY_TASK_STEP", &v)?.max(1),
                    None => 1,
                };
                let offset = id.checked_sub(min).filter(|o| o % step == 0);
                match offset.map(|o| o / step) {
                    Some(index) if index < count => Ok(Shard {
                        index: index + 1,
                        count,
                    }),
                    _ => Err(format!(
                        "--shard auto: task {id} of a Slurm array of {count} from {min} \
                         step {step} is not one of {count} consecutive shards; submit \
                         the array as a range, e.g. --array=0-{}",
                        count.saturating_sub(1)
                    )),
                }
            }
            Some(("auto", n)) => {
                let count = match n.parse::<usize>() {
                    Ok(c) if c >= 1 => c,
                    _ => return Err(format!("--shard {s}: N must be a number, at least 1")),
                };
                let Some(v) = var("JOB_COMPLETION_INDEX") else {
                    return Err(format!(
                        "--shard {s}: JOB_COMPLETION_INDEX not set (auto/N needs a \
                         Kubernetes Indexed Job; under a Slurm job array use --shard auto)"
                    ));
                };
                let index = num("JOB_COMPLETION_INDEX", &v)?;
                if index >= count {
                    return Err(format!(
                        "--shard {s}: JOB_COMPLETION_INDEX={index} is not below {count}: \
                         N must be the Job's completions"
                    ));
                }
                Ok(Shard {
                    index: index + 1,
                    count,
                })
            }
            _ => Shard::parse(s),
        }
    }

    /// Keeps this shard's share of `items`, in order.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index - 1)
            .map(|(_, t)| t)
            .collect()
    }
}

/// Folds names back into nodeset notation: `web01,web02,web03,db1` becomes
/// `db1,web[01-03]`. Names differing only in their last number (same
/// prefix, suffix and zero padding) are merged.
pub fn fold<S: AsRef<str>>(names: &[S]) -> String {
    // (prefix, suffix, padded width) -> numbers; names without digits alone.
    // An unpadded number as long as a padded group's numbers (`10` beside
    // `01`) belongs to that group.
    let mut parsed: Vec<(String, String, usize, u64)> = Vec::new();
    let mut plain: Vec<String> = Vec::new();
    for n in names {
        let n = n.as_ref();
        let bytes = n.as_bytes();
        let Some(end) = bytes.iter().rposition(|b| b.is_ascii_digit()) else {
            plain.push(n.to_string());
            continue;
        };
        let start = bytes[..end]
            .iter()
            .rposition(|b| !b.is_ascii_digit())
            .map_or(0, |i| i + 1);
        let digits = &n[start..=end];
        let Ok(v) = digits.parse::<u64>() else {
            plain.push(n.to_string());
            continue;
        };
        let padded = digits.len() > 1 && digits.starts_with('0');
        // Width: the digit count, negative while unpadded (decided below).
        parsed.push((
            n[..start].to_string(),
            n[end + 1..].to_string(),
            if padded {
                digits.len()
            } else {
                usize::MAX - digits.len()
            },
            v,
        ));
    }
    let padded: std::collections::HashSet<(String, String, usize)> = parsed
        .iter()
        .filter(|p| p.2 < usize::MAX / 2)
        .map(|p| (p.0.clone(), p.1.clone(), p.2))
        .collect();
    let mut groups: BTreeMap<(String, String, usize), Vec<u64>> = BTreeMap::new();
    for (prefix, suffix, w, v) in parsed {
        let width = if w < usize::MAX / 2 {
            w
        } else {
            let len = usize::MAX - w;
            if padded.contains(&(prefix.clone(), suffix.clone(), len)) {
                len
            } else {
                0
            }
        };
        groups.entry((prefix, suffix, width)).or_default().push(v);
    }
    let mut parts: Vec<String> = plain;
    for ((prefix, suffix, width), mut nums) in groups {
        nums.sort_unstable();
        nums.dedup();
        if nums.len() == 1 {
            parts.push(format!("{prefix}{:0width$}{suffix}", nums[0]));
            continue;
        }
        let mut ranges = Vec::new();
        let mut i = 0;
        while i < nums.len() {
            let mut j = i;
            while j + 1 < nums.len() && nums[j].checked_add(1) == Some(nums[j + 1]) {
                j += 1;
            }
            if i == j {
                ranges.push(format!("{:0width$}", nums[i]));
            } else {
                ranges.push(format!("{:0width$}-{:0width$}", nums[i], nums[j]));
            }
            i = j + 1;
        }
        parts.push(format!("{prefix}[{}]{suffix}", ranges.join(",")));
    }
    parts.sort();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_drop_matching_hosts() {
        let all = expand("web[01-04],ops@web05,web06:2222").unwrap();
        let x = expand("web[02-03],web05,root@web06,web04:22").unwrap();
        let kept: Vec<String> = exclude(all, &x).iter().map(|t| t.to_string()).collect();
        assert_eq!(kept, ["web01", "web04", "web06:2222"]);
    }

    fn names(expr: &str) -> Vec<String> {
        expand(expr)
            .unwrap()
            .iter()
            .map(|t| t.to_string())
            .collect()
    }

    #[test]
    fn ranges_with_padding() {
        let n = names("web[01-64]");
        assert_eq!(n.len(), 64);
        assert_eq!(n[0], "web01");
        assert_eq!(n[63], "web64");
        assert_eq!(names("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(names("n[098-100]"), ["n098", "n099", "n100"]);
    }

    #[test]
    fn addresses_lists_and_steps() {
        let n = names("10.0.0.[1-9]");
        assert_eq!(n.len(), 9);
        assert_eq!(n[8], "10.0.0.9");
        assert_eq!(names("a[1,3,5-7]"), ["a1", "a3", "a5", "a6", "a7"]);
        assert_eq!(names("x[0-6/3]"), ["x0", "x3", "x6"]);
    }

    #[test]
    fn products_users_ports_and_lists() {
        assert_eq!(names("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(
            names("ops@h[1-2]:2200,db"),
            ["ops@h1:2200", "ops@h2:2200", "db"]
        );
        let t = &expand("u@[::1]:2022").unwrap()[0];
        assert_eq!(t.host, "::1");
        assert_eq!(t.port, Some(2022));
        assert_eq!(t.user.as_deref(), Some("u"));
    }

    #[test]
    fn bad_ranges_are_errors() {
        for bad in [
            "web[01-",
            "web]",
            "web[a-b]",
            "web[5-1]",
            "web[]",
            "web[1,,2]",
            "web[1-2/0]",
            "a,,b",
            "web[[1-2]]",
            "host:99999",
            "host:http",
            "@host",
            "n[0-99999999]",
            "a[0-9999]b[0-9999]",
        ] {
            assert!(expand(bad).is_err(), "{bad:?} should be rejected");
        }
        let e = expand("web[9-1]").unwrap_err();
        assert!(e.contains("backwards"), "{e}");
    }

    /// Inputs that once hung, panicked or filled memory; kept as a
    /// regression set (the fuzz target `host_list` replays them as seeds).
    #[test]
    fn hostile_expressions_are_bounded_errors() {
        // The largest number: stepping past it wrapped into an endless loop.
        assert_eq!(names("n[18446744073709551615]"), ["n18446744073709551615"]);
        assert_eq!(
            names("n[18446744073709551614-18446744073709551615/7]").len(),
            1
        );
        assert!(expand("a[1-99999999999]").is_err());
        // Many items of one group, each under the bound, together over it.
        let many = format!("a[{}]", vec!["0-999998"; 64].join(","));
        let e = expand(&many).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        // A long name times many hosts.
        let long = format!("{}[0-999999]", "x".repeat(4000));
        let e = expand(&long).unwrap_err();
        assert!(e.contains("bytes of host names"), "{e}");
        // Many lines of a hosts file share one bound.
        let file = "a[0-999999]\n".repeat(3);
        let e = parse_hosts_file(&file, "h").unwrap_err();
        assert!(e.starts_with("h:2:"), "{e}");
        // Small bounds hold exactly.
        let l = Limits {
            hosts: 10,
            bytes: 1000,
        };
        assert_eq!(expand_with("a[1-10]", l).unwrap().len(), 10);
        assert!(expand_with("a[1-11]", l).is_err());
        assert!(expand_with("a[1-5],b[1-6]", l).is_err());
        assert!(expand_with(&format!("{}[1-9]", "y".repeat(200)), l).is_err());
        assert_eq!(
            fold(&["n18446744073709551615", "n18446744073709551614"]),
            "n[18446744073709551614-18446744073709551615]"
        );
    }

    #[test]
    fn hosts_file() {
        let text = "# fleet\nweb01\nops@web02:2222  # comment\n\n  db[1-2]\nlb 22 \n";
        let e = parse_hosts_file(text, "h").unwrap_err();
        assert!(e.starts_with("h:6:"), "{e}");
        let text = "# fleet\nweb01\nops@web02:2222  # comment\n\n  db[1-2]\nadmin@lb:2022\n";
        let t = parse_hosts_file(text, "h").unwrap();
        let n: Vec<String> = t.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            n,
            ["web01", "ops@web02:2222", "db1", "db2", "admin@lb:2022"]
        );
        let e = parse_hosts_file("ok\nbad[1-\n", "hosts.txt").unwrap_err();
        assert!(e.starts_with("hosts.txt:2:"), "{e}");
    }

    #[test]
    fn shards_partition_the_hosts() {
        let all: Vec<usize> = (0..10).collect();
        let mut seen = Vec::new();
        for i in 1..=3 {
            let s = Shard::parse(&format!("{i}/3")).unwrap();
            seen.extend(s.select(all.clone()));
        }
        seen.sort();
        assert_eq!(seen, all);
        assert_eq!(
            Shard::parse("1/3").unwrap().select(all.clone()),
            [0, 3, 6, 9]
        );
        assert_eq!(Shard::parse("3/3").unwrap().select(all), [2, 5, 8]);
        for bad in ["0/3", "4/3", "1/0", "x/2", "3", "1/", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    fn env_of<'a>(vars: &'a [(&'a str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
        |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }
    }

    /// Every index a scheduler hands out, each shard's hosts together.
    fn partition(spec: &str, envs: &[Vec<(&str, String)>], hosts: &[usize]) -> Vec<usize> {
        let mut seen = Vec::new();
        for vars in envs {
            let s = Shard::from_spec(spec, env_of(vars)).unwrap();
            assert_eq!(s.count, envs.len());
            seen.extend(s.select(hosts.to_vec()));
        }
        seen.sort();
        seen
    }

    #[test]
    fn auto_shards_partition_the_hosts() {
        let hosts: Vec<usize> = (0..23).collect();
        for (count, min, step) in [(1, 0, 1), (4, 0, 1), (4, 1, 1), (5, 10, 3), (7, 0, 2)] {
            let slurm: Vec<Vec<(&str, String)>> = (0..count)
                .map(|k| {
                    vec![
                        ("SLURM_ARRAY_TASK_ID", (min + k * step).to_string()),
                        ("SLURM_ARRAY_TASK_COUNT", count.to_string()),
                        ("SLURM_ARRAY_TASK_MIN", min.to_string()),
                        ("SLURM_ARRAY_TASK_STEP", step.to_string()),
                    ]
                })
                .collect();
            assert_eq!(partition("auto", &slurm, &hosts), hosts, "{count} tasks");
            let k8s: Vec<Vec<(&str, String)>> = (0..count)
                .map(|k| vec![("JOB_COMPLETION_INDEX", k.to_string())])
                .collect();
            assert_eq!(partition(&format!("auto/{count}"), &k8s, &hosts), hosts);
        }
        // Without MIN, IDs count from 0.
        let v = [
            ("SLURM_ARRAY_TASK_ID", "2".to_string()),
            ("SLURM_ARRAY_TASK_COUNT", "3".to_string()),
        ];
        assert_eq!(
            Shard::from_spec("auto", env_of(&v)).unwrap(),
            Shard { index: 3, count: 3 }
        );
        // Plain I/N still works, whatever the environment.
        assert_eq!(
            Shard::from_spec("2/5", env_of(&v)).unwrap(),
            Shard { index: 2, count: 5 }
        );
    }

    #[test]
    fn auto_shards_name_what_is_missing() {
        let err = |spec: &str, vars: &[(&str, &str)]| {
            let vars: Vec<(&str, String)> = vars.iter().map(|(n, v)| (*n, v.to_string())).collect();
            Shard::from_spec(spec, env_of(&vars)).unwrap_err()
        };
        let e = err("auto", &[]);
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT not set"),
            "{e}"
        );
        let e = err("auto", &[("SLURM_ARRAY_TASK_ID", "3")]);
        assert!(e.contains("SLURM_ARRAY_TASK_COUNT not set"), "{e}");
        assert!(!e.contains("SLURM_ARRAY_TASK_ID"), "{e}");
        let e = err(
            "auto",
            &[("SLURM_ARRAY_TASK_ID", ""), ("SLURM_ARRAY_TASK_COUNT", "4")],
        );
        assert!(e.contains("SLURM_ARRAY_TASK_ID not set"), "{e}");
        let e = err("auto", &[("JOB_COMPLETION_INDEX", "0")]);
        assert!(e.contains("--shard auto/N"), "{e}");
        let e = err("auto/4", &[("SLURM_ARRAY_TASK_ID", "0")]);
        assert!(e.contains("JOB_COMPLETION_INDEX not set"), "{e}");
        let e = err("auto/4", &[("JOB_COMPLETION_INDEX", "4")]);
        assert!(e.contains("not below 4"), "{e}");
        let e = err("auto/4", &[("JOB_COMPLETION_INDEX", "-1")]);
        assert!(e.contains("not a number"), "{e}");
        for bad in ["auto/0", "auto/x", "auto/"] {
            let e = err(bad, &[("JOB_COMPLETION_INDEX", "0")]);
            assert!(e.contains("N must be"), "{bad}: {e}");
        }
        let slurm = |id: &str, count: &str, min: &str| {
            err(
                "auto",
                &[
                    ("SLURM_ARRAY_TASK_ID", id),
                    ("SLURM_ARRAY_TASK_COUNT", count),
                    ("SLURM_ARRAY_TASK_MIN", min),
                ],
            )
        };
        // An array with gaps (--array=1,4,9): task 9 is past 3 shards.
        assert!(slurm("9", "3", "1").contains("--array=0-2"));
        assert!(slurm("0", "3", "1").contains("not one of 3"));
        assert!(slurm("1", "0", "1").contains("not one of 0"));
        assert!(slurm("x", "3", "1").contains("SLURM_ARRAY_TASK_ID=\"x\" is not a number"));
        assert!(err("autox", &[]).contains("expected I/N"));
    }

    #[test]
    fn dedup_keeps_order() {
        let t = dedup(expand("b,a,b,c,a").unwrap());
        let n: Vec<String> = t.iter().map(|t| t.to_string()).collect();
        assert_eq!(n, ["b", "a", "c"]);
    }

    #[test]
    fn fold_round_trips() {
        let n = names("web[01-03,07],db1,lb");
        assert_eq!(fold(&n), "db1,lb,web[01-03,07]");
        assert_eq!(fold(&names("10.0.0.[1-9]")), "10.0.0.[1-9]");
        assert_eq!(fold(&["a1", "a01"]), "a01,a1");
        assert_eq!(fold(&names("web[01-64]")), "web[01-64]");
        assert_eq!(fold(&names("n[8-12]")), "n[8-12]");
        assert_eq!(fold(&names("n[098-100],n7")), "n7,n[098-100]");
        assert_eq!(fold::<&str>(&[]), "");
    }
}
