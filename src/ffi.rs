//! The libssh2 declarations that `libssh2-sys` lacks. Everything links
//! against the libssh2 that build.rs compiles from the sources `libssh2-sys`
//! ships (1.11.x) with `libssh2-patches/` applied.

use std::os::raw::{c_int, c_void};

pub use libssh2_sys::*;

/// `cbtype` for the send callback.
pub const LIBSSH2_CALLBACK_SEND: c_int = 5;
/// `cbtype` for the recv callback.
pub const LIBSSH2_CALLBACK_RECV: c_int = 6;

/// `cbtype` for the callback that says where libssh2 builds the next
/// packet (our patch `0014-transport-send-buffer-callback`).
pub const LIBSSH2_CALLBACK_SEND_BUFFER: c_int = 1000;

/// `unsigned char *cb(LIBSSH2_SESSION *, size_t, void **)`.
pub type SendBufferCallback =
    unsafe extern "C" fn(*mut LIBSSH2_SESSION, usize, *mut *mut c_void) -> *mut u8;

/// `cbtype` for the callback that lends libssh2 received bytes where they
/// lie (our patch `0016-transport-recv-buffer-callback`).
pub const LIBSSH2_CALLBACK_RECV_BUFFER: c_int = 1001;

/// `ssize_t cb(LIBSSH2_SESSION *, unsigned char **, void **)`.
pub type RecvBufferCallback =
    unsafe extern "C" fn(*mut LIBSSH2_SESSION, *mut *mut u8, *mut *mut c_void) -> isize;

/// `ssize_t cb(libssh2_socket_t, const void *, size_t, int, void **)`.
pub type SendCallback =
    unsafe extern "C" fn(libssh2_socket_t, *const c_void, usize, c_int, *mut *mut c_void) -> isize;
/// `ssize_t cb(libssh2_socket_t, void *, size_t, int, void **)`.
pub type RecvCallback =
    unsafe extern "C" fn(libssh2_socket_t, *mut c_void, usize, c_int, *mut *mut c_void) -> isize;

unsafe extern "C" {
    /// Sets one of the session's callbacks; returns the previous one.
    /// Present from libssh2 1.11.1.
    pub fn libssh2_session_callback_set2(
        session: *mut LIBSSH2_SESSION,
        cbtype: c_int,
        callback: *mut c_void,
    ) -> *mut c_void;

    /// `libssh2_session_init_ex` for an allocator whose first block (the
    /// session) is already zeroed: libssh2 does not clear it again. From
    /// our patch `0010-session-init-zeroed`.
    pub fn libssh2_session_init_zeroed_ex(
        my_alloc: Option<unsafe extern "C" fn(libc::size_t, *mut *mut c_void) -> *mut c_void>,
        my_free: Option<unsafe extern "C" fn(*mut c_void, *mut *mut c_void)>,
        my_realloc: Option<
            unsafe extern "C" fn(*mut c_void, libc::size_t, *mut *mut c_void) -> *mut c_void,
        >,
        abstract_: *mut c_void,
    ) -> *mut LIBSSH2_SESSION;

    /// Marks the session's transport as gone: freeing its channels then
    /// skips building and sending their EOF and CLOSE. From our patch
    /// `0011-session-set-disconnected`.
    pub fn libssh2_session_set_disconnected(session: *mut LIBSSH2_SESSION);

    /// `libssh2_channel_read_ex` without the copy: the stream's next
    /// packet's payload block (from the session's allocator) is handed
    /// over, its returned number of bytes at `*offset`. From our patch
    /// `0020-channel-read-take`.
    pub fn libssh2_channel_read_take(
        channel: *mut LIBSSH2_CHANNEL,
        stream_id: c_int,
        want: libc::size_t,
        block: *mut *mut u8,
        offset: *mut libc::size_t,
    ) -> isize;

    /// Registers the ML-KEM primitive libssh2's hybrid key exchanges use.
    /// From our patch `0012-mlkem-external-provider`.
    pub fn libssh2_mlkem_provider_set(
        keypair: extern "C" fn(c_int, *mut u8, libc::size_t, *mut u8, libc::size_t) -> c_int,
        decapsulate: extern "C" fn(
            c_int,
            *mut u8,
            libc::size_t,
            *const u8,
            libc::size_t,
            *const u8,
            libc::size_t,
        ) -> c_int,
    );

    /// Registers the application's AES-GCM for the `aes*-gcm@openssh.com`
    /// ciphers (NULL: the backend's again). From our patch
    /// `0022-aes-gcm-external-provider`.
    pub fn libssh2_aes_gcm_provider_set(provider: *const AesGcmProvider);

    /// The libssh2 version string at run time (`"1.11.2_DEV"`, …) when
    /// `required` is 0.
    pub fn libssh2_version(required: c_int) -> *const std::os::raw::c_char;
}

/// `LIBSSH2_AES_GCM_PROVIDER` of patch 0022: the state a key makes, one
/// part of a packet en- or decrypted, the state freed.
#[repr(C)]
pub struct AesGcmProvider {
    /// Key (16 or 32 bytes), 12-byte IV, encrypt: a state, or NULL.
    pub init: unsafe extern "C" fn(*const u8, libc::size_t, *const u8, c_int) -> *mut c_void,
    /// State, source, destination, length, first/last flags: 0 on success.
    pub crypt: unsafe extern "C" fn(*mut c_void, *const u8, *mut u8, libc::size_t, c_int) -> c_int,
    /// Frees a state of `init`.
    pub free: unsafe extern "C" fn(*mut c_void),
}

/// `LIBSSH2_AES_GCM_FIRST`: a packet's first part (its length is the AAD).
pub const AES_GCM_FIRST: c_int = 1;
/// `LIBSSH2_AES_GCM_LAST`: a packet's last part (ends with the tag).
pub const AES_GCM_LAST: c_int = 2;
