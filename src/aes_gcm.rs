//! AES-GCM for the `aes128-gcm@openssh.com` and `aes256-gcm@openssh.com`
//! ciphers, from AWS-LC.
//!
//! OpenSSL 3.0 (what Debian 12 ships, and what libssh2 links) runs AES-GCM
//! on 128-bit AES-NI and PCLMULQDQ: 6 GB/s on this project's machines with
//! the data in cache, and about 3.5 GB/s, a third of a client's CPU per
//! received byte, inside a transfer. AWS-LC's AES-GCM uses VAES and
//! VPCLMULQDQ on 512-bit registers where the CPU has them (12 GB/s here)
//! and AES-NI elsewhere. Patch `0022-aes-gcm-external-provider` lets the
//! application supply AES-GCM; [`register`] hands libssh2 these three
//! functions before the first session exists. Everything else stays with
//! libssh2 and OpenSSL, and so do private key files encrypted with
//! AES-GCM.
//!
//! The calls are those of libssh2's OpenSSL backend, made on AWS-LC's
//! OpenSSL-compatible `EVP_CIPHER` interface: a packet's first part moves
//! to the next IV (RFC 5647's invocation counter) and authenticates the
//! 4-byte packet length; its last part sets or checks the 16-byte tag.
//!
//! Setting `URING_SSH_AES_GCM=openssl` before the first session keeps
//! OpenSSL's AES-GCM (for measurement).

use std::os::raw::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_sys as lc;

use crate::ffi;

/// The environment variable that keeps OpenSSL's AES-GCM: `openssl`.
pub(crate) const AES_GCM_ENV: &str = "URING_SSH_AES_GCM";

/// Bytes of the packet length, authenticated but not encrypted.
const AAD_LEN: usize = 4;
/// Bytes of the tag that ends each packet.
const TAG_LEN: usize = 16;

static PROVIDER: ffi::AesGcmProvider = ffi::AesGcmProvider { init, crypt, free };

/// Registers AWS-LC's AES-GCM with libssh2, once, unless
/// [`AES_GCM_ENV`] says `openssl`; every session-creating path calls it
/// before `libssh2_session_init*`.
pub(crate) fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os(AES_GCM_ENV).is_some_and(|v| v == "openssl") {
            return;
        }
        // SAFETY: AWS-LC's one-time set-up (the CPU's features, which
        // pick the AES-GCM code); idempotent and thread-safe.
        unsafe { lc::CRYPTO_library_init() };
        // SAFETY: `PROVIDER` is 'static and its functions match patch
        // 0022's typedef; none of them unwinds (see `guard`).
        unsafe { ffi::libssh2_aes_gcm_provider_set(&PROVIDER) };
    });
}

/// States made by `init` and not yet freed.
static STATES: AtomicU64 = AtomicU64::new(0);

/// AES-GCM cipher states AWS-LC holds for libssh2: two per session whose
/// keys use AES-GCM (one each way), until the session or its next rekey
/// frees them.
pub(crate) fn states_outstanding() -> u64 {
    STATES.load(Ordering::Relaxed)
}

/// One direction's cipher state: AWS-LC's context, keyed, with the IV.
struct State {
    ctx: *mut lc::EVP_CIPHER_CTX,
    encrypt: bool,
}

impl Drop for State {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `EVP_CIPHER_CTX_new` and is freed only
        // here; freeing also clears the key schedule.
        unsafe { lc::EVP_CIPHER_CTX_free(self.ctx) };
    }
}

/// Runs `f`, mapping a panic to `on_panic` rather than unwinding into C.
fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
}

/// `init` of the provider: a state keyed with `key` (16 or 32 bytes) and
/// the initial IV, or NULL.
unsafe extern "C" fn init(
    key: *const u8,
    key_len: usize,
    iv: *const u8,
    encrypt: c_int,
) -> *mut c_void {
    guard(ptr::null_mut(), || {
        if key.is_null() || iv.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: plain constructors of static cipher descriptions.
        let cipher = unsafe {
            match key_len {
                16 => lc::EVP_aes_128_gcm(),
                32 => lc::EVP_aes_256_gcm(),
                _ => return ptr::null_mut(),
            }
        };
        // SAFETY: allocates a context; NULL on failure, checked below.
        let ctx = unsafe { lc::EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            return ptr::null_mut();
        }
        // From here `state` owns `ctx` and frees it on every exit.
        let state = State {
            ctx,
            encrypt: encrypt != 0,
        };
        // SAFETY: libssh2 passes a key of `key_len` bytes and an IV of the
        // method's 12 bytes, alive for the call; AWS-LC copies both.
        let keyed = unsafe {
            lc::EVP_CipherInit_ex(
                ctx,
                cipher,
                ptr::null_mut(),
                key,
                iv,
                state.encrypt as c_int,
            ) == 1
                && lc::EVP_CIPHER_CTX_ctrl(
                    ctx,
                    lc::EVP_CTRL_AEAD_SET_IV_FIXED as c_int,
                    -1,
                    iv.cast_mut().cast(),
                ) == 1
        };
        if !keyed {
            return ptr::null_mut();
        }
        STATES.fetch_add(1, Ordering::Relaxed);
        Box::into_raw(Box::new(state)).cast()
    })
}

/// `crypt` of the provider: one part of a packet, `len` bytes from `src`
/// to `dest` (possibly the same memory); 0 on success.
unsafe extern "C" fn crypt(
    state: *mut c_void,
    src: *const u8,
    dest: *mut u8,
    len: usize,
    firstlast: c_int,
) -> c_int {
    guard(1, || {
        if state.is_null() || src.is_null() || dest.is_null() {
            return 1;
        }
        // SAFETY: `state` came from `init` and libssh2 uses it from one
        // thread at a time (its session's); it is freed only by `free`.
        let state = unsafe { &*(state as *const State) };
        // SAFETY: libssh2 passes `len` readable bytes at `src` and `len`
        // writable bytes at `dest`, either the same memory or apart.
        if unsafe { crypt_part(state, src, dest, len, firstlast) } {
            0
        } else {
            1
        }
    })
}

/// The calls of libssh2's OpenSSL backend for one part of a packet.
///
/// # Safety
///
/// `src` is readable and `dest` writable for `len` bytes; they are the
/// same memory or do not overlap.
unsafe fn crypt_part(
    state: &State,
    src: *const u8,
    dest: *mut u8,
    len: usize,
    firstlast: c_int,
) -> bool {
    let first = firstlast & ffi::AES_GCM_FIRST != 0;
    let last = firstlast & ffi::AES_GCM_LAST != 0;
    let aad = if first { AAD_LEN } else { 0 };
    let tag = if last { TAG_LEN } else { 0 };
    let Some(body) = len.checked_sub(aad + tag) else {
        return false;
    };
    // AWS-LC reports a count as an int.
    if c_int::try_from(body).is_err() {
        return false;
    }
    let ctx = state.ctx;
    let in_place = ptr::eq(src, dest);
    // In every call below `ctx` is the state's live context, and the
    // pointers stay within the `len` bytes the caller vouches for.
    if first {
        let mut counter = [0u8; 1];
        // SAFETY: the next IV's last byte goes to `counter`; the AAD is
        // the first `AAD_LEN` of the `len` bytes.
        let ok = unsafe {
            lc::EVP_CIPHER_CTX_ctrl(
                ctx,
                lc::EVP_CTRL_GCM_IV_GEN as c_int,
                1,
                counter.as_mut_ptr().cast(),
            ) == 1
                && lc::EVP_Cipher(ctx, ptr::null_mut(), src, AAD_LEN) >= 0
        };
        if !ok {
            return false;
        }
        if !in_place {
            // SAFETY: both ranges hold at least `AAD_LEN` bytes.
            unsafe { ptr::copy_nonoverlapping(src, dest, AAD_LEN) };
        }
    }
    if last && !state.encrypt {
        // SAFETY: the tag is the last `TAG_LEN` of the `len` bytes; AWS-LC
        // copies it and never writes through the pointer.
        let set = unsafe {
            lc::EVP_CIPHER_CTX_ctrl(
                ctx,
                lc::EVP_CTRL_GCM_SET_TAG as c_int,
                TAG_LEN as c_int,
                src.add(len - TAG_LEN).cast_mut().cast(),
            ) == 1
        };
        if !set {
            return false;
        }
        if !in_place {
            // SAFETY: as above, in both ranges.
            unsafe {
                ptr::copy_nonoverlapping(src.add(len - TAG_LEN), dest.add(len - TAG_LEN), TAG_LEN)
            };
        }
    }
    // SAFETY: `body` bytes after the AAD, within both ranges.
    if body > 0 && unsafe { lc::EVP_Cipher(ctx, dest.add(aad), src.add(aad), body) } < 0 {
        return false;
    }
    if last {
        // Final: checks the tag on decryption, computes it on encryption.
        // SAFETY: no buffer is passed.
        if unsafe { lc::EVP_Cipher(ctx, ptr::null_mut(), ptr::null(), 0) } < 0 {
            return false;
        }
        if state.encrypt
            // SAFETY: the tag goes to the last `TAG_LEN` bytes of `dest`.
            && unsafe {
                lc::EVP_CIPHER_CTX_ctrl(
                    ctx,
                    lc::EVP_CTRL_GCM_GET_TAG as c_int,
                    TAG_LEN as c_int,
                    dest.add(len - TAG_LEN).cast(),
                )
            } != 1
        {
            return false;
        }
    }
    true
}

/// `free` of the provider.
unsafe extern "C" fn free(state: *mut c_void) {
    guard((), || {
        if !state.is_null() {
            // SAFETY: `state` came from `Box::into_raw` in `init`, and
            // libssh2 frees it once.
            drop(unsafe { Box::from_raw(state as *mut State) });
            STATES.fetch_sub(1, Ordering::Relaxed);
        }
    })
}

#[cfg(test)]
mod tests;
