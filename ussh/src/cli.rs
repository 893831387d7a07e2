//! Command-line syntax.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run commands on, and move files to and from, many SSH hosts at once,
/// from a few threads with an io_uring ring each (no ssh or scp
/// processes).
///
/// Exit status: 0 if every host succeeded, 1 if any host failed (could not
/// connect or authenticate, a command exited non-zero or was killed, a file
/// failed), 2 for bad input, 130 if interrupted.
#[derive(Debug, Parser)]
#[command(name = "ussh", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

impl Cli {
    /// The options every subcommand has.
    pub fn common(&self) -> &Common {
        match &self.cmd {
            Cmd::Exec(a) => &a.common,
            Cmd::Get(a) => &a.common,
            Cmd::Put(a) => &a.common,
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run a command on every host.
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
    /// Fetch remote files or trees from every host into DEST/<host>/...
    #[command(after_help = GET_HELP)]
    Get(GetArgs),
    /// Push local files or trees into REMOTE_DIR on every host.
    #[command(after_help = PUT_HELP)]
    Put(PutArgs),
}

const EXEC_HELP: &str = "\
Examples:
  ussh exec -H 'web[01-64]' -- uptime                 streamed, `host: line`
  ussh exec -b -H 'web[01-64]' -x web13 -- uname -r   identical output folded
  ussh exec -B -f hosts.txt -- 'systemctl status app'  stderr in the blocks too
  ussh exec -S -q -H 'db[1-3]' -- /usr/local/bin/check  quiet; exit with the worst code
  ussh exec --json -o StrictHostKeyChecking=accept-new -H 'new[1-9]' -- id
  ussh exec --outdir out -e err -H 'web[01-64]' -- journalctl -b
  ussh exec --askpass -H 'lab[1-8]' -- uptime          password login, asked once
  ussh exec --sudo -b -H 'web[01-64]' -- systemctl restart app  as root, via sudo
  USSH_PW=... ussh exec --sudo --askpass-env USSH_PW -f hosts.txt -- id -u

--sudo runs `sudo -k -S -p PROMPT -- sh -c 'COMMAND'` on each host and
writes the password, then a newline, to its standard input: the password
is never in a command line, a log line or the output. A host where sudo
refuses it fails with `sudo refused the password`.

Exit status: 0 if every host succeeded; 1 if any failed (not reached or
authenticated, a non-zero exit code, killed by a signal, sudo refused the
password); with -S instead the largest exit code of the hosts (255 for a
host not reached or killed by a signal; sudo exits 1 when it refuses the
password); 2 for bad input (--askpass without a terminal to ask on, too);
130 if interrupted.";

const GET_HELP: &str = "\
Examples:
  ussh get -H 'web[01-64]' /var/log/app ./logs        ./logs/web01/app/...
  ussh get -H 'web[01-64]' /etc/hosts './etc/{host}'   ./etc/web01/hosts
  ussh get -u -x 'web[60-64]' -H 'web[01-64]' /srv/data ./data

Two remote paths with the same last component (/a/conf and /b/conf) would
land on one file: such a get is refused (exit status 2); fetch them into
different destinations.

Exit status: 0 if every host succeeded; 1 if any failed (not reached or
authenticated, any file failed); 2 for bad input (--askpass without a
terminal to ask on, too); 130 if interrupted.";

const PUT_HELP: &str = "\
Examples:
  ussh put -H 'web[01-64]' ./site /srv                 /srv/site on each host
  ussh put -u --preserve -f hosts.txt ./conf /etc/app  only what changed moves
  ussh put -H 'web[01-64]' ./build '/srv/{host}'

Exit status: 0 if every host succeeded; 1 if any failed (not reached or
authenticated, any file failed); 2 for bad input (--askpass without a
terminal to ask on, too); 130 if interrupted.";

/// Options every subcommand takes.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Hosts as a nodeset: `web[01-64]`, `10.0.0.[1-9]`, `a[1,3,5-7]`,
    /// `ops@db1:2222`, comma-separated; `-` reads standard input.
    /// Repeatable.
    #[arg(short = 'H', long = "hosts", value_name = "NODESET")]
    pub hosts: Vec<String>,
    /// Hosts to leave out, as a nodeset (`web[03-05]`); a host given
    /// without user or port is left out whatever user or port it has.
    /// Repeatable.
    #[arg(short = 'x', long = "exclude", value_name = "NODESET")]
    pub exclude: Vec<String>,
    /// A hosts file: one `[user@]host[:port]` per line, `#` comments;
    /// `-` is standard input. Repeatable. Without -H or -f, hosts are read
    /// from standard input when it is not a terminal.
    #[arg(short = 'f', long = "hosts-file", value_name = "FILE")]
    pub hosts_file: Vec<PathBuf>,
    /// Take only every N-th host, starting with the I-th (from 1), to split
    /// a fleet across client machines. `auto` takes I and N from a Slurm
    /// job array task (SLURM_ARRAY_TASK_ID less SLURM_ARRAY_TASK_MIN,
    /// SLURM_ARRAY_TASK_COUNT); `auto/N` takes I from a Kubernetes Indexed
    /// Job (JOB_COMPLETION_INDEX, from 0), N being its completions.
    #[arg(long, value_name = "I/N|auto|auto/N")]
    pub shard: Option<String>,
    /// The ssh client config to honour (default ~/.ssh/config; `none` for
    /// none).
    #[arg(short = 'F', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Jump hosts to reach every host through, as `ssh -J`:
    /// `[user@]host[:port]`, comma-separated, the first reached directly
    /// (each a host or alias of the ssh config). Wins over the config's
    /// `ProxyJump` and `ProxyCommand`.
    #[arg(short = 'J', long = "jump", value_name = "HOPS")]
    pub jump: Option<String>,
    /// Remote user when neither the host (`user@host`) nor the config names
    /// one.
    #[arg(short = 'l', long = "user", value_name = "USER")]
    pub user: Option<String>,
    /// Port when neither the host (`host:port`) nor the config names one.
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Option<u16>,
    /// A private key to authenticate with, tried before the config's
    /// IdentityFile. Repeatable.
    #[arg(short = 'i', value_name = "KEY")]
    pub identity: Vec<PathBuf>,
    /// An ssh_config option for every host, `Key=Value` or `'Key Value'`,
    /// winning over the config files: HostName, Port, User, IdentityFile,
    /// IdentitiesOnly, IdentityAgent, ConnectTimeout, ServerAliveInterval,
    /// ServerAliveCountMax, UserKnownHostsFile, StrictHostKeyChecking
    /// (yes, accept-new, no), Ciphers, KexAlgorithms, MACs,
    /// HostKeyAlgorithms, BatchMode. Repeatable.
    #[arg(short = 'o', value_name = "OPTION")]
    pub options: Vec<String>,
    /// Do not use the ssh-agent.
    #[arg(long)]
    pub no_agent: bool,
    /// Ask for a password once, on the terminal (/dev/tty, not echoed),
    /// before connecting, and use it on every host (jump hosts too) for
    /// password, then keyboard-interactive authentication (every prompt
    /// not echoed is answered with it), after the agent and the keys
    /// (pssh -A). It is held in memory only, wiped at exit, and never
    /// printed, logged or put in --json.
    #[arg(long)]
    pub askpass: bool,
    /// As --askpass, taking the password from the environment variable
    /// VAR instead of the terminal, for scripts and tests (ussh wipes and
    /// unsets VAR at start, so that no ProxyCommand inherits it).
    #[arg(long, value_name = "VAR")]
    pub askpass_env: Option<String>,
    /// Hosts worked on at once, over all threads.
    #[arg(
        short = 'j',
        long = "parallel",
        value_name = "N",
        default_value_t = 256
    )]
    pub parallel: usize,
    /// Threads the hosts are spread over, each with its own ring: a host
    /// starts on the thread with the fewest hosts running and stays there.
    /// Default: one per CPU this process may run on, and never more than
    /// there are hosts. -j and --per-address count over all threads.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seconds allowed for the TCP connect and the whole SSH handshake
    /// (overrides ConnectTimeout; default 30: a loaded server may take
    /// seconds to finish many key exchanges at once).
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,
    /// Seconds allowed for each host's whole job (default: no limit).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Retries after a connection-level failure (refused, reset, timed
    /// out), with exponential backoff from 0.5 s.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub retries: u32,
    /// New connections (not yet authenticated) at once per server
    /// address. Servers refuse more: Dropbear 5 per client address,
    /// sshd's MaxStartups starts dropping at 10.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub per_address: usize,
    /// Do not say in the summary how many hosts negotiated no post-quantum
    /// key exchange.
    #[arg(long)]
    pub no_pq_warning: bool,
    /// Key exchange algorithms to offer (overrides KexAlgorithms).
    #[arg(long, value_name = "LIST")]
    pub kex: Option<String>,
    /// Ciphers to offer (overrides Ciphers).
    #[arg(long, value_name = "LIST")]
    pub ciphers: Option<String>,
    /// Write one JSON record per host to standard output (host, status,
    /// exit code, bytes, files, duration, error) instead of the usual
    /// output.
    #[arg(long)]
    pub json: bool,
    /// Show progress (a bar on a terminal, one line per host otherwise)
    /// even with --json, which shows none by default.
    #[arg(long, conflicts_with = "quiet")]
    pub progress: bool,
    /// Quiet on success: no progress, no per-host lines, and a summary
    /// only of the hosts that did not succeed (nothing at all when every
    /// host did). A command's own output is still printed.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `ussh exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Hosts, config, auth and limits.
    #[command(flatten)]
    pub common: Common,
    /// Gather each host's output and print hosts with identical output
    /// once, as one block (instead of streaming `host: line`).
    #[arg(short = 'b', long)]
    pub gather: bool,
    /// As -b, with each host's stderr gathered into its block along with
    /// its stdout (clush -B).
    #[arg(short = 'B', long, conflicts_with_all = ["gather", "outdir", "errdir", "json"])]
    pub gather_all: bool,
    /// Run the command as root under `sudo -S` on every host (clush
    /// --sudo), feeding sudo the password of --askpass (asked for if
    /// neither --askpass nor --askpass-env is given) on its standard
    /// input, then the end of it: the command's own standard input is
    /// /dev/null. sudo's prompt is taken out of the output; a password
    /// sudo refuses fails the host (`sudo refused the password`), after
    /// sudo's own delay, without waiting for more input.
    #[arg(long)]
    pub sudo: bool,
    /// Exit with the largest exit code of the hosts (255 for a host whose
    /// command did not end with one: not reached, or killed by a signal;
    /// 130 still if interrupted), as clush -S and pdsh -S.
    #[arg(short = 'S', long)]
    pub maxrc: bool,
    /// Bytes of each host's stdout, and of its stderr, kept for -b and
    /// --json (default 8M; suffixes K, M, G are KiB, MiB, GiB; at least
    /// 1). Output past it is read and discarded, and reported as
    /// truncated. Streamed lines longer than 64K, or than BYTES if smaller,
    /// are printed in pieces ending in ` [line continues]`.
    #[arg(long, value_name = "BYTES")]
    pub max_output: Option<String>,
    /// Write each host's stdout, whole, to DIR/<host> instead of the
    /// terminal (DIR is created; an existing file is overwritten, but a
    /// symbolic link there is not followed: that host fails). pssh's `-o`;
    /// here `-o` is ssh's option.
    #[arg(long, value_name = "DIR", conflicts_with = "gather")]
    pub outdir: Option<PathBuf>,
    /// Write each host's stderr, whole, to DIR/<host> instead of the
    /// terminal.
    #[arg(short = 'e', long, value_name = "DIR")]
    pub errdir: Option<PathBuf>,
    /// The command (its words are joined with spaces, as ssh does).
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `ussh get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Hosts, config, auth and limits.
    #[command(flatten)]
    pub common: Common,
    /// Skip files whose size and modification time already match.
    #[arg(short = 'u', long)]
    pub update: bool,
    /// Keep modification times and permission bits.
    #[arg(long)]
    pub preserve: bool,
    /// Symbolic links in remote trees: `keep` recreates each as a link
    /// (never followed when writing), `skip` leaves them out, `safe`
    /// keeps only those that stay inside the tree.
    #[arg(long, value_enum, default_value_t = LinksArg::Keep, value_name = "POLICY")]
    pub links: LinksArg,
    /// Same as `--links safe` (rsync's name).
    #[arg(long, conflicts_with = "links")]
    pub safe_links: bool,
    /// Remote files or directories, then the local destination directory:
    /// each host's files go to DEST/<host>/, or to DEST with `{host}`
    /// replaced by the host's name if it contains `{host}`.
    #[arg(required = true, num_args = 2.., value_name = "REMOTE... DEST")]
    pub paths: Vec<String>,
}

/// `ussh put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// Hosts, config, auth and limits.
    #[command(flatten)]
    pub common: Common,
    /// Skip files whose size and modification time already match.
    #[arg(short = 'u', long)]
    pub update: bool,
    /// Keep modification times and permission bits.
    #[arg(long)]
    pub preserve: bool,
    /// Follow local symbolic links that lead outside a directory being
    /// pushed (by default they are skipped and counted in the host's
    /// line and `links_skipped` of `--json`; links
    /// inside it are followed).
    #[arg(long)]
    pub follow_external_links: bool,
    /// Local files or directories, then the remote directory they go into
    /// (created if missing; `{host}` is replaced by the host's name).
    #[arg(required = true, num_args = 2.., value_name = "LOCAL... REMOTE_DIR")]
    pub paths: Vec<String>,
}

/// `ussh get --links`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinksArg {
    /// Recreate links as links.
    Keep,
    /// Leave links out.
    Skip,
    /// Keep links that stay inside the tree.
    Safe,
}

/// Parses a byte count: digits, then optionally `K`, `M` or `G` (KiB, MiB,
/// GiB; case and a trailing `B` or `iB` ignored). Zero is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{s:?}: not a size (a number, then K, M or G)")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a size (a number, then K, M or G)"))?;
    if n == 0 {
        return Err(format!("{s:?}: must be at least 1 byte"));
    }
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("1"), Ok(1));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("8mb"), Ok(8 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
        for bad in [
            "",
            "0",
            "0K",
            "K",
            "-1",
            "1.5M",
            "8X",
            "8 MiBs",
            "1iB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("0").unwrap_err().contains("at least 1 byte"));
        assert!(
            parse_size("17179869184G")
                .unwrap_err()
                .contains("too large")
        );
    }
}
