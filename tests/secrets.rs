//! Secrets never show: a password, a key passphrase, a keyboard-interactive
//! answer or an in-memory private key appears in no error (`Display`,
//! `Debug`, or as an `io::Error`) and in no `Debug` of what they passed
//! through, after the auth calls against a real sshd, failed or not.
//!
//! No config or option struct of the crate holds a secret: secrets are
//! arguments of the auth calls, copied only for the call (the copies are
//! wiped; see the unit tests of the session module). The [`Session`] they
//! pass through is the struct whose `Debug` is checked here.

use std::time::Duration;

use uring_ssh::{Config, Error, Session};
use uring_ssh_testkit::sshd::*;

/// Upper bound on any single test body: a hang fails the test instead of
/// blocking the run.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Wrong secrets, distinctive enough that no message holds them by chance.
const WRONG_PASSWORD: &str = "wrong-Pa55word-never-shown";
const WRONG_PASSPHRASE: &str = "wrong-Pa55phrase-never-shown";
const WRONG_ANSWER: &str = "wrong-Answer-never-shown";

fn config(sshd: &Sshd) -> Config {
    Config::new()
        .known_hosts(Some(sshd.known_hosts()))
        .timeout(Some(Duration::from_secs(20)))
}

async fn connect(sshd: &Sshd) -> Session {
    Session::connect_addr(sshd.addr(), config(sshd))
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e} ({e:?})", sshd.addr()))
}

async fn guarded<F: std::future::Future<Output = T>, T>(what: &str, f: F) -> T {
    tokio::time::timeout(HANG_GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {HANG_GUARD:?} (hang)"))
}

/// Every secret the fixture knows, and the wrong ones the tests offer.
fn all_secrets() -> Vec<&'static str> {
    vec![
        TEST_PASSWORD,
        KEY_PASSPHRASE,
        WRONG_PASSWORD,
        WRONG_PASSPHRASE,
        WRONG_ANSWER,
    ]
}

/// Asserts no secret of `secrets` appears in `text`.
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} shows a secret ({secret:?}): {text}"
        );
    }
}

/// Asserts no secret appears in the error's `Display`, `Debug` (plain and
/// pretty), nor in the `io::Error` made of it.
fn assert_error_clean(what: &str, err: Error, secrets: &[&str]) {
    for text in [err.to_string(), format!("{err:?}"), format!("{err:#?}")] {
        assert_clean(what, &text, secrets);
    }
    let io: std::io::Error = err.into();
    for text in [io.to_string(), format!("{io:?}")] {
        assert_clean(&format!("{what} (as io::Error)"), &text, secrets);
    }
}

fn assert_session_clean(what: &str, session: &Session, secrets: &[&str]) {
    for text in [format!("{session:?}"), format!("{session:#?}")] {
        assert_clean(&format!("{what}: Session"), &text, secrets);
    }
}

/// The base64 lines of a private key file: no message may hold any of them.
fn key_body_lines(key: &str) -> Vec<&str> {
    key.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn password_never_shows() {
    require_test_user();
    let sshd = Sshd::builder().password_auth(true).start();
    guarded("password", async {
        let session = connect(&sshd).await;
        let err = session
            .auth_password(TEST_USER, WRONG_PASSWORD)
            .await
            .expect_err("a wrong password must be refused");
        assert!(err.is_auth_failure(), "{err} ({err:?})");
        assert_session_clean("after a wrong password", &session, &all_secrets());
        assert_error_clean("wrong password", err, &all_secrets());
        session
            .auth_password(TEST_USER, TEST_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("auth_password: {e}"));
        assert!(session.authenticated());
        assert_session_clean("after the right password", &session, &all_secrets());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn key_file_passphrase_never_shows() {
    let sshd = Sshd::start();
    guarded("key file passphrase", async {
        let session = connect(&sshd).await;
        let err = session
            .auth_pubkey_file(
                &sshd.user(),
                &sshd.user_key_encrypted(),
                Some(WRONG_PASSPHRASE),
            )
            .await
            .expect_err("a wrong passphrase must not authenticate");
        assert_eq!(
            err.ssh_code(),
            Some(libssh2_sys::LIBSSH2_ERROR_FILE),
            "{err} ({err:?})"
        );
        assert_session_clean("after a wrong passphrase", &session, &all_secrets());
        assert_error_clean("wrong passphrase (key file)", err, &all_secrets());
        // A passphrase libssh2 cannot take (inner NUL) is refused before
        // any copy reaches libssh2, without echoing it.
        let with_nul = format!("{WRONG_PASSPHRASE}\0{KEY_PASSPHRASE}");
        let err = session
            .auth_pubkey_file(&sshd.user(), &sshd.user_key_encrypted(), Some(&with_nul))
            .await
            .expect_err("a passphrase with a NUL byte must be refused");
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
        assert_error_clean("passphrase with a NUL byte", err, &all_secrets());
        session
            .auth_pubkey_file(
                &sshd.user(),
                &sshd.user_key_encrypted(),
                Some(KEY_PASSPHRASE),
            )
            .await
            .unwrap_or_else(|e| panic!("auth with the right passphrase: {e}"));
        assert!(session.authenticated());
        assert_session_clean("after the right passphrase", &session, &all_secrets());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn in_memory_key_and_its_passphrase_never_show() {
    let sshd = Sshd::start();
    guarded("in-memory key", async {
        let key = std::fs::read_to_string(sshd.user_key_encrypted()).expect("read key");
        let body = key_body_lines(&key);
        assert!(!body.is_empty(), "no key body in {key}");
        let mut secrets = all_secrets();
        secrets.extend(&body);
        let session = connect(&sshd).await;
        let err = session
            .auth_pubkey_memory(&sshd.user(), &key, Some(WRONG_PASSPHRASE))
            .await
            .expect_err("a wrong passphrase must not authenticate");
        assert_eq!(
            err.ssh_code(),
            Some(libssh2_sys::LIBSSH2_ERROR_FILE),
            "{err} ({err:?})"
        );
        assert_session_clean("after a wrong passphrase", &session, &secrets);
        assert_error_clean("wrong passphrase (key in memory)", err, &secrets);
        // A key that is not one: its text must not come back either.
        let garbled = key.replace('A', "B");
        let body = key_body_lines(&garbled);
        let mut garbled_secrets = secrets.clone();
        garbled_secrets.extend(&body);
        let err = session
            .auth_pubkey_memory(&sshd.user(), &garbled, Some(KEY_PASSPHRASE))
            .await
            .expect_err("a garbled key must not authenticate");
        assert_session_clean("after a garbled key", &session, &garbled_secrets);
        assert_error_clean("garbled key in memory", err, &garbled_secrets);
        session
            .auth_pubkey_memory(&sshd.user(), &key, Some(KEY_PASSPHRASE))
            .await
            .unwrap_or_else(|e| panic!("auth_pubkey_memory: {e}"));
        assert!(session.authenticated());
        assert_session_clean("after the right passphrase", &session, &secrets);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn keyboard_interactive_answers_never_show() {
    require_test_user();
    let sshd = Sshd::builder().kbd_interactive(true).start();
    guarded("keyboard-interactive", async {
        let session = connect(&sshd).await;
        let mut asked = 0;
        let err = session
            .auth_keyboard_interactive(TEST_USER, |_, _, prompts| {
                asked += prompts.len();
                vec![WRONG_ANSWER.to_owned(); prompts.len()]
            })
            .await
            .expect_err("a wrong answer must be refused");
        assert!(asked >= 1, "the responder was never asked");
        assert!(err.is_auth_failure(), "{err} ({err:?})");
        assert_session_clean("after a wrong answer", &session, &all_secrets());
        assert_error_clean("wrong keyboard-interactive answer", err, &all_secrets());
        session
            .auth_keyboard_interactive(TEST_USER, |_, _, prompts| {
                vec![TEST_PASSWORD.to_owned(); prompts.len()]
            })
            .await
            .unwrap_or_else(|e| panic!("keyboard-interactive: {e}"));
        assert!(session.authenticated());
        assert_session_clean("after the right answer", &session, &all_secrets());
    })
    .await;
}
