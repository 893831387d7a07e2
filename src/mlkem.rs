//! ML-KEM (FIPS 203) for libssh2's hybrid post-quantum key exchanges.
//!
//! libssh2 has `mlkem768x25519-sha256` (OpenSSH 10's default) but takes the
//! ML-KEM primitive from OpenSSL ≥ 3.5; the OpenSSL we build against may be
//! 3.0. Patch `0012-mlkem-external-provider` lets the application supply
//! it: these two functions, backed by RustCrypto's `ml-kem`, registered once
//! before the first session exists. X25519, the exchange hash and the host
//! key signature stay in libssh2 and OpenSSL.
//!
//! The "private key" buffer libssh2 keeps between the two calls is opaque
//! to it: we store the 64-byte FIPS 203 seed `d‖z` at its start (zeroes
//! after) and expand it again to decapsulate, which costs one key
//! generation and avoids the deprecated expanded-key encoding.

use std::os::raw::{c_int, c_uchar};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use ml_kem::array::Array;
use ml_kem::kem::{Decapsulate, KeyExport};
use ml_kem::{DecapsulationKey, MlKem512, MlKem768, MlKem1024, Seed};
use zeroize::Zeroize;

use crate::ffi;

/// Bytes of the seed kept at the start of libssh2's private-key buffer.
const SEED_LEN: usize = 64;
/// Bytes of an ML-KEM shared secret.
const SHARED_LEN: usize = 32;

/// Registers the provider with libssh2; every session-creating path calls
/// it before `libssh2_session_init*`.
pub(crate) fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: both functions match the typedefs of patch 0012, are
        // 'static and never unwind (see `guard`).
        unsafe { ffi::libssh2_mlkem_provider_set(keypair, decapsulate) };
    });
}

/// Fills `buf` from the kernel's CSPRNG.
fn random(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

/// One ML-KEM parameter set: the encapsulation key for a seed, and the
/// shared secret for a seed and a ciphertext. `None` on a length mismatch.
macro_rules! parameter_set {
    ($public:ident, $shared:ident, $kem:ty) => {
        fn $public(seed: Seed, public: &mut [u8]) -> Option<()> {
            let dk = DecapsulationKey::<$kem>::from_seed(seed);
            let ek = dk.encapsulation_key().to_bytes();
            (ek.len() == public.len()).then(|| public.copy_from_slice(&ek))
        }

        fn $shared(seed: Seed, ciphertext: &[u8], shared: &mut [u8]) -> Option<()> {
            let ct = Array::try_from(ciphertext).ok()?;
            let dk = DecapsulationKey::<$kem>::from_seed(seed);
            let mut k = dk.decapsulate(&ct);
            let fits = k.len() == shared.len();
            if fits {
                shared.copy_from_slice(&k);
            }
            k.zeroize();
            fits.then_some(())
        }
    };
}

parameter_set!(public_512, shared_512, MlKem512);
parameter_set!(public_768, shared_768, MlKem768);
parameter_set!(public_1024, shared_1024, MlKem1024);

/// Runs `f` and maps it to libssh2's convention (0 success, -1 failure); a
/// panic becomes a failure rather than unwinding into C.
fn guard(f: impl FnOnce() -> Option<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Some(())) => 0,
        _ => -1,
    }
}

/// The seed at the start of libssh2's private-key buffer.
fn seed_of(private: &[u8]) -> Option<Seed> {
    Seed::try_from(private.get(..SEED_LEN)?).ok()
}

/// `libssh2_mlkem_keypair_func`: a fresh seed into `private`, its
/// encapsulation key into `public`.
extern "C" fn keypair(
    size: c_int,
    public: *mut c_uchar,
    public_len: usize,
    private: *mut c_uchar,
    private_len: usize,
) -> c_int {
    guard(|| {
        if public.is_null() || private.is_null() {
            return None;
        }
        // SAFETY: libssh2 passes two distinct buffers of the stated lengths
        // that it has just allocated; they live through this call.
        let (public, private) = unsafe {
            (
                std::slice::from_raw_parts_mut(public, public_len),
                std::slice::from_raw_parts_mut(private, private_len),
            )
        };
        private.fill(0);
        if !random(private.get_mut(..SEED_LEN)?) {
            return None;
        }
        let mut seed = seed_of(private)?;
        let done = match size {
            512 => public_512(seed, public),
            768 => public_768(seed, public),
            1024 => public_1024(seed, public),
            _ => None,
        };
        seed.zeroize();
        done
    })
}

/// `libssh2_mlkem_decapsulate_func`: the shared secret of `ciphertext`
/// for the key whose seed `keypair` stored in `private`.
extern "C" fn decapsulate(
    size: c_int,
    shared: *mut c_uchar,
    shared_len: usize,
    private: *const c_uchar,
    private_len: usize,
    ciphertext: *const c_uchar,
    ciphertext_len: usize,
) -> c_int {
    guard(|| {
        if shared.is_null() || private.is_null() || ciphertext.is_null() || shared_len != SHARED_LEN
        {
            return None;
        }
        // SAFETY: libssh2 passes its private-key buffer from `keypair`, the
        // server's ciphertext (length checked by the key exchange) and a
        // 32-byte output, each of the stated length and alive for this call.
        let (shared, private, ciphertext) = unsafe {
            (
                std::slice::from_raw_parts_mut(shared, shared_len),
                std::slice::from_raw_parts(private, private_len),
                std::slice::from_raw_parts(ciphertext, ciphertext_len),
            )
        };
        let mut seed = seed_of(private)?;
        let done = match size {
            512 => shared_512(seed, ciphertext, shared),
            768 => shared_768(seed, ciphertext, shared),
            1024 => shared_1024(seed, ciphertext, shared),
            _ => None,
        };
        seed.zeroize();
        done
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_kem::EncapsulationKey;

    /// What a server does with our public key: encapsulate to it.
    fn server_side(public: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let key = Array::try_from(public).unwrap();
        let ek = EncapsulationKey::<MlKem768>::new(&key).unwrap();
        let (ct, k) = ek.encapsulate_deterministic(&Array::from([7u8; 32]));
        (ct.to_vec(), k.to_vec())
    }

    #[test]
    fn both_sides_agree_on_the_secret_and_a_wrong_ciphertext_gives_another() {
        let mut public = vec![0u8; 1184];
        let mut private = vec![0xAAu8; 2400];
        assert_eq!(
            keypair(768, public.as_mut_ptr(), 1184, private.as_mut_ptr(), 2400),
            0
        );
        assert!(
            private[SEED_LEN..].iter().all(|&b| b == 0),
            "only the seed is kept"
        );
        let (mut ct, server_secret) = server_side(&public);
        let mut ours = [0u8; 32];
        let call = |ct: &[u8], out: &mut [u8; 32]| {
            decapsulate(
                768,
                out.as_mut_ptr(),
                32,
                private.as_ptr(),
                2400,
                ct.as_ptr(),
                ct.len(),
            )
        };
        assert_eq!(call(&ct, &mut ours), 0);
        assert_eq!(ours.to_vec(), server_secret);
        // Implicit rejection: a tampered ciphertext decapsulates, to another key.
        ct[0] ^= 1;
        let mut other = [0u8; 32];
        assert_eq!(call(&ct, &mut other), 0);
        assert_ne!(other, ours);
        // Lengths that do not fit are refused, not read past.
        assert_eq!(call(&ct[..100], &mut other), -1);
        assert_eq!(
            keypair(768, public.as_mut_ptr(), 1000, private.as_mut_ptr(), 2400),
            -1
        );
        assert_eq!(
            keypair(999, public.as_mut_ptr(), 1184, private.as_mut_ptr(), 2400),
            -1
        );
    }

    #[test]
    fn two_key_pairs_differ() {
        let mut a = vec![0u8; 1184];
        let mut b = vec![0u8; 1184];
        let mut pa = vec![0u8; 2400];
        let mut pb = vec![0u8; 2400];
        assert_eq!(keypair(768, a.as_mut_ptr(), 1184, pa.as_mut_ptr(), 2400), 0);
        assert_eq!(keypair(768, b.as_mut_ptr(), 1184, pb.as_mut_ptr(), 2400), 0);
        assert_ne!(a, b);
        assert_ne!(pa[..SEED_LEN], pb[..SEED_LEN]);
    }
}
