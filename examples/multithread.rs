//! SSH from a multi-thread tokio app, both ways:
//!
//! 1. `pool.spawn(|| async { … })`: the native `!Send` API, run on a pool
//!    thread, with only the result crossing back (the fast path);
//! 2. `SessionHandle`: a `Send + Sync + Clone` handle that any task spawned
//!    with `tokio::spawn` may hold and clone (one hop per call).
//!
//! ```sh
//! cargo run --release --example multithread -- \
//!     --host 127.0.0.1 --port 22 --user "$USER" --key ~/.ssh/id_ed25519
//! ```
//!
//! Host keys are checked strictly against `~/.ssh/known_hosts` (or
//! `--known-hosts FILE`).

use std::path::PathBuf;

use tokio::io::AsyncReadExt;
use uring_ssh::{Config, Pool, PoolConfig, Session};

struct Args {
    host: String,
    port: u16,
    user: String,
    key: PathBuf,
    known_hosts: Option<PathBuf>,
}

fn args() -> Args {
    let home = std::env::var("HOME").unwrap_or_default();
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 22,
        user: std::env::var("USER").unwrap_or_else(|_| "root".into()),
        key: PathBuf::from(home).join(".ssh/id_ed25519"),
        known_hosts: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--host" => a.host = value(),
            "--port" => a.port = value().parse().unwrap_or_else(|_| usage("bad --port")),
            "--user" => a.user = value(),
            "--key" => a.key = value().into(),
            "--known-hosts" => a.known_hosts = Some(value().into()),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("{problem}");
    }
    eprintln!(
        "usage: multithread [--host 127.0.0.1] [--port 22] [--user NAME] \
         [--key ~/.ssh/id_ed25519] [--known-hosts FILE]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let config = || match &a.known_hosts {
        Some(k) => Config::new().known_hosts(Some(k)),
        None => Config::new(),
    };
    let pool = Pool::new(PoolConfig::new().threads(2))?;

    // 1. The native API on a pool thread: the session never leaves it.
    let (host, port, user, key, cfg) = (
        a.host.clone(),
        a.port,
        a.user.clone(),
        a.key.clone(),
        config(),
    );
    let native = pool.spawn(move || async move {
        let s = Session::connect(&host, port, cfg).await?;
        s.auth_pubkey_file(&user, &key, None).await?;
        let mut ch = s.exec("uname -sr").await?;
        let mut out = String::new();
        ch.read_to_string(&mut out).await?;
        ch.wait().await?;
        s.close("done").await?;
        Ok::<_, uring_ssh::Error>(out)
    });
    print!("native, on a pool thread: {}", native.await??);

    // 2. A Send handle, cloned into tasks of this multi-thread runtime.
    let ssh = pool.connect(&a.host, a.port, config()).await?;
    ssh.auth_pubkey_file(&a.user, a.key.clone(), None).await?;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let ssh = ssh.clone();
            tokio::spawn(async move {
                let (out, status) = ssh.exec(&format!("echo task {i}")).await?.output().await?;
                let listing = ssh.sftp().read_dir(".").await?;
                Ok::<_, uring_ssh::Error>((out, status.code, listing.len()))
            })
        })
        .collect();
    for t in tasks {
        let (out, code, entries) = t.await??;
        println!(
            "handle, from tokio::spawn: {} (exit {code}), {entries} entries in the home directory",
            String::from_utf8_lossy(&out).trim()
        );
    }
    ssh.close("done").await?;
    drop(ssh);
    pool.shutdown();
    Ok(())
}
