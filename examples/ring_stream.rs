//! One TCP stream over loopback, moved through an io_uring with one
//! socket feature on or off at a time: what each costs the thread that
//! uses the ring, apart from SSH. The measurements behind
//! `kernel-notes/io_uring.md` ("Not kept: direct descriptors, zero-copy
//! sends").
//!
//! ```sh
//! cargo run --release --example ring_stream -- --gib 2 --rounds 5
//! ```
//!
//! The ring's thread runs on core 0, the plain blocking peer on core 1.
//! One op is in flight at a time, as a session's transport has one send
//! and one receive. Modes, run in turn round by round:
//!
//! - `recv`: RECV on the socket's fd; `recv-fixed`: the same on a direct
//!   descriptor (the fd registered in the ring's file table);
//! - `send`: SEND on the fd; `send-fixed`: on a direct descriptor;
//!   `send-zc`: SEND_ZC on the fd, each buffer reused only after the
//!   kernel's notification that it let go of it.
//!
//! `--chunk` sets the ring's op size (64 KiB), `--peer-chunk` the peer's
//! reads and writes (the same by default).
//!
//! Prints the ring thread's user and system CPU seconds per GiB and MB/s,
//! medians over the rounds.

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;
use uring_ssh_testkit::util::{pin_this_thread, thread_cpu};

const MODES: [&str; 5] = ["recv", "recv-fixed", "send", "send-fixed", "send-zc"];

struct Run {
    user: f64,
    sys: f64,
    secs: f64,
}

/// Submits `sqe` and reaps until its result and, for SEND_ZC (`zc`), its
/// notification have arrived; returns the result.
///
/// # Safety
///
/// The buffer `sqe` points at must stay valid until this returns. It
/// returns only after the op's last CQE; where the ring fails, the process
/// aborts rather than unwind past an op the kernel may still write.
unsafe fn one_op(ring: &mut IoUring, sqe: squeue::Entry, zc: bool) -> i32 {
    // SAFETY: the caller keeps the buffer valid until the op's last CQE,
    // which this function waits for (see above).
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        eprintln!("submission queue full");
        std::process::abort();
    }
    let mut result = None;
    let mut notified = !zc;
    while result.is_none() || !notified {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                eprintln!("io_uring_enter: {e}");
                std::process::abort();
            }
        }
        for cqe in ring.completion() {
            if cqueue::notif(cqe.flags()) {
                notified = true;
            } else {
                result = Some(cqe.result());
                if zc && !cqueue::more(cqe.flags()) {
                    // No notification follows (the send failed).
                    notified = true;
                }
            }
        }
    }
    result.expect("a result")
}

fn run(mode: &str, bytes: u64, chunk: usize, peer_chunk: usize) -> Run {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let receiving = mode.starts_with("recv");
    let peer = std::thread::spawn(move || {
        pin_this_thread(1);
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0x5au8; peer_chunk];
        let mut left = bytes;
        while left > 0 {
            let n = if receiving {
                let want = (left as usize).min(peer_chunk);
                s.write(&buf[..want]).expect("peer write")
            } else {
                s.read(&mut buf).expect("peer read")
            };
            assert!(n > 0, "stream ended early");
            left -= n as u64;
        }
    });
    pin_this_thread(0);
    let stream = TcpStream::connect(addr).expect("connect");
    let fd = stream.as_raw_fd();
    // Declared before the ring: dropped after it, whatever happens.
    let mut buf = vec![0x33u8; chunk];
    let mut ring: IoUring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(8)
        .expect("ring");
    let fixed = mode.ends_with("-fixed");
    if fixed {
        ring.submitter().register_files(&[fd]).expect("register");
    }
    let (u0, s0) = thread_cpu();
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let want = (left as usize).min(chunk) as u32;
        let p = buf.as_mut_ptr();
        let sqe = match (receiving, fixed, mode == "send-zc") {
            (true, true, _) => opcode::Recv::new(types::Fixed(0), p, want).build(),
            (true, false, _) => opcode::Recv::new(types::Fd(fd), p, want).build(),
            (false, true, _) => opcode::Send::new(types::Fixed(0), p, want).build(),
            (false, false, true) => opcode::SendZc::new(types::Fd(fd), p, want).build(),
            (false, false, false) => opcode::Send::new(types::Fd(fd), p, want).build(),
        };
        // SAFETY: `buf` lives until the end of this function, past the
        // op's last CQE (`one_op` returns only then).
        let n = unsafe { one_op(&mut ring, sqe, mode == "send-zc") };
        assert!(n > 0, "{mode}: op failed with {n}");
        left -= n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let (u1, s1) = thread_cpu();
    drop(stream);
    peer.join().expect("peer");
    Run {
        user: (u1 - u0).as_secs_f64(),
        sys: (s1 - s0).as_secs_f64(),
        secs,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut gib = 2.0f64;
    let mut rounds = 5usize;
    let mut chunk = 64 * 1024usize;
    let mut peer_chunk = None;
    let mut modes: Vec<String> = MODES.iter().map(|m| m.to_string()).collect();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--gib" => gib = val().parse().expect("--gib"),
            "--rounds" => rounds = val().parse().expect("--rounds"),
            "--chunk" => chunk = val().parse().expect("--chunk"),
            "--peer-chunk" => peer_chunk = Some(val().parse().expect("--peer-chunk")),
            "--modes" => modes = val().split(',').map(str::to_string).collect(),
            _ => panic!(
                "unknown argument {a}: --gib G --rounds N --chunk BYTES --peer-chunk BYTES --modes a,b"
            ),
        }
    }
    assert!(rounds > 0, "--rounds must be at least 1");
    assert!(chunk > 0, "--chunk must be at least 1");
    assert!(peer_chunk != Some(0), "--peer-chunk must be at least 1");
    assert!(gib * (1u64 << 30) as f64 >= 1.0, "--gib must be positive");
    for m in &modes {
        assert!(MODES.contains(&m.as_str()), "unknown mode {m}: {MODES:?}");
    }
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    let per_gib = (1u64 << 30) as f64 / bytes as f64;
    let mut results: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, m) in modes.iter().enumerate() {
            results[i].push(run(m, bytes, chunk, peer_chunk.unwrap_or(chunk)));
        }
    }
    println!("mode         user s/GiB  sys s/GiB  cpu s/GiB     MB/s");
    for (m, runs) in modes.iter().zip(results) {
        let user = median(runs.iter().map(|r| r.user * per_gib).collect());
        let sys = median(runs.iter().map(|r| r.sys * per_gib).collect());
        let cpu = median(runs.iter().map(|r| (r.user + r.sys) * per_gib).collect());
        let mbs = median(runs.iter().map(|r| bytes as f64 / r.secs / 1e6).collect());
        println!("{m:<12} {user:>10.3} {sys:>10.3} {cpu:>10.3} {mbs:>8.0}");
    }
}
