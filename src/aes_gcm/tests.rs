//! The provider against OpenSSL's AES-GCM driven the plain way (an
//! explicit IV per packet, as RFC 5647 computes it), in the parts libssh2
//! cuts packets into.

use std::ptr;

use openssl_sys as ossl;

use super::*;

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: writes at most `n` bytes into `v`.
    let got = unsafe { libc::getrandom(v.as_mut_ptr().cast(), n, 0) };
    assert_eq!(got, n as isize);
    v
}

/// OpenSSL's AES-GCM of one packet: `packet` is the length (AAD), the
/// plaintext and room for the tag; returns the length, the ciphertext and
/// the tag. The IV is the fixed part and the counter `invocation`.
fn openssl_seal(key: &[u8], fixed: &[u8], invocation: u64, packet: &[u8]) -> Vec<u8> {
    let mut iv = fixed[..4].to_vec();
    iv.extend_from_slice(&invocation.to_be_bytes());
    let body = &packet[AAD_LEN..packet.len() - TAG_LEN];
    let mut out = packet[..AAD_LEN].to_vec();
    out.resize(packet.len(), 0);
    // SAFETY: every pointer is into a live Vec of the stated length; the
    // context is freed at the end.
    unsafe {
        let ctx = ossl::EVP_CIPHER_CTX_new();
        let cipher = if key.len() == 16 {
            ossl::EVP_aes_128_gcm()
        } else {
            ossl::EVP_aes_256_gcm()
        };
        assert_eq!(
            ossl::EVP_EncryptInit_ex(ctx, cipher, ptr::null_mut(), key.as_ptr(), iv.as_ptr()),
            1
        );
        let mut n = 0;
        assert_eq!(
            ossl::EVP_EncryptUpdate(
                ctx,
                ptr::null_mut(),
                &mut n,
                packet.as_ptr(),
                AAD_LEN as i32
            ),
            1
        );
        if !body.is_empty() {
            assert_eq!(
                ossl::EVP_EncryptUpdate(
                    ctx,
                    out.as_mut_ptr().add(AAD_LEN),
                    &mut n,
                    body.as_ptr(),
                    body.len() as i32
                ),
                1
            );
        }
        assert_eq!(ossl::EVP_EncryptFinal_ex(ctx, out.as_mut_ptr(), &mut n), 1);
        let tag = out.len() - TAG_LEN;
        assert_eq!(
            ossl::EVP_CIPHER_CTX_ctrl(
                ctx,
                ossl::EVP_CTRL_GCM_GET_TAG,
                TAG_LEN as i32,
                out.as_mut_ptr().add(tag).cast()
            ),
            1
        );
        ossl::EVP_CIPHER_CTX_free(ctx);
    }
    out
}

/// The provider's state for a key and IV.
fn state(key: &[u8], iv: &[u8], encrypt: bool) -> *mut c_void {
    // SAFETY: key and IV are live slices of the lengths passed.
    let s = unsafe { init(key.as_ptr(), key.len(), iv.as_ptr(), encrypt as c_int) };
    assert!(!s.is_null());
    s
}

/// One packet through the provider in the parts `cuts` gives (offsets
/// where a part ends, the last being the packet's length), in place or
/// into a second buffer; returns the result and 0 or the failing call's
/// code.
fn run(s: *mut c_void, packet: &[u8], cuts: &[usize], in_place: bool) -> (Vec<u8>, c_int) {
    let mut src = packet.to_vec();
    let mut dest = vec![0u8; packet.len()];
    let mut start = 0;
    for (i, &end) in cuts.iter().enumerate() {
        let mut flags = 0;
        if i == 0 {
            flags |= ffi::AES_GCM_FIRST;
        }
        if i + 1 == cuts.len() {
            flags |= ffi::AES_GCM_LAST;
        }
        let out = if in_place {
            src.as_mut_ptr()
        } else {
            dest.as_mut_ptr()
        };
        // SAFETY: both buffers hold the whole packet; the part is within.
        let rc = unsafe {
            crypt(
                s,
                src.as_ptr().add(start),
                out.add(start),
                end - start,
                flags,
            )
        };
        if rc != 0 {
            return (Vec::new(), rc);
        }
        start = end;
    }
    (if in_place { src } else { dest }, 0)
}

/// Ways to cut a packet of `len` bytes: whole; libssh2's own on receive
/// (a first block of 16 bytes, the length and 12 bytes of data, then the
/// rest, or middle blocks and a last part of 4 bytes of data and the tag);
/// parts that end mid-block; parts aligned to the data's blocks.
fn cuttings(len: usize) -> Vec<Vec<usize>> {
    let mut all = vec![vec![len]];
    if len >= 16 + TAG_LEN {
        all.push(vec![16, len]);
    }
    if len >= 16 + 4 + TAG_LEN {
        all.push(vec![16, len - TAG_LEN - 4, len]);
    }
    if len >= AAD_LEN + 16 + TAG_LEN {
        all.push(vec![AAD_LEN + 16, len]);
    }
    if len >= AAD_LEN + 48 + TAG_LEN {
        all.push(vec![AAD_LEN + 16, AAD_LEN + 32, len - TAG_LEN - 16, len]);
        all.push(vec![16, 16 + 7, 16 + 7 + 21, len - TAG_LEN - 4, len]);
    }
    all
}

#[test]
fn packets_match_openssl_in_every_cutting_both_ways_and_key_size() {
    for key_len in [16, 32] {
        let key = random(key_len);
        let mut iv = random(12);
        // The counter wraps within the packets below, as RFC 5647's does.
        iv[4..].copy_from_slice(&(u64::MAX - 2).to_be_bytes());
        let enc = state(&key, &iv, true);
        let dec = state(&key, &iv, false);
        let mut invocation = u64::MAX - 2;
        for body in [0, 16, 32, 48, 64, 1024, 32768] {
            let len = AAD_LEN + body + TAG_LEN;
            let mut packet = random(len);
            packet[..AAD_LEN].copy_from_slice(&(body as u32).to_be_bytes());
            for cuts in cuttings(len) {
                for in_place in [true, false] {
                    let want = openssl_seal(&key, &iv, invocation, &packet);
                    let (sealed, rc) = run(enc, &packet, &cuts, in_place);
                    assert_eq!(rc, 0, "seal of {body} bytes, parts {cuts:?}");
                    assert!(
                        sealed == want,
                        "{key_len}-byte key, {body} bytes, parts {cuts:?}"
                    );
                    let (opened, rc) = run(dec, &sealed, &cuts, in_place);
                    assert_eq!(rc, 0, "open of {body} bytes, parts {cuts:?}");
                    assert!(opened[..len - TAG_LEN] == packet[..len - TAG_LEN]);
                    invocation = invocation.wrapping_add(1);
                }
            }
        }
        assert!(invocation < 100, "the counter wrapped");
        // SAFETY: states of `init`, freed once.
        unsafe {
            free(enc);
            free(dec);
        }
    }
}

#[test]
fn a_changed_length_body_or_tag_fails_the_packet() {
    let key = random(16);
    let iv = random(12);
    let mut packet = random(AAD_LEN + 64 + TAG_LEN);
    packet[..AAD_LEN].copy_from_slice(&64u32.to_be_bytes());
    let sealed = openssl_seal(
        &key,
        &iv,
        u64::from_be_bytes(iv[4..].try_into().unwrap()),
        &packet,
    );
    for at in [0, AAD_LEN, AAD_LEN + 40, sealed.len() - 1] {
        let mut bad = sealed.clone();
        bad[at] ^= 0x20;
        let dec = state(&key, &iv, false);
        assert_ne!(
            run(dec, &bad, &[bad.len()], false).1,
            0,
            "byte {at} changed"
        );
        // SAFETY: a state of `init`, freed once.
        unsafe { free(dec) };
    }
    let dec = state(&key, &iv, false);
    assert_eq!(run(dec, &sealed, &[sealed.len()], false).1, 0);
    // SAFETY: as above.
    unsafe { free(dec) };
}

#[test]
fn bad_keys_and_short_parts_are_refused_not_crashed_on() {
    let iv = random(12);
    for len in [0, 15, 24, 64] {
        let key = random(len.max(1));
        // SAFETY: the key holds at least `len` bytes.
        let s = unsafe { init(key.as_ptr(), len, iv.as_ptr(), 1) };
        assert!(s.is_null(), "{len}-byte key");
    }
    // SAFETY: null pointers are refused before any use.
    unsafe {
        assert!(init(ptr::null(), 16, iv.as_ptr(), 1).is_null());
        assert_eq!(
            crypt(ptr::null_mut(), ptr::null(), ptr::null_mut(), 0, 3),
            1
        );
        free(ptr::null_mut());
    }
    let key = random(16);
    let s = state(&key, &iv, true);
    let buf = [0u8; AAD_LEN + TAG_LEN - 1];
    let mut out = buf;
    // SAFETY: `len` matches both buffers.
    let rc = unsafe { crypt(s, buf.as_ptr(), out.as_mut_ptr(), buf.len(), 3) };
    assert_eq!(rc, 1, "a packet shorter than its length and tag");
    // SAFETY: a state of `init`, freed once.
    unsafe { free(s) };
}
