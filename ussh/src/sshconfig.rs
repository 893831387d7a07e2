//! The part of OpenSSH's client configuration (`~/.ssh/config`, `-F FILE`)
//! that ussh honours, and a record of every directive it does not, so that
//! those are reported instead of silently ignored.
//!
//! Honoured: `Host` patterns (`*`, `?`, `!negation`), `Include`,
//! `HostName`, `Port`, `User`, `IdentityFile`, `IdentitiesOnly`,
//! `IdentityAgent`, `ConnectTimeout`, `ServerAliveInterval`,
//! `ServerAliveCountMax`, `UserKnownHostsFile`, `StrictHostKeyChecking`,
//! `Ciphers`, `KexAlgorithms`, `MACs`, `HostKeyAlgorithms` (plain lists),
//! and `BatchMode` (ussh never prompts). As in `ssh`, the first value
//! obtained for a directive wins, except `IdentityFile`, which accumulates.

use std::fs;
use std::path::{Path, PathBuf};

/// What `StrictHostKeyChecking` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrictMode {
    /// `yes` (and `ask`, since ussh never prompts): unknown and changed
    /// keys are errors.
    Yes,
    /// `accept-new`: unknown keys are added to the known_hosts file.
    AcceptNew,
    /// `no`/`off`: keys are not checked.
    No,
}

/// The settings the config gives one host alias.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// `HostName` (with `%h` replaced by the alias).
    pub hostname: Option<String>,
    /// `Port`.
    pub port: Option<u16>,
    /// `User`.
    pub user: Option<String>,
    /// `IdentityFile`, in order, `~` and `%d`/`%h`/`%u`/`%r` expanded.
    pub identity_files: Vec<PathBuf>,
    /// `IdentitiesOnly`.
    pub identities_only: Option<bool>,
    /// `IdentityAgent` (`none` gives an empty path: no agent).
    pub identity_agent: Option<PathBuf>,
    /// `ConnectTimeout`, seconds.
    pub connect_timeout: Option<u64>,
    /// `ServerAliveInterval`, seconds (0: off).
    pub server_alive_interval: Option<u64>,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: Option<u32>,
    /// The first file of `UserKnownHostsFile`.
    pub user_known_hosts_file: Option<PathBuf>,
    /// `StrictHostKeyChecking`.
    pub strict_host_key_checking: Option<StrictMode>,
    /// `Ciphers`.
    pub ciphers: Option<String>,
    /// `KexAlgorithms`.
    pub kex_algorithms: Option<String>,
    /// `MACs`.
    pub macs: Option<String>,
    /// `HostKeyAlgorithms`.
    pub host_key_algorithms: Option<String>,
    /// `ProxyCommand`, its `%` tokens but `%p` expanded (the port is
    /// known only once the whole configuration is read); `Some("")` for
    /// `none`.
    pub proxy_command: Option<String>,
    /// `ProxyJump`: `[user@]host[:port]` hops, comma-separated, the first
    /// reached directly; `Some("")` for `none`.
    pub proxy_jump: Option<String>,
    /// Directives that applied to this host but that ussh does not
    /// support, as `Name (file:line)`.
    pub unsupported: Vec<Unsupported>,
}

/// A directive that applies but is not supported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The directive as written (`ProxyJump`).
    pub name: String,
    /// Where: `file:line`.
    pub at: String,
}

#[derive(Debug, Clone)]
struct Directive {
    key: String,
    name: String,
    args: Vec<String>,
    /// The value as written (`ProxyCommand` hands it to the shell as is).
    raw: String,
    at: String,
}

#[derive(Debug, Clone)]
enum Condition {
    /// `Host` patterns.
    Host(Vec<String>),
    /// `Match`: not evaluated; its directives are reported as unsupported.
    Match,
}

#[derive(Debug, Clone)]
struct Block {
    cond: Condition,
    at: String,
    directives: Vec<Directive>,
}

/// A parsed client configuration.
#[derive(Debug, Clone, Default)]
pub struct SshConfig {
    blocks: Vec<Block>,
    /// Files read through `Include` so far (bounded by [`MAX_INCLUDES`]).
    included: usize,
    /// Problems met while reading (unreadable `Include`, bad syntax).
    pub warnings: Vec<String>,
}

/// Most files one configuration may read through `Include` (nested ones
/// count too): a file that includes itself several times would otherwise
/// read it exponentially often.
pub const MAX_INCLUDES: usize = 256;

/// Largest file `Include` reads; longer ones (or anything that is not a
/// regular file, such as `/dev/zero`) are skipped with a warning.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads an included file: a regular file of at most [`MAX_CONFIG_BYTES`].
fn read_included(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".into())
}

/// `$HOME`, or `/` if unset.
pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The local user's name (`$USER`, `$LOGNAME`, else `root` for uid 0).
pub fn local_user() -> String {
    for v in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(v)
            && !u.is_empty()
        {
            return u;
        }
    }
    "root".to_string()
}

/// Splits a line's arguments at whitespace, honouring double quotes.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Glob match with `*` and `?` (as `ssh`'s `Host` patterns).
pub fn wildmatch(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn host_matches(patterns: &[String], alias: &str) -> bool {
    let mut matched = false;
    for list in patterns {
        // A pattern argument may itself be a comma-separated list.
        for pat in list.split(',') {
            if let Some(neg) = pat.strip_prefix('!') {
                if wildmatch(neg, alias) {
                    return false;
                }
            } else if wildmatch(pat, alias) {
                matched = true;
            }
        }
    }
    matched
}

fn expand_tilde(s: &str) -> PathBuf {
    if s == "~" {
        home()
    } else if let Some(rest) = s.strip_prefix("~/") {
        home().join(rest)
    } else {
        PathBuf::from(s)
    }
}

impl SshConfig {
    /// Reads `path`; a missing file gives an empty config.
    pub fn load(path: &Path) -> Result<SshConfig, String> {
        let mut c = SshConfig::default();
        match fs::read_to_string(path) {
            Ok(text) => c.parse_into(&text, &path.display().to_string(), 0)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        Ok(c)
    }

    /// Parses config text; `origin` names it in messages.
    pub fn parse(text: &str, origin: &str) -> Result<SshConfig, String> {
        let mut c = SshConfig::default();
        c.parse_into(text, origin, 0)?;
        Ok(c)
    }

    fn current(&mut self, origin: &str) -> &mut Block {
        if self.blocks.is_empty() {
            self.blocks.push(Block {
                cond: Condition::Host(vec!["*".into()]),
                at: format!("{origin}:0"),
                directives: Vec::new(),
            });
        }
        self.blocks.last_mut().expect("a block")
    }

    fn parse_into(&mut self, text: &str, origin: &str, depth: usize) -> Result<(), String> {
        if depth > 8 {
            return Err(format!("{origin}: Include nested too deeply"));
        }
        for (i, raw) in text.lines().enumerate() {
            let at = format!("{origin}:{}", i + 1);
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, rest) = split_directive(line);
            let args = split_args(rest);
            let key = name.to_ascii_lowercase();
            match key.as_str() {
                "host" => {
                    if args.is_empty() {
                        return Err(format!("{at}: Host needs at least one pattern"));
                    }
                    self.blocks.push(Block {
                        cond: Condition::Host(args),
                        at,
                        directives: Vec::new(),
                    });
                }
                "match" => self.blocks.push(Block {
                    cond: Condition::Match,
                    at,
                    directives: Vec::new(),
                }),
                "include" => {
                    for arg in &args {
                        let mut p = expand_tilde(arg);
                        if p.is_relative() {
                            p = home().join(".ssh").join(p);
                        }
                        for file in glob_files(&p) {
                            self.included += 1;
                            if self.included > MAX_INCLUDES {
                                return Err(format!(
                                    "{at}: more than {MAX_INCLUDES} files included"
                                ));
                            }
                            match read_included(&file) {
                                Ok(t) => {
                                    self.parse_into(&t, &file.display().to_string(), depth + 1)?
                                }
                                Err(e) => self
                                    .warnings
                                    .push(format!("{at}: Include {}: {e}", file.display())),
                            }
                        }
                    }
                }
                _ => {
                    if args.is_empty() {
                        return Err(format!("{at}: {name} needs a value"));
                    }
                    let d = Directive {
                        key,
                        name: name.to_string(),
                        args,
                        raw: rest.to_string(),
                        at,
                    };
                    self.current(origin).directives.push(d);
                }
            }
        }
        Ok(())
    }

    /// The settings for `alias` (as named on the command line); `%r` in
    /// paths is the `User` found (or the local user).
    pub fn resolve(&self, alias: &str) -> Result<HostSettings, String> {
        let mut s = HostSettings::default();
        for block in &self.blocks {
            match &block.cond {
                Condition::Host(p) if host_matches(p, alias) => {}
                Condition::Host(_) => continue,
                Condition::Match => {
                    s.unsupported.push(Unsupported {
                        name: "Match".into(),
                        at: block.at.clone(),
                    });
                    continue;
                }
            }
            for d in &block.directives {
                apply(&mut s, d, alias)?;
            }
        }
        let user = s.user.clone().unwrap_or_else(local_user);
        let host = s.hostname.clone().unwrap_or_else(|| alias.to_string());
        let tokens = |p: &PathBuf| -> PathBuf {
            let t = p.to_string_lossy();
            if !t.contains('%') {
                return p.clone();
            }
            PathBuf::from(percent(&t, alias, &host, &user))
        };
        s.identity_files = s.identity_files.iter().map(tokens).collect();
        s.user_known_hosts_file = s.user_known_hosts_file.as_ref().map(tokens);
        s.identity_agent = s.identity_agent.as_ref().map(tokens);
        Ok(s)
    }
}

/// The directives [`SshConfig::add_options`] takes, as ssh spells them:
/// those this module honours.
pub const OPTIONS: [&str; 18] = [
    "HostName",
    "Port",
    "User",
    "IdentityFile",
    "IdentitiesOnly",
    "IdentityAgent",
    "ConnectTimeout",
    "ServerAliveInterval",
    "ServerAliveCountMax",
    "UserKnownHostsFile",
    "StrictHostKeyChecking",
    "Ciphers",
    "KexAlgorithms",
    "MACs",
    "HostKeyAlgorithms",
    "BatchMode",
    "ProxyCommand",
    "ProxyJump",
];

impl SshConfig {
    /// Adds command-line options (`-o Key=Value`, or `-o 'Key Value'`) for
    /// every host, ahead of the files' lines: as with ssh, they win. An
    /// option not in [`OPTIONS`], or a bad value, is an error naming it.
    pub fn add_options(&mut self, options: &[String]) -> Result<(), String> {
        let mut directives = Vec::new();
        for opt in options {
            let line = opt.trim();
            let (name, rest) = split_directive(line);
            let Some(known) = OPTIONS.iter().find(|o| o.eq_ignore_ascii_case(name)) else {
                return Err(format!(
                    "-o {opt:?}: {name:?} is not an ssh option ussh understands \
                     (it understands: {}); exec's output directory is --outdir DIR",
                    OPTIONS.join(", ")
                ));
            };
            let args = split_args(rest);
            if args.is_empty() {
                return Err(format!("-o {opt:?}: {known} needs a value (Key=Value)"));
            }
            let d = Directive {
                key: known.to_ascii_lowercase(),
                name: known.to_string(),
                args,
                raw: rest.to_string(),
                at: format!("-o {opt:?}"),
            };
            // Bad values are refused now, before any host is resolved.
            apply(&mut HostSettings::default(), &d, "")?;
            directives.push(d);
        }
        if !directives.is_empty() {
            self.blocks.insert(
                0,
                Block {
                    cond: Condition::Host(vec!["*".into()]),
                    at: "-o".into(),
                    directives,
                },
            );
        }
        Ok(())
    }
}

/// Files named by an `Include` argument: `*` and `?` in the last component.
fn glob_files(p: &Path) -> Vec<PathBuf> {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![p.to_path_buf()];
    }
    let dir = p.parent().unwrap_or(Path::new("/"));
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| wildmatch(&name, &e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `%%`, `%d`, `%h`, `%n`, `%r`, `%u` as `ssh` expands them in paths.
fn percent(s: &str, alias: &str, host: &str, user: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('d') => out.push_str(&home().to_string_lossy()),
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(alias),
            Some('r') => out.push_str(user),
            Some('u') => out.push_str(&local_user()),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A directive's name and its value: `Name value`, `Name=value` or
/// `Name = value`.
fn split_directive(line: &str) -> (&str, &str) {
    let split = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let rest = line[split..].trim_start();
    let rest = rest.strip_prefix('=').map_or(rest, str::trim_start);
    (&line[..split], rest)
}

/// A `ProxyCommand` with its tokens expanded: `%h` the host name, `%p`
/// the port, `%r` the remote user, `%n` the alias, `%%` a percent sign (and
/// `%d` the home directory, `%u` the local user).
pub fn proxy_command(template: &str, alias: &str, host: &str, port: u16, user: &str) -> String {
    // `%p` here; `%%` kept as a pair for `percent` to turn into one `%`.
    let mut out = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('%', Some('p')) => {
                chars.next();
                out.push_str(&port.to_string());
            }
            ('%', Some('%')) => {
                chars.next();
                out.push_str("%%");
            }
            _ => out.push(c),
        }
    }
    percent(&out, alias, host, user)
}

fn yes_no(d: &Directive) -> Result<bool, String> {
    match d.args[0].to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        v => Err(format!(
            "{}: {}: expected yes or no, got {v:?}",
            d.at, d.name
        )),
    }
}

fn number<T: std::str::FromStr>(d: &Directive) -> Result<T, String> {
    d.args[0]
        .parse()
        .map_err(|_| format!("{}: {}: bad number {:?}", d.at, d.name, d.args[0]))
}

/// An algorithm list we can pass on: plain names only (OpenSSH's `+`, `-`,
/// `^` edits of its own defaults have no meaning here).
fn algorithms(d: &Directive, s: &mut HostSettings) -> Option<String> {
    let v = d.args.join(",");
    if v.starts_with(['+', '-', '^']) {
        s.unsupported.push(Unsupported {
            name: format!("{} {}", d.name, v),
            at: d.at.clone(),
        });
        None
    } else {
        Some(v)
    }
}

fn apply(s: &mut HostSettings, d: &Directive, alias: &str) -> Result<(), String> {
    fn first<T>(slot: &mut Option<T>, v: impl FnOnce() -> Result<T, String>) -> Result<(), String> {
        if slot.is_none() {
            *slot = Some(v()?);
        }
        Ok(())
    }
    match d.key.as_str() {
        "hostname" => first(&mut s.hostname, || {
            Ok(d.args[0].replace("%h", alias).replace("%%", "%"))
        })?,
        "port" => first(&mut s.port, || {
            number::<u16>(d)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{}: Port: bad port {:?}", d.at, d.args[0]))
        })?,
        "user" => first(&mut s.user, || Ok(d.args[0].clone()))?,
        "identityfile" => {
            if !d.args[0].eq_ignore_ascii_case("none") {
                s.identity_files.push(expand_tilde(&d.args[0]));
            }
        }
        "identitiesonly" => first(&mut s.identities_only, || yes_no(d))?,
        "identityagent" => first(&mut s.identity_agent, || {
            let v = &d.args[0];
            Ok(if v.eq_ignore_ascii_case("none") {
                PathBuf::new()
            } else if v == "SSH_AUTH_SOCK" || v == "$SSH_AUTH_SOCK" {
                std::env::var_os("SSH_AUTH_SOCK")
                    .map(PathBuf::from)
                    .unwrap_or_default()
            } else {
                expand_tilde(v)
            })
        })?,
        "connecttimeout" => first(&mut s.connect_timeout, || number(d))?,
        "proxyjump" => first(&mut s.proxy_jump, || {
            Ok(if d.args[0].eq_ignore_ascii_case("none") {
                String::new()
            } else {
                d.args.join(",")
            })
        })?,
        "proxycommand" => first(&mut s.proxy_command, || {
            Ok(if d.raw.eq_ignore_ascii_case("none") {
                String::new()
            } else {
                d.raw.clone()
            })
        })?,
        "serveraliveinterval" => first(&mut s.server_alive_interval, || number(d))?,
        "serveralivecountmax" => first(&mut s.server_alive_count_max, || number(d))?,
        "userknownhostsfile" => first(&mut s.user_known_hosts_file, || {
            Ok(expand_tilde(&d.args[0]))
        })?,
        "stricthostkeychecking" => first(&mut s.strict_host_key_checking, || {
            match d.args[0].to_ascii_lowercase().as_str() {
                "yes" | "ask" | "true" => Ok(StrictMode::Yes),
                "accept-new" => Ok(StrictMode::AcceptNew),
                "no" | "off" | "false" => Ok(StrictMode::No),
                v => Err(format!(
                    "{}: StrictHostKeyChecking: unknown value {v:?}",
                    d.at
                )),
            }
        })?,
        "ciphers" => {
            if s.ciphers.is_none() {
                s.ciphers = algorithms(d, s);
            }
        }
        "kexalgorithms" => {
            if s.kex_algorithms.is_none() {
                s.kex_algorithms = algorithms(d, s);
            }
        }
        "macs" => {
            if s.macs.is_none() {
                s.macs = algorithms(d, s);
            }
        }
        "hostkeyalgorithms" => {
            if s.host_key_algorithms.is_none() {
                s.host_key_algorithms = algorithms(d, s);
            }
        }
        // Never prompting is all ussh does.
        "batchmode" => {}
        _ => s.unsupported.push(Unsupported {
            name: d.name.clone(),
            at: d.at.clone(),
        }),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
# top
ServerAliveInterval 15

Host web* !web13
    HostName 10.1.%h.example
    Port 2222
    User deploy
    IdentityFile ~/.ssh/web_key
    ProxyJump bastion

Host web13
    HostName=10.9.9.9
    StrictHostKeyChecking accept-new

Host \"db?\" cache
    User ops
    IdentityFile /keys/%r@%h
    Ciphers aes128-ctr,aes256-ctr
    KexAlgorithms +diffie-hellman-group1-sha1

Match exec \"true\"
    User nobody

Host *
    User fallback
    IdentityFile ~/.ssh/id_ed25519
    ConnectTimeout 7
    UserKnownHostsFile /tmp/kh %d/.ssh/kh2
    ForwardAgent yes
";

    #[test]
    fn patterns_and_first_value_wins() {
        let c = SshConfig::parse(CONFIG, "cfg").unwrap();
        let w = c.resolve("web01").unwrap();
        assert_eq!(w.hostname.as_deref(), Some("10.1.web01.example"));
        assert_eq!(w.port, Some(2222));
        assert_eq!(w.user.as_deref(), Some("deploy"));
        assert_eq!(w.server_alive_interval, Some(15));
        assert_eq!(w.connect_timeout, Some(7));
        assert_eq!(w.identity_files.len(), 2);
        assert!(w.identity_files[0].ends_with(".ssh/web_key"));
        assert_eq!(w.user_known_hosts_file, Some(PathBuf::from("/tmp/kh")));
        let names: Vec<&str> = w.unsupported.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["Match", "ForwardAgent"]);
        assert_eq!(w.proxy_jump.as_deref(), Some("bastion"));

        let n = c.resolve("web13").unwrap();
        assert_eq!(n.hostname.as_deref(), Some("10.9.9.9"));
        assert_eq!(n.port, None);
        assert_eq!(n.user.as_deref(), Some("fallback"));
        assert_eq!(n.strict_host_key_checking, Some(StrictMode::AcceptNew));

        let d = c.resolve("db1").unwrap();
        assert_eq!(d.user.as_deref(), Some("ops"));
        assert_eq!(d.identity_files[0], PathBuf::from("/keys/ops@db1"));
        assert_eq!(d.ciphers.as_deref(), Some("aes128-ctr,aes256-ctr"));
        assert_eq!(d.kex_algorithms, None);
        assert!(
            d.unsupported
                .iter()
                .any(|u| u.name.starts_with("KexAlgorithms +"))
        );

        let other = c.resolve("elsewhere").unwrap();
        assert_eq!(other.hostname, None);
        assert_eq!(other.user.as_deref(), Some("fallback"));
    }

    #[test]
    fn bad_values_name_the_line() {
        let e = SshConfig::parse("Host a\n Port abc\n", "f")
            .unwrap()
            .resolve("a")
            .unwrap_err();
        assert!(e.starts_with("f:2:"), "{e}");
        assert!(SshConfig::parse("Host\n", "f").is_err());
        let e = SshConfig::parse("Host a\n StrictHostKeyChecking maybe\n", "f")
            .unwrap()
            .resolve("a")
            .unwrap_err();
        assert!(e.contains("maybe"), "{e}");
    }

    /// Includes that once read forever or exponentially often; kept as
    /// a regression set.
    #[test]
    fn hostile_includes_are_bounded() {
        // Not a regular file: skipped with a warning, not read forever.
        let c = SshConfig::parse("Include /dev/zero\nHost a\n Port 1\n", "m").unwrap();
        assert_eq!(c.resolve("a").unwrap().port, Some(1));
        assert!(
            c.warnings[0].contains("not a regular file"),
            "{:?}",
            c.warnings
        );
        // Too large.
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let c = SshConfig::parse(&format!("Include {}\n", big.display()), "m").unwrap();
        assert!(c.warnings[0].contains("larger than"), "{:?}", c.warnings);
        // Eight levels of files, each including the next four times:
        // 4^8 reads within the depth limit, before a bound on files read.
        for level in 0..8 {
            let next = dir.path().join(format!("l{}", level + 1));
            let line = format!("Include {}\n", next.display());
            fs::write(dir.path().join(format!("l{level}")), line.repeat(4)).unwrap();
        }
        fs::write(dir.path().join("l8"), "Host x\n Port 2\n").unwrap();
        let e = SshConfig::load(&dir.path().join("l0")).unwrap_err();
        assert!(e.contains("included"), "{e}");
    }

    #[test]
    fn command_line_options_win_and_bad_ones_are_named() {
        let mut c = SshConfig::parse("Host a\n Port 1\n User u\n IdentityFile /k1\n", "f").unwrap();
        c.add_options(&[
            "Port=2".into(),
            "stricthostkeychecking accept-new".into(),
            "IdentityFile = /k0".into(),
            "UserKnownHostsFile=\"/a b/kh\"".into(),
        ])
        .unwrap();
        let s = c.resolve("a").unwrap();
        assert_eq!(s.port, Some(2));
        assert_eq!(s.user.as_deref(), Some("u"));
        assert_eq!(s.strict_host_key_checking, Some(StrictMode::AcceptNew));
        assert_eq!(
            s.identity_files,
            [PathBuf::from("/k0"), PathBuf::from("/k1")]
        );
        assert_eq!(s.user_known_hosts_file, Some(PathBuf::from("/a b/kh")));
        assert_eq!(c.resolve("other").unwrap().port, Some(2));
        let err = |o: &str| SshConfig::default().add_options(&[o.into()]).unwrap_err();
        assert!(err("ProxyJumps=b").contains("\"ProxyJumps\" is not an ssh option"));
        assert!(err("out").contains("--outdir"));
        assert!(err("Port=").contains("Port needs a value"));
        assert!(err("Port=x").contains("bad port"));
        assert!(err("StrictHostKeyChecking=maybe").contains("maybe"));
    }

    #[test]
    fn include_and_wildmatch() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.conf"), "Host inc\n Port 2201\n").unwrap();
        fs::write(dir.path().join("b.conf"), "Host inc\n Port 2202\n User b\n").unwrap();
        let main = format!("Include {}/*.conf\nHost *\n User z\n", dir.path().display());
        let c = SshConfig::parse(&main, "m").unwrap();
        let s = c.resolve("inc").unwrap();
        assert_eq!(s.port, Some(2201));
        assert_eq!(s.user.as_deref(), Some("b"));
        assert!(wildmatch("w?b*", "web01"));
        assert!(!wildmatch("w?b*", "wb01"));
        assert!(wildmatch("*", ""));
        assert!(wildmatch("*.example.*", "a.example.org"));
    }

    #[test]
    fn proxy_commands_are_kept_as_written_with_their_tokens_expanded() {
        let mut c = SshConfig::parse(
            "Host web*\n  ProxyCommand ssh -W %h:%p -l \"ops team\" bastion%%1\n",
            "cfg",
        )
        .unwrap();
        let s = c.resolve("web1").unwrap();
        let t = s.proxy_command.as_deref().unwrap();
        assert_eq!(t, "ssh -W %h:%p -l \"ops team\" bastion%%1");
        assert_eq!(
            proxy_command(t, "web1", "10.0.0.7", 2222, "deploy"),
            "ssh -W 10.0.0.7:2222 -l \"ops team\" bastion%1"
        );
        c.add_options(&["ProxyCommand=none".into()]).unwrap();
        assert_eq!(
            c.resolve("web1").unwrap().proxy_command.as_deref(),
            Some("")
        );
    }
}
