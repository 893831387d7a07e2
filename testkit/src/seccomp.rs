//! A thread on which io_uring cannot be used, as in a container.

/// Runs `f` on a fresh thread on which io_uring_setup(2) fails with `errno`,
/// the way Docker's default seccomp profile (EPERM), kernel.io_uring_disabled
/// (EPERM) or a kernel without io_uring (ENOSYS) make it fail. The seccomp
/// filter is installed without TSYNC, so it binds that thread only.
pub fn on_thread_without_io_uring<T: Send + 'static>(
    errno: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let filter = [
            // A = seccomp_data.nr (offset 0). No arch check: the filter lives
            // on this test thread only, which makes native syscalls.
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
            libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: libc::SYS_io_uring_setup as u32,
            },
            stmt(
                libc::BPF_RET | libc::BPF_K,
                libc::SECCOMP_RET_ERRNO | errno as u32,
            ),
            stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and
        // affects this thread (and its future children) only.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
        assert_eq!(rc, 0, "no_new_privs: {}", std::io::Error::last_os_error());
        // SAFETY: `prog` points at `filter`, both alive for the whole call
        // (the kernel copies the program); without SECCOMP_FILTER_FLAG_TSYNC
        // the filter binds only this thread, which ends after `f`.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        assert_eq!(rc, 0, "seccomp: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread without io_uring panicked")
}
