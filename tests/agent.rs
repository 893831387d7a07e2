//! The agent against a real `ssh-agent` started by each test, with the
//! fixture's user key added by `ssh-add`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use uring_ssh::{Agent, Error, Session};
use uring_ssh_testkit::sshd::Sshd;
use uring_ssh_testkit::util::config;

const SSH_AGENT: &str = "/usr/bin/ssh-agent";
const SSH_ADD: &str = "/usr/bin/ssh-add";

/// An `ssh-agent -D` on a socket in its own temporary directory; killed on drop.
struct TestAgent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestAgent {
    fn start() -> TestAgent {
        for bin in [SSH_AGENT, SSH_ADD] {
            assert!(
                Path::new(bin).exists(),
                "{bin} not found: the agent tests need openssh-client; run `bash scripts/test.sh`"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(SSH_AGENT)
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {SSH_AGENT}: {e}"));
        // Until the agent accepts: it creates the socket file at bind(),
        // before listen(), and a connect in between is refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "ssh-agent did not listen on {sock:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        TestAgent {
            child,
            sock,
            _dir: dir,
        }
    }

    fn add(&self, key: &Path) {
        let out = Command::new(SSH_ADD)
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.sock)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {SSH_ADD}: {e}"));
        assert!(
            out.status.success(),
            "ssh-add {} failed: {}",
            key.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `TYPE BASE64` of a `.pub` file.
fn pub_line(private_key: &Path) -> String {
    let p = format!("{}.pub", private_key.display());
    let s = std::fs::read_to_string(&p).unwrap();
    s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

async fn unauthenticated(sshd: &Sshd) -> Session {
    Session::connect_addr(sshd.addr(), config(sshd))
        .await
        .expect("connect")
}

#[tokio::test]
async fn agent_lists_identities_and_authenticates() {
    let sshd = Sshd::start();
    let agent_proc = TestAgent::start();
    agent_proc.add(&sshd.user_key());
    agent_proc.add(&sshd.wrong_key());

    let s = unauthenticated(&sshd).await;
    let mut agent = Agent::new(&s).unwrap();
    agent
        .connect_to(&agent_proc.sock)
        .expect("connect to the agent");
    let ids = agent.identities().expect("list identities");
    assert_eq!(ids.len(), 2, "{ids:?}");
    let user = ids
        .iter()
        .find(|i| i.comment == "uring-ssh-user")
        .unwrap_or_else(|| panic!("the user key is listed: {ids:?}"));
    assert_eq!(user.key_type(), Some("ssh-ed25519"));
    assert_eq!(user.to_openssh(), pub_line(&sshd.user_key()));
    let wrong = ids.iter().find(|i| i.comment == "uring-ssh-wrong").unwrap();
    assert_eq!(wrong.to_openssh(), pub_line(&sshd.wrong_key()));

    // A key the server does not know is an authentication failure...
    let e = agent
        .authenticate(&sshd.user(), wrong)
        .await
        .expect_err("the wrong key must be refused");
    assert!(e.is_auth_failure(), "{e}");
    assert!(!s.authenticated());
    // ...and the right one works on the same session.
    agent
        .authenticate(&sshd.user(), user)
        .await
        .expect("agent authentication");
    assert!(s.authenticated());
    let mut ch = s.exec("echo via-agent").await.unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "via-agent\n");
    assert!(sshd.log().contains("Accepted publickey"), "{}", sshd.log());

    // The agent outlives a closed session harmlessly.
    s.close("bye").await.unwrap();
    assert!(matches!(agent.identities(), Err(Error::Closed(_))));
    drop(agent);
}

#[tokio::test]
async fn auth_agent_tries_each_identity() {
    let sshd = Sshd::start();
    let agent_proc = TestAgent::start();
    // The wrong key first: auth_agent must go on to the next one.
    agent_proc.add(&sshd.wrong_key());
    agent_proc.add(&sshd.user_key());
    let s = unauthenticated(&sshd).await;
    s.auth_agent_at(&sshd.user(), Some(&agent_proc.sock))
        .await
        .expect("auth_agent_at");
    assert!(s.authenticated());
}

#[tokio::test]
async fn an_empty_agent_is_an_auth_error() {
    let sshd = Sshd::start();
    let agent_proc = TestAgent::start();
    let s = unauthenticated(&sshd).await;
    let mut agent = Agent::new(&s).unwrap();
    agent.connect_to(&agent_proc.sock).unwrap();
    assert!(agent.identities().unwrap().is_empty());
    let e = s
        .auth_agent_at(&sshd.user(), Some(&agent_proc.sock))
        .await
        .expect_err("no identity, no authentication");
    assert!(e.is_auth_failure(), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(!s.authenticated());
    // A missing socket is a clear input error, not a hang.
    let e = agent
        .connect_to(Path::new("/nonexistent/agent.sock"))
        .expect_err("missing socket");
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    // An agent that went away: listing fails, nothing hangs.
    let mut agent = Agent::new(&s).unwrap();
    agent.connect_to(&agent_proc.sock).unwrap();
    drop(agent_proc);
    let t = Instant::now();
    assert!(agent.identities().is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
    // The session still authenticates another way.
    s.auth_pubkey_file(&sshd.user(), &sshd.user_key(), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn closing_the_session_first_frees_its_agent() {
    let sshd = Sshd::start();
    let agent_proc = TestAgent::start();
    agent_proc.add(&sshd.user_key());
    let s = unauthenticated(&sshd).await;
    let mut agent = Agent::new(&s).unwrap();
    agent.connect_to(&agent_proc.sock).unwrap();
    assert_eq!(agent.identities().unwrap().len(), 1);
    assert!(s.stats().libssh2_bytes > 0);
    // libssh2 frees an agent through its session: the session frees it
    // first, and the handle then reports it closed.
    s.close("bye").await.unwrap();
    let st = s.stats();
    assert_eq!((st.libssh2_bytes, st.libssh2_blocks), (0, 0), "{st:?}");
    assert!(matches!(agent.identities(), Err(Error::Closed(_))));
    assert!(matches!(
        agent.connect_to(&agent_proc.sock),
        Err(Error::Closed(_))
    ));
    drop(agent);
    assert_eq!(s.stats().libssh2_bytes, 0);
}
