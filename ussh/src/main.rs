//! `ussh`: run a command on, fetch files from, or push files to many SSH
//! hosts at once over the `uring-ssh` library: the hosts' sessions spread
//! over the threads of a [`Pool`], each with its own ring, and the main
//! thread printing what they report.

mod cli;
mod engine;
mod jump;
mod secret;
mod ui;

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use uring_ssh::sftp::LinkPolicy;
use uring_ssh::{Config, HostKeyPolicy, MethodType, Pool, PoolConfig};
use ussh::hosts::{self, Shard, Target};
use ussh::sshconfig::{self, SshConfig, StrictMode};

use cli::{Cli, Cmd, Common, LinksArg};
use engine::{Captured, ExecOutput, Job, Op, Outcome, Plan, Status, Sudo, Transfer};
use secret::Password;
use ui::{HostLines, Ui};

/// Exit code for bad input.
const EXIT_USAGE: i32 = 2;
/// Exit code after Ctrl-C.
const EXIT_INTERRUPTED: i32 = 130;
/// Messages of output lines waiting for the main thread to print them: a
/// few, so that a host printing faster than its output is read waits
/// instead of piling up its output in memory.
const LINES_QUEUE: usize = 16;

fn main() {
    let cli = Cli::parse();
    // The environment changes only here, before any other thread starts.
    let password = match &cli.common().askpass_env {
        // SAFETY: no other thread runs yet.
        Some(var) => match unsafe { secret::take_from_env(var) } {
            Ok(p) => Some(p),
            Err(e) => std::process::exit(usage_error(&e)),
        },
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(cli, password));
    // Whatever is still in flight after an interrupt was dropped already;
    // leave without waiting for anything else but the proxy commands
    // killed here, so that none outlives ussh.
    engine::reap_all();
    std::process::exit(code);
}

/// Refuses a list naming an algorithm this build lacks, naming it.
fn check_algorithms(kind: MethodType, list: &str) -> Result<(), String> {
    let known = uring_ssh::supported_methods(kind);
    match list
        .split(',')
        .map(str::trim)
        .find(|n| !known.iter().any(|k| k == n))
    {
        Some(bad) => Err(format!(
            "{bad:?} is not supported by this build (it has: {})",
            known.join(",")
        )),
        None => Ok(()),
    }
}

/// The names of `list` this build supports, comma-joined, in order.
fn supported_subset(kind: MethodType, list: &str) -> String {
    let known = uring_ssh::supported_methods(kind);
    list.split(',')
        .map(str::trim)
        .filter(|n| known.iter().any(|k| k == n))
        .collect::<Vec<_>>()
        .join(",")
}

fn usage_error(msg: &str) -> i32 {
    eprintln!("ussh: {msg}");
    EXIT_USAGE
}

/// Gives `password` to `plan` and to its jump hosts.
fn give_password(plan: &mut Plan, password: &Arc<Password>) {
    plan.password = Some(password.clone());
    for hop in &mut plan.jumps {
        give_password(hop, password);
    }
}

async fn run(cli: Cli, password: Option<Password>) -> i32 {
    let started = std::time::SystemTime::now();
    let mut links = LinkPolicy::Keep;
    let mut follow_external_links = false;
    let mut maxrc = false;
    let mut sudo = false;
    let (common, mut op, transfer_opts, name) = match cli.cmd {
        Cmd::Exec(a) => {
            maxrc = a.maxrc;
            sudo = a.sudo;
            let collect = a.gather || a.gather_all || a.common.json;
            let max_output = match a.max_output.as_deref().map(cli::parse_size) {
                None => engine::DEFAULT_MAX_OUTPUT,
                Some(Ok(n)) => usize::try_from(n).unwrap_or(usize::MAX),
                Some(Err(e)) => return usage_error(&format!("--max-output {e}")),
            };
            let output = ExecOutput {
                max_output,
                line_cap: engine::STREAM_LINE_CAP.min(max_output),
                outdir: a.outdir,
                errdir: a.errdir,
                merge_stderr: a.gather_all,
            };
            (
                a.common,
                Op::Exec {
                    command: a.command.join(" "),
                    collect,
                    output,
                    sudo: None,
                },
                None,
                "exec",
            )
        }
        Cmd::Get(mut a) => {
            let dest = a.paths.pop().expect("clap: at least two paths");
            let remotes: Vec<PathBuf> = a.paths.iter().map(PathBuf::from).collect();
            if let Err(e) = check_get_names(&remotes) {
                return usage_error(&e);
            }
            links = match (a.safe_links, a.links) {
                (true, _) | (_, LinksArg::Safe) => LinkPolicy::Safe,
                (_, LinksArg::Skip) => LinkPolicy::Skip,
                (_, LinksArg::Keep) => LinkPolicy::Keep,
            };
            (
                a.common,
                Op::Get { remotes, dest },
                Some((a.update, a.preserve)),
                "get",
            )
        }
        Cmd::Put(mut a) => {
            let dest = a.paths.pop().expect("clap: at least two paths");
            let mut locals = Vec::new();
            for p in &a.paths {
                let path = PathBuf::from(p);
                if let Err(e) = std::fs::metadata(&path) {
                    return usage_error(&format!("local path {p}: {e}"));
                }
                locals.push(path);
            }
            follow_external_links = a.follow_external_links;
            (
                a.common,
                Op::Put { locals, dest },
                Some((a.update, a.preserve)),
                "put",
            )
        }
    };
    let gather = matches!(&op, Op::Exec { collect: true, .. }) && !common.json;

    for (flag, list, kind) in [
        ("--kex", &common.kex, MethodType::Kex),
        (
            "--ciphers",
            &common.ciphers,
            MethodType::CipherClientToServer,
        ),
    ] {
        if let Some(Err(e)) = list.as_deref().map(|l| check_algorithms(kind, l)) {
            return usage_error(&format!("{flag}: {e}"));
        }
    }
    let targets = match collect_targets(&common) {
        Ok(t) => t,
        Err(e) => return usage_error(&e),
    };
    let config = match load_config(&common) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    for w in &config.warnings {
        eprintln!("ussh: {w}");
    }
    for key in &common.identity {
        if let Err(e) = std::fs::File::open(key) {
            return usage_error(&format!("key {}: {e}", key.display()));
        }
    }
    let mut plans = match make_plans(&targets, &config, &common) {
        Ok(p) => p,
        Err(e) => return usage_error(&e),
    };
    if let Op::Exec { output, .. } = &op
        && let Err(e) = prepare_output_dirs(output, &plans)
    {
        return usage_error(&e);
    }
    if let Op::Get { .. } = &op
        && let Err(e) = check_get_labels(&plans)
    {
        return usage_error(&e);
    }

    if common.threads == Some(0) {
        return usage_error("--threads: at least 1");
    }
    // Asked for last, once the rest of the command line is known good.
    let password = match password {
        Some(p) => Some(p),
        None if common.askpass || sudo => {
            let prompt = if sudo {
                "ussh: password (login and sudo): "
            } else {
                "ussh: password: "
            };
            match secret::ask(prompt) {
                Ok(p) => Some(p),
                Err(e) => return usage_error(&e),
            }
        }
        None => None,
    };
    if let Some(p) = password.map(Arc::new) {
        for plan in &mut plans {
            give_password(plan, &p);
        }
        if sudo && let Op::Exec { sudo, .. } = &mut op {
            *sudo = Some(Sudo::new(p));
        }
    }
    let parallel = common.parallel.max(1);
    let nofile = raise_nofile_limit();
    let mut transfer = Transfer::default();
    if let Some((update, preserve)) = transfer_opts {
        transfer.skip_unchanged = update;
        transfer.preserve = preserve || update;
        transfer.links = links;
        transfer.follow_external_links = follow_external_links;
        // Keep open local files within the descriptor limit.
        let hosts_at_once = parallel.min(plans.len()).max(1) as u64;
        let per_host = nofile.saturating_sub(128) / hosts_at_once;
        transfer.max_open_files = per_host.clamp(2, 64) as usize;
    }
    let job = Job {
        op,
        transfer,
        retries: common.retries,
        timeout: common.timeout.map(Duration::from_secs_f64),
        pacing: Arc::new(engine::Pacing::new(common.per_address)),
        started,
    };
    // More threads than hosts would only start idle rings.
    let threads = common.threads.unwrap_or_else(allowed_cpus).min(plans.len());
    let pool = match Pool::new(PoolConfig::new().threads(threads)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ussh: cannot start the threads: {}", engine::describe(&e));
            return 1;
        }
    };

    let ui = Ui::new(
        plans.len(),
        transfer_opts.is_some(),
        common.quiet,
        common.json,
        common.progress,
    );
    ui.set_threads(threads);
    if let Op::Put { locals, .. } = &job.op {
        let per_host: u64 = locals.iter().map(|p| local_bytes(p)).sum();
        ui.set_total_bytes(per_host * plans.len() as u64);
    }
    let (outcomes, interrupted) = run_all(&plans, Arc::new(job), &ui, parallel, pool).await;
    ui.clear();
    if gather {
        ui::print_gathered(&outcomes);
    }
    ui::print_summary(
        name,
        &outcomes,
        transfer_opts.is_some(),
        ui.elapsed(),
        common.quiet,
    );
    if threads > 1 && !common.quiet {
        ui::print_threads(&outcomes, threads, transfer_opts.is_some());
    }
    if !common.no_pq_warning && !common.quiet {
        ui::print_pq_line(&outcomes);
    }
    if interrupted {
        eprintln!("ussh: interrupted: every session was dropped; finished hosts are listed above");
        return EXIT_INTERRUPTED;
    }
    if maxrc {
        largest_exit_code(&outcomes)
    } else if outcomes.iter().all(|o| o.status == Status::Ok) {
        0
    } else {
        1
    }
}

/// `-S`: the largest exit code of the hosts; 255, as ssh exits, for a host
/// whose command did not end with one (not reached, killed by a signal).
fn largest_exit_code(outcomes: &[Outcome]) -> i32 {
    outcomes
        .iter()
        .map(|o| o.exit_code.unwrap_or(255))
        .max()
        .unwrap_or(0)
}

/// Refuses remote paths that would land on one local name (`/a/conf` and
/// `/b/conf` both in `DEST/<host>/conf`): one would overwrite the other.
fn check_get_names(remotes: &[PathBuf]) -> Result<(), String> {
    let mut seen: BTreeMap<PathBuf, &PathBuf> = BTreeMap::new();
    for r in remotes {
        let name = engine::base_name(r);
        if let Some(first) = seen.insert(name.clone(), r) {
            return Err(format!(
                "get: {} and {} would both be written to <host>/{}; fetch them in \
                 separate runs, into different destinations",
                first.display(),
                r.display(),
                name.display()
            ));
        }
    }
    Ok(())
}

/// Checks that every host can name a file in the output directories, and
/// creates them.
/// `get` writes each host's files under a directory named after it: the
/// name must be one plain path component.
fn check_get_labels(plans: &[Plan]) -> Result<(), String> {
    let bad: Vec<String> = plans
        .iter()
        .filter_map(|p| {
            engine::file_name_problem(&p.label).map(|why| format!("{:?} ({why})", p.label))
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "get: a host's name must be a plain file name; not usable: {}",
            bad.join(", ")
        ))
    }
}

fn prepare_output_dirs(output: &ExecOutput, plans: &[Plan]) -> Result<(), String> {
    for (flag, dir) in [("--outdir", &output.outdir), ("--errdir", &output.errdir)] {
        let Some(dir) = dir else { continue };
        let bad: Vec<String> = plans
            .iter()
            .filter_map(|p| {
                engine::file_name_problem(&p.label).map(|why| format!("{:?} ({why})", p.label))
            })
            .collect();
        if !bad.is_empty() {
            return Err(format!(
                "{flag}: a host's name must be a plain file name; not usable: {}",
                bad.join(", ")
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("{flag} {}: cannot create it: {e}", dir.display()))?;
    }
    Ok(())
}

/// Runs every plan, `parallel` at a time over all of `pool`'s threads,
/// until done or Ctrl-C; on Ctrl-C every session still running is dropped
/// at once. Each host starts on the thread with the fewest hosts running;
/// what it prints and its outcome come back here, its lines always before
/// its outcome. Gathered output is held once per distinct content.
async fn run_all(
    plans: &[Plan],
    job: Arc<Job>,
    ui: &Ui,
    parallel: usize,
    pool: Pool,
) -> (Vec<Outcome>, bool) {
    let gather = matches!(job.op, Op::Exec { collect: true, .. }) && !ui.json();
    let mut distinct: HashSet<Arc<Captured>> = HashSet::new();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; plans.len()];
    let mut placed: Vec<Option<usize>> = vec![None; plans.len()];
    let mut load = vec![0usize; pool.threads()];
    let (lines_tx, mut lines) = mpsc::channel::<HostLines>(LINES_QUEUE);
    let mut next = 0;
    let mut running = FuturesUnordered::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut interrupted = false;
    // Records the end of host `i`, which ran on thread `t`: its lines
    // still queued (sent before it ended) are printed first.
    let mut finish = |i: usize, t: usize, mut o: Outcome, lines: &mut mpsc::Receiver<HostLines>| {
        while let Ok(l) = lines.try_recv() {
            ui.print_lines(&l);
        }
        o.thread = Some(t);
        ui.finished(&mut o);
        if gather {
            match distinct.get(&*o.stdout) {
                Some(same) => o.stdout = same.clone(),
                None => {
                    distinct.insert(o.stdout.clone());
                }
            }
        }
        outcomes[i] = Some(o);
    };
    loop {
        while running.len() < parallel && next < plans.len() {
            let i = next;
            next += 1;
            let t = (0..load.len()).min_by_key(|&t| load[t]).unwrap_or(0);
            load[t] += 1;
            placed[i] = Some(t);
            let plan = plans[i].clone();
            let (job, host_ui) = (job.clone(), ui.host_ui(&plan.label, &lines_tx));
            ui.started();
            let handle = pool.spawn_on(t, move || async move {
                engine::run_host(&plan, &job, &host_ui).await
            });
            running.push(handle.map(move |r| (i, t, r)));
        }
        if running.is_empty() {
            break;
        }
        // The tick first: a flood of lines must not starve the progress.
        tokio::select! {
            biased;
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
            _ = tick.tick() => ui.refresh(),
            Some((i, t, r)) = running.next() => {
                load[t] -= 1;
                match r {
                    Ok(o) => finish(i, t, o, &mut lines),
                    // A bug in a host's task stops the run as it would
                    // have on one thread.
                    Err(e) => e.resume(),
                }
            }
            Some(l) = lines.recv() => ui.print_lines(&l),
        }
    }
    // Drops every session still running, each on its own thread: each
    // teardown is immediate. Hosts that ended meanwhile keep their outcome.
    pool.shutdown();
    while let Some((i, t, r)) = running.next().await {
        if let Ok(o) = r {
            finish(i, t, o, &mut lines);
        }
    }
    while let Ok(l) = lines.try_recv() {
        ui.print_lines(&l);
    }
    let outcomes = outcomes
        .into_iter()
        .zip(plans)
        .zip(placed)
        .map(|((o, p), t)| {
            o.unwrap_or_else(|| {
                let mut o = Outcome::new(&p.label, Status::Interrupted);
                o.error = Some("interrupted".into());
                o.thread = t;
                o
            })
        })
        .collect();
    (outcomes, interrupted)
}

fn read_stdin() -> Result<String, String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| format!("reading hosts from standard input: {e}"))?;
    Ok(s)
}

fn collect_targets(c: &Common) -> Result<Vec<Target>, String> {
    let mut out = Vec::new();
    let mut stdin_used = false;
    let mut from_stdin = |out: &mut Vec<Target>| -> Result<(), String> {
        if !stdin_used {
            stdin_used = true;
            out.extend(hosts::parse_hosts_file(&read_stdin()?, "<stdin>")?);
        }
        Ok(())
    };
    for h in &c.hosts {
        if h == "-" {
            from_stdin(&mut out)?;
        } else {
            out.extend(hosts::expand(h)?);
        }
    }
    for f in &c.hosts_file {
        if f.as_os_str() == "-" {
            from_stdin(&mut out)?;
        } else {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("hosts file {}: {e}", f.display()))?;
            out.extend(hosts::parse_hosts_file(&text, &f.display().to_string())?);
        }
    }
    if c.hosts.is_empty() && c.hosts_file.is_empty() {
        if std::io::stdin().is_terminal() {
            return Err("no hosts: give -H NODESET, -f FILE, or a list on standard input".into());
        }
        from_stdin(&mut out)?;
    }
    let mut out = hosts::dedup(out);
    if !c.exclude.is_empty() {
        let mut excluded = Vec::new();
        for x in &c.exclude {
            excluded.extend(hosts::expand(x).map_err(|e| format!("-x: {e}"))?);
        }
        out = hosts::exclude(out, &excluded);
    }
    if let Some(s) = &c.shard {
        out = Shard::from_spec(s, |name| std::env::var(name).ok())?.select(out);
    }
    if out.is_empty() {
        return Err("no hosts to work on".into());
    }
    Ok(out)
}

fn load_config(c: &Common) -> Result<SshConfig, String> {
    let mut config = load_config_files(c)?;
    config.add_options(&c.options)?;
    Ok(config)
}

fn load_config_files(c: &Common) -> Result<SshConfig, String> {
    match &c.config {
        Some(p) if p.as_os_str() == "none" => Ok(SshConfig::default()),
        Some(p) => {
            if !p.exists() {
                return Err(format!("-F {}: no such file", p.display()));
            }
            SshConfig::load(p)
        }
        None => SshConfig::load(&sshconfig::home().join(".ssh/config")),
    }
}

/// The plan of one host (or, with `hop`, of a jump host on the way to
/// one: `-l` and `-p` are the destination's only), counting the config
/// directives it met that ussh does not support.
fn plan_for(
    t: &Target,
    cfg: &SshConfig,
    c: &Common,
    hop: bool,
    unsupported: &mut BTreeMap<String, (String, usize)>,
) -> Result<Plan, String> {
    let home = sshconfig::home();
    let s = cfg.resolve(&t.host)?;
    for u in &s.unsupported {
        unsupported
            .entry(u.name.clone())
            .or_insert_with(|| (u.at.clone(), 0))
            .1 += 1;
    }
    let user = t
        .user
        .clone()
        .or_else(|| c.user.clone().filter(|_| !hop))
        .or_else(|| s.user.clone())
        .unwrap_or_else(sshconfig::local_user);
    let port = t.port.or(c.port.filter(|_| !hop)).or(s.port).unwrap_or(22);
    let hostname = s.hostname.clone().unwrap_or_else(|| t.host.clone());
    let connect_timeout = c
        .connect_timeout
        .map(Duration::from_secs_f64)
        .or(s.connect_timeout.map(Duration::from_secs))
        .unwrap_or(Duration::from_secs(30));
    let op_timeout = Duration::from_secs(60).max(connect_timeout);
    let keepalive = match s.server_alive_interval {
        Some(0) => None,
        Some(n) => Some(Duration::from_secs(n)),
        None => Some(Duration::from_secs(30)),
    };
    let policy = match s.strict_host_key_checking {
        None | Some(StrictMode::Yes) => HostKeyPolicy::Strict,
        Some(StrictMode::AcceptNew) => HostKeyPolicy::AcceptNew,
        Some(StrictMode::No) => HostKeyPolicy::InsecureAcceptAny,
    };
    let known_hosts = s
        .user_known_hosts_file
        .clone()
        .unwrap_or_else(|| home.join(".ssh/known_hosts"));
    let mut config = Config::new()
        .connect_timeout(connect_timeout)
        .timeout(Some(op_timeout))
        .keepalive(keepalive, s.server_alive_count_max.unwrap_or(3))
        .known_hosts(Some(known_hosts.clone()))
        .host_key_policy(policy);
    // Lists from an ssh config were written for OpenSSH, whose
    // algorithms we may lack (sntrup761…): those names are left out,
    // and a list left empty blocks the host with a line naming it.
    let mut no_algorithm = None;
    let mut known = |what: &str, kind: MethodType, list: &str| {
        let kept = supported_subset(kind, list);
        if kept.is_empty() {
            no_algorithm.get_or_insert(format!(
                "{what} {list}: none of these is supported by this build"
            ));
        }
        kept
    };
    if let Some(v) = &c.ciphers {
        config = config.ciphers(v);
    } else if let Some(v) = &s.ciphers {
        config = config.ciphers(&known("Ciphers", MethodType::CipherClientToServer, v));
    }
    if let Some(v) = &c.kex {
        config = config.method(MethodType::Kex, v.clone());
    } else if let Some(v) = &s.kex_algorithms {
        config = config.method(MethodType::Kex, known("KexAlgorithms", MethodType::Kex, v));
    }
    if let Some(v) = &s.macs {
        let v = known("MACs", MethodType::MacClientToServer, v);
        config = config
            .method(MethodType::MacClientToServer, v.clone())
            .method(MethodType::MacServerToClient, v);
    }
    if let Some(v) = &s.host_key_algorithms {
        config = config.method(
            MethodType::HostKey,
            known("HostKeyAlgorithms", MethodType::HostKey, v),
        );
    }
    let mut identities: Vec<PathBuf> = c.identity.clone();
    identities.extend(s.identity_files.iter().cloned());
    let explicit = !identities.is_empty();
    if !explicit {
        for k in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let p = home.join(".ssh").join(k);
            if p.exists() {
                identities.push(p);
            }
        }
    }
    let agent = if c.no_agent || (s.identities_only == Some(true) && explicit) {
        None
    } else {
        match &s.identity_agent {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(Some(p.clone())),
            None if std::env::var_os("SSH_AUTH_SOCK").is_some() => Some(None),
            None => None,
        }
    };
    let blocked = no_algorithm;
    // Jump hosts: -J, else the config's ProxyJump; either wins over a
    // ProxyCommand. The hops are planned without jumps of their own; the
    // first hop's own ProxyJump is followed by `jump_plans`.
    let jump_spec = if hop {
        None
    } else {
        c.jump.clone().or_else(|| s.proxy_jump.clone())
    };
    let jumps = match &jump_spec {
        Some(spec) => jump_plans(spec, cfg, c, unsupported, &mut vec![t.host.clone()])?,
        None => Vec::new(),
    };
    let proxy_command = match (&jump_spec, s.proxy_command.as_deref()) {
        (Some(_), _) | (None, None) => None,
        (None, Some(cmd)) => Some(sshconfig::proxy_command(
            cmd,
            &t.to_string(),
            &hostname,
            port,
            &user,
        )),
    };
    Ok(Plan {
        label: t.to_string(),
        hostname,
        port,
        user,
        config,
        connect_timeout,
        identities,
        agent,
        blocked,
        known_hosts,
        proxy_command,
        jumps,
        password: None,
    })
}

/// Jump hosts a path may hold, its hops' own `ProxyJump`s included.
const MAX_JUMPS: usize = 16;

/// The hops of a `-J`/`ProxyJump` list, in the order they are connected.
/// As with OpenSSH, the first hop is reached through its own `ProxyJump`,
/// if its config has one (recursively); a later hop is reached through the
/// hops before it in the list, whatever its config says. `path` holds the
/// hosts this path already reaches through, to refuse a loop.
fn jump_plans(
    spec: &str,
    cfg: &SshConfig,
    c: &Common,
    unsupported: &mut BTreeMap<String, (String, usize)>,
    path: &mut Vec<String>,
) -> Result<Vec<Plan>, String> {
    let mut jumps = Vec::new();
    let hops = spec.split(',').map(str::trim).filter(|h| !h.is_empty());
    for (i, h) in hops.enumerate() {
        let hop_target = Target::parse(h).map_err(|e| format!("jump host {h:?}: {e}"))?;
        if i == 0
            && let Some(own) = cfg.resolve(&hop_target.host)?.proxy_jump
            && !own.is_empty()
        {
            if path.contains(&hop_target.host) {
                return Err(format!(
                    "jump host {h:?}: its ProxyJump leads back to itself ({} -> {})",
                    path.join(" -> "),
                    hop_target.host
                ));
            }
            path.push(hop_target.host.clone());
            jumps.extend(jump_plans(&own, cfg, c, unsupported, path)?);
        }
        jumps.push(plan_for(&hop_target, cfg, c, true, unsupported)?);
        if jumps.len() > MAX_JUMPS {
            return Err(format!(
                "jump host {h:?}: the path has more than {MAX_JUMPS} jump hosts"
            ));
        }
    }
    Ok(jumps)
}

fn make_plans(targets: &[Target], cfg: &SshConfig, c: &Common) -> Result<Vec<Plan>, String> {
    let mut unsupported: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut plans = Vec::with_capacity(targets.len());
    for t in targets {
        plans.push(plan_for(t, cfg, c, false, &mut unsupported)?);
    }
    if !unsupported.is_empty() {
        let list: Vec<String> = unsupported
            .iter()
            .map(|(name, (at, n))| {
                format!("{name} ({at}, {n} host{})", if *n == 1 { "" } else { "s" })
            })
            .collect();
        eprintln!(
            "ussh: ssh config directives not supported (ignored): {}",
            list.join(", ")
        );
    }
    Ok(plans)
}

/// Bytes of the regular files at or under `path` (symbolic links followed,
/// as `put` does).
fn local_bytes(path: &std::path::Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| local_bytes(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    }
}

/// Raises the soft limit on open files to the hard limit (every session
/// is a socket, and transfers keep files open); returns the limit in force.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct; raising the soft limit
        // up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// The CPUs this process may run on (as the pool counts them by default).
fn allowed_cpus() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel writes at
    // most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        (libc::CPU_COUNT(&set) as usize).max(1)
    }
}
