//! What every peer program shares: arguments and the figures it prints.

/// `--port P --user U --key K --cipher C --mib N --mode read|write`.
pub struct Args {
    pub port: u16,
    pub user: String,
    pub key: String,
    pub cipher: String,
    pub mib: u64,
    pub write: bool,
}

pub fn args() -> Args {
    let mut a = Args {
        port: 22,
        user: "root".into(),
        key: String::new(),
        cipher: "chacha20-poly1305@openssh.com".into(),
        mib: 1024,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--port" => a.port = v.parse().expect("port"),
            "--user" => a.user = v,
            "--key" => a.key = v,
            "--cipher" => a.cipher = v,
            "--mib" => a.mib = v.parse().expect("mib"),
            "--mode" => a.write = v == "write",
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// User and system CPU seconds of this process.
pub fn cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

/// Prints `MBps user_s_per_GiB sys_s_per_GiB` for the transfer that began
/// at `t0` with CPU `c0`.
pub fn report(t0: std::time::Instant, c0: (f64, f64), bytes: u64) {
    let secs = t0.elapsed().as_secs_f64();
    let (u, s) = cpu();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{:.1} {:.3} {:.3}",
        bytes as f64 / secs / 1e6,
        (u - c0.0) / gib,
        (s - c0.1) / gib
    );
}
