//! SCP: one file to or from the server, as [`ScpWriter`] (`AsyncWrite`)
//! and [`ScpReader`] (`AsyncRead`).
//!
//! The SCP protocol (the remote `scp -t` sink or `scp -f` source, the same
//! exchange `scp -O` uses) runs here over an ordinary session channel
//! rather than through libssh2's `libssh2_scp_send64`/`libssh2_scp_recv2`,
//! for three reasons read off libssh2's `src/scp.c`:
//!
//! * on any error (a missing remote file included) libssh2 frees the
//!   channel in a loop `while(libssh2_channel_free(ch) == EAGAIN);`. With
//!   our non-blocking callbacks the free waits for the server's CLOSE,
//!   which only the ring can bring in, on this very thread: the loop would
//!   spin forever whenever the CLOSE has not arrived yet;
//! * the server's error text (`scp: /x: No such file or directory`) is read
//!   and thrown away: libssh2 only reports "Failed to recv file";
//! * libssh2 keeps a half-done SCP start in the session (`scpSend_state`,
//!   `scpRecv_state`) on top of the channel open.
//!
//! Here the channel open queues with the session's other opens (see
//! [`Session::channel_session`]), and everything after it belongs to the
//! channel alone. Dropping an [`ScpWriter`] or [`ScpReader`] half-way drops
//! its channel, whose close the session finishes in the background.
//!
//! What the remote scp sends is bounded before it is used: a header or
//! error line is at most [`MAX_LINE`] bytes ([`Error::LimitExceeded`]
//! beyond), a `C` line must carry 1 to 4 octal digits of mode (at most
//! `0o7777`), a size in decimal digits of at most `i64::MAX` (`off_t`, what
//! a file can hold; [`Error::LimitExceeded`] beyond) and a name, and one
//! `T` line at most may come before it. The size is only counted down as
//! bytes arrive: nothing is allocated for it. The name in the `C` line is
//! not used. Text from the remote scp that ends up in an error is cut to
//! 1 KiB and has its control characters escaped.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::channel::Channel;
use crate::error::{Error, InvalidInput, Result};
use crate::session::Session;

/// Longest header or error line accepted from the remote scp: room for a
/// `PATH_MAX` path and the rest of a line (OpenSSH's scp reads header lines
/// into 2 KiB, libssh2's into 256 bytes).
const MAX_LINE: usize = 8 * 1024;

/// Largest file size accepted from the remote scp: `off_t`'s maximum.
const MAX_SIZE: u64 = i64::MAX as u64;

/// The error for a line from the remote scp that exceeds [`MAX_LINE`].
fn overlong_line() -> Error {
    Error::LimitExceeded {
        what: "a line from the remote scp",
        limit: MAX_LINE as u64,
    }
}

/// What the server reported about a file sent by [`Session::scp_recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScpStat {
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`0o644`, …).
    pub mode: u32,
    /// Last modification, seconds since the Unix epoch.
    pub mtime: u64,
    /// Last access, seconds since the Unix epoch.
    pub atime: u64,
}

/// `path` quoted for a POSIX shell.
fn shell_quote(path: &str) -> String {
    format!("'{}'", path.replace('\'', "'\\''"))
}

/// An error line (`\x01` warning or `\x02` fatal) from the remote scp.
fn remote_error(text: &str) -> Error {
    let text = crate::session::remote_text(text.trim_end().as_bytes());
    let text = text.as_str();
    let kind = if text.contains("No such file or directory") {
        io::ErrorKind::NotFound
    } else if text.contains("Permission denied") {
        io::ErrorKind::PermissionDenied
    } else {
        io::ErrorKind::Other
    };
    Error::Io(io::Error::new(kind, format!("remote scp: {text}")))
}

fn protocol_error(what: String) -> Error {
    Error::scp_protocol(what)
}

/// Reads one line (without its `\n`) from the remote scp.
async fn read_line(ch: &mut Channel) -> Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if ch.read(&mut byte).await? == 0 {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        if byte[0] == b'\n' {
            return Ok(Some(line));
        }
        if line.len() >= MAX_LINE {
            return Err(overlong_line());
        }
        line.push(byte[0]);
    }
}

/// The remote scp ended without a word on stdout: its stderr (or exit
/// status) says why, e.g. when `scp` is not installed on the server.
async fn ended_early(ch: &mut Channel) -> Error {
    let mut err = Vec::new();
    let _ = (&mut ch.stderr())
        .take(MAX_LINE as u64)
        .read_to_end(&mut err)
        .await;
    let text = crate::session::remote_text(err.trim_ascii());
    let status = ch.exit_status().map(|s| s.code).unwrap_or(0);
    Error::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        if text.is_empty() {
            format!("the remote scp ended without answering (exit status {status})")
        } else {
            format!("the remote scp ended without answering: {text}")
        },
    ))
}

/// Waits for the remote scp's answer to the last step: `\0` is success.
async fn read_ack(ch: &mut Channel) -> Result<()> {
    let mut b = [0u8; 1];
    if ch.read(&mut b).await? == 0 {
        return Err(ended_early(ch).await);
    }
    match b[0] {
        0 => Ok(()),
        1 | 2 => {
            let line = read_line(ch).await?.unwrap_or_default();
            Err(remote_error(&String::from_utf8_lossy(&line)))
        }
        other => Err(protocol_error(format!(
            "unexpected byte {other:#04x} from the remote scp"
        ))),
    }
}

impl Session {
    /// Sends one file to `path` on the server with SCP: returns a writer
    /// that takes exactly `size` bytes. `mode` gives the permission bits;
    /// with `times` (`(mtime, atime)`, seconds since the epoch) the remote
    /// scp runs with `-p` and sets both times and the exact mode (without,
    /// the server's umask applies to a new file). If `path` is a directory,
    /// the file goes into it under its last path component.
    ///
    /// Finish with [`ScpWriter::finish`] (or `shutdown`): only then is the
    /// file complete on the server. The channel open queues with the
    /// session's other opens; the start (open, command, header) runs under
    /// the per-operation timeout.
    pub async fn scp_send(
        &self,
        path: &str,
        mode: u32,
        size: u64,
        times: Option<(u64, u64)>,
    ) -> Result<ScpWriter> {
        if let Some(byte) = path.bytes().find(|&b| b == b'\n' || b == 0) {
            return Err(Error::InvalidInput(InvalidInput::ForbiddenByte {
                what: "scp path".into(),
                byte,
            }));
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        if name.is_empty() {
            return Err(Error::InvalidInput(InvalidInput::Path {
                path: format!("scp path {path:?}"),
                problem: "names no file",
            }));
        }
        self.inner
            .with_timeout("scp send", async {
                let mut ch = self.channel_session().await?;
                let p = if times.is_some() { "-p " } else { "" };
                ch.exec(&format!("scp {p}-t -- {}", shell_quote(path)))
                    .await?;
                read_ack(&mut ch).await?;
                if let Some((mtime, atime)) = times {
                    ch.write_all(format!("T{mtime} 0 {atime} 0\n").as_bytes())
                        .await?;
                    read_ack(&mut ch).await?;
                }
                ch.write_all(format!("C{:04o} {size} {name}\n", mode & 0o7777).as_bytes())
                    .await?;
                read_ack(&mut ch).await?;
                Ok(ScpWriter {
                    channel: ch,
                    left: size,
                    finish: Finish::Data,
                })
            })
            .await
    }

    /// Fetches one file from `path` on the server with SCP (the remote scp
    /// runs with `-p`): returns a reader of its bytes and what the server
    /// reported (size, mode, times). A missing file, a directory or a
    /// permission problem is the remote scp's own message in an
    /// [`Error::Io`] (`NotFound`, `PermissionDenied`, or `Other`). The
    /// start runs under the per-operation timeout, reading does not.
    ///
    /// What the remote scp announces is checked before use: a header or
    /// error line over 8 KiB, or a size over `i64::MAX`, fails with
    /// [`Error::LimitExceeded`]; a malformed header (mode not 1 to 4 octal
    /// digits, size not decimal digits, no name, a second `T` line) with a
    /// protocol error. Nothing is allocated from the announced size.
    pub async fn scp_recv(&self, path: &str) -> Result<(ScpReader, ScpStat)> {
        if path.contains('\0') {
            return Err(Error::InvalidInput(InvalidInput::nul("scp path")));
        }
        self.inner
            .with_timeout("scp receive", async {
                let mut ch = self.channel_session().await?;
                ch.exec(&format!("scp -p -f -- {}", shell_quote(path)))
                    .await?;
                ch.write_all(&[0]).await?;
                let mut times = None;
                loop {
                    let Some(line) = read_line(&mut ch).await? else {
                        return Err(ended_early(&mut ch).await);
                    };
                    match line.first() {
                        Some(b'T') if times.is_none() => {
                            times = Some(parse_t_line(&line)?);
                            ch.write_all(&[0]).await?;
                        }
                        Some(b'C') => {
                            let (mode, size) = parse_c_line(&line)?;
                            let (mtime, atime) = times.unwrap_or((0, 0));
                            ch.write_all(&[0]).await?;
                            ch.flush().await?;
                            let stat = ScpStat {
                                size,
                                mode,
                                mtime,
                                atime,
                            };
                            let reader = ScpReader {
                                channel: ch,
                                left: size,
                                state: RecvState::Data,
                                line: Vec::new(),
                            };
                            return Ok((reader, stat));
                        }
                        Some(1 | 2) => {
                            return Err(remote_error(&String::from_utf8_lossy(&line[1..])));
                        }
                        Some(b'D') => {
                            return Err(Error::Io(io::Error::other(format!(
                                "remote scp: {path} is a directory"
                            ))));
                        }
                        _ => return Err(bad_header(&line)),
                    }
                }
            })
            .await
    }
}

fn bad_header(line: &[u8]) -> Error {
    protocol_error(format!(
        "unexpected header from the remote scp: \"{}\"",
        crate::session::remote_text(line)
    ))
}

/// A field of decimal digits only (no sign, no spaces), as a number;
/// `None` if it holds anything else, `Some(Err)` past `u64::MAX`.
fn decimal(field: &[u8]) -> Option<std::result::Result<u64, ()>> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in field {
        match v
            .checked_mul(10)
            .and_then(|v| v.checked_add((d - b'0') as u64))
        {
            Some(n) => v = n,
            None => return Some(Err(())),
        }
    }
    Some(Ok(v))
}

/// `C<mode> <size> <name>`: the mode and the size.
fn parse_c_line(line: &[u8]) -> Result<(u32, u64)> {
    let bad = || bad_header(line);
    let mut f = line[1..].splitn(3, |&b| b == b' ');
    let (mode, size, name) = (f.next(), f.next(), f.next());
    let mode = mode
        .filter(|m| (1..=4).contains(&m.len()) && m.iter().all(|d| (b'0'..=b'7').contains(d)))
        .map(|m| m.iter().fold(0u32, |v, d| v * 8 + (d - b'0') as u32))
        .ok_or_else(bad)?;
    let size = match size.and_then(decimal) {
        None => return Err(bad()),
        Some(Ok(n)) if n <= MAX_SIZE => n,
        Some(_) => {
            return Err(Error::LimitExceeded {
                what: "a file size announced by the remote scp",
                limit: MAX_SIZE,
            });
        }
    };
    if name.is_none_or(|n| n.is_empty()) {
        return Err(bad());
    }
    Ok((mode, size))
}

/// `T<mtime> 0 <atime> 0`: the modification and access times.
fn parse_t_line(line: &[u8]) -> Result<(u64, u64)> {
    let f: Vec<&[u8]> = line[1..].split(|&b| b == b' ').collect();
    match f[..] {
        [m, mu, a, au] => match (decimal(m), decimal(mu), decimal(a), decimal(au)) {
            (Some(Ok(m)), Some(Ok(_)), Some(Ok(a)), Some(Ok(_))) => Ok((m, a)),
            _ => Err(bad_header(line)),
        },
        _ => Err(bad_header(line)),
    }
}

#[derive(Debug)]
enum Finish {
    /// File bytes are being written.
    Data,
    /// The `\0` after the data is being written.
    Trailer,
    /// Waiting for the sink's answer; holds an error line being read.
    Ack(Option<Vec<u8>>),
    /// Sending EOF.
    Eof,
    Done,
    Failed,
}

/// Writes one file to the server ([`Session::scp_send`]). Takes exactly
/// the announced number of bytes; `shutdown` (or [`ScpWriter::finish`])
/// then waits until the remote scp has written, closed (and, with times,
/// stamped) the file.
pub struct ScpWriter {
    channel: Channel,
    left: u64,
    finish: Finish,
}

impl ScpWriter {
    /// Bytes still to be written.
    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// Completes the transfer: the end of the data, the remote scp's
    /// acknowledgement (the file is complete), EOF, and the remote scp's
    /// exit status (0 expected). Under the per-operation timeout.
    pub async fn finish(mut self) -> Result<()> {
        let session = self.channel.session();
        session
            .with_timeout("scp send finish", async {
                self.shutdown().await?;
                let status = self.channel.wait().await?;
                if !status.success() {
                    return Err(Error::Io(io::Error::other(format!(
                        "remote scp exited with status {}",
                        status.code
                    ))));
                }
                Ok(())
            })
            .await
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let ch = Pin::new(&mut self.channel);
            match &mut self.finish {
                Finish::Data => {
                    if self.left > 0 {
                        self.finish = Finish::Failed;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("scp: {} bytes fewer than announced", self.left),
                        )));
                    }
                    self.finish = Finish::Trailer;
                }
                Finish::Trailer => {
                    if ready!(ch.poll_write(cx, &[0]))? == 1 {
                        self.finish = Finish::Ack(None);
                    }
                }
                Finish::Ack(line) => {
                    let mut ch = ch;
                    ready!(ch.as_mut().poll_flush(cx))?;
                    let mut b = [0u8; 1];
                    let mut rb = ReadBuf::new(&mut b);
                    ready!(ch.poll_read(cx, &mut rb))?;
                    let got = rb.filled().first().copied();
                    match (line.as_mut(), got) {
                        (None, Some(0)) => self.finish = Finish::Eof,
                        (None, Some(1 | 2)) => *line = Some(Vec::new()),
                        (Some(l), Some(c)) if c != b'\n' && l.len() < MAX_LINE => l.push(c),
                        (Some(_), Some(c)) if c != b'\n' => {
                            self.finish = Finish::Failed;
                            return Poll::Ready(Err(overlong_line().into()));
                        }
                        (Some(l), _) => {
                            let e = remote_error(&String::from_utf8_lossy(l));
                            self.finish = Finish::Failed;
                            return Poll::Ready(Err(e.into()));
                        }
                        (None, None) => {
                            self.finish = Finish::Failed;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the remote scp ended before acknowledging the file",
                            )));
                        }
                        (None, Some(c)) => {
                            self.finish = Finish::Failed;
                            return Poll::Ready(Err(protocol_error(format!(
                                "unexpected byte {c:#04x} from the remote scp"
                            ))
                            .into()));
                        }
                    }
                }
                Finish::Eof => {
                    ready!(ch.poll_shutdown(cx))?;
                    self.finish = Finish::Done;
                }
                Finish::Done => return Poll::Ready(Ok(())),
                Finish::Failed => {
                    return Poll::Ready(Err(io::Error::other("the scp transfer failed earlier")));
                }
            }
        }
    }
}

impl AsyncWrite for ScpWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !matches!(self.finish, Finish::Data) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "scp: write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "scp: more bytes than the announced size",
            )));
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let this = &mut *self;
        let n = ready!(Pin::new(&mut this.channel).poll_write(cx, &buf[..n]))?;
        this.left -= n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.channel).poll_flush(cx)
    }

    /// Ends the data, waits for the remote scp's acknowledgement, sends EOF.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_finish(cx)
    }
}

impl std::fmt::Debug for ScpWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScpWriter")
            .field("remaining", &self.left)
            .field("state", &self.finish)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    Data,
    /// The source's status byte after the data.
    Trailer,
    /// An error line after a non-zero status byte.
    ErrorLine,
    /// Our final acknowledgement.
    Ack,
    Done,
    Failed,
}

/// Reads one file from the server ([`Session::scp_recv`]). Yields exactly
/// the announced size, then EOF once the remote scp has confirmed that it
/// read the whole file (an error it reports then is a read error).
pub struct ScpReader {
    channel: Channel,
    left: u64,
    state: RecvState,
    line: Vec<u8>,
}

impl ScpReader {
    /// Bytes of the file not read yet.
    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// After reading to the end: the remote scp's exit status (0 expected).
    /// Under the per-operation timeout.
    pub async fn finish(mut self) -> Result<()> {
        if self.left > 0 {
            return Err(Error::InvalidInput(InvalidInput::Usage(
                "scp: finish before the file was read to its end",
            )));
        }
        let session = self.channel.session();
        session
            .with_timeout("scp receive finish", async {
                let mut rest = Vec::new();
                self.read_to_end(&mut rest).await?;
                let status = self.channel.wait().await?;
                if !status.success() {
                    return Err(Error::Io(io::Error::other(format!(
                        "remote scp exited with status {}",
                        status.code
                    ))));
                }
                Ok(())
            })
            .await
    }

    fn fail(&mut self, e: Error) -> Poll<io::Result<()>> {
        self.state = RecvState::Failed;
        Poll::Ready(Err(e.into()))
    }
}

impl AsyncRead for ScpReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match this.state {
                RecvState::Data => {
                    if this.left == 0 {
                        this.state = RecvState::Trailer;
                        continue;
                    }
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let max = buf
                        .remaining()
                        .min(usize::try_from(this.left).unwrap_or(usize::MAX));
                    let dst = buf.initialize_unfilled_to(max);
                    let mut sub = ReadBuf::new(dst);
                    ready!(Pin::new(&mut this.channel).poll_read(cx, &mut sub))?;
                    let n = sub.filled().len();
                    if n == 0 {
                        return this.fail(Error::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("scp: the file ended {} bytes early", this.left),
                        )));
                    }
                    buf.advance(n);
                    this.left -= n as u64;
                    return Poll::Ready(Ok(()));
                }
                RecvState::Trailer | RecvState::ErrorLine => {
                    let mut b = [0u8; 1];
                    let mut rb = ReadBuf::new(&mut b);
                    ready!(Pin::new(&mut this.channel).poll_read(cx, &mut rb))?;
                    let got = rb.filled().first().copied();
                    match (this.state, got) {
                        (RecvState::Trailer, Some(0)) => this.state = RecvState::Ack,
                        (RecvState::Trailer, Some(1 | 2)) => this.state = RecvState::ErrorLine,
                        (RecvState::Trailer, Some(c)) => {
                            return this.fail(protocol_error(format!(
                                "unexpected byte {c:#04x} after the file from the remote scp"
                            )));
                        }
                        (RecvState::Trailer, None) => {
                            return this.fail(Error::Io(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the remote scp ended before confirming the file",
                            )));
                        }
                        (_, Some(c)) if c != b'\n' && this.line.len() < MAX_LINE => {
                            this.line.push(c)
                        }
                        (_, Some(c)) if c != b'\n' => return this.fail(overlong_line()),
                        _ => {
                            let e = remote_error(&String::from_utf8_lossy(&this.line));
                            return this.fail(e);
                        }
                    }
                }
                RecvState::Ack => {
                    if ready!(Pin::new(&mut this.channel).poll_write(cx, &[0]))? == 1 {
                        this.state = RecvState::Done;
                    }
                }
                RecvState::Done => {
                    ready!(Pin::new(&mut this.channel).poll_flush(cx))?;
                    return Poll::Ready(Ok(()));
                }
                RecvState::Failed => {
                    return Poll::Ready(Err(io::Error::other("the scp transfer failed earlier")));
                }
            }
        }
    }
}

impl std::fmt::Debug for ScpReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScpReader")
            .field("remaining", &self.left)
            .field("state", &self.state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("-x"), "'-x'");
    }

    #[test]
    fn remote_errors_map_to_kinds() {
        assert_eq!(
            remote_error("scp: /x: No such file or directory\n").kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            remote_error("scp: /root/x: Permission denied").kind(),
            io::ErrorKind::PermissionDenied
        );
        let e = remote_error("scp: /tmp: not a regular file");
        assert_eq!(e.kind(), io::ErrorKind::Other);
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn c_lines_are_validated_and_sizes_bounded() {
        assert_eq!(parse_c_line(b"C0644 12345 file").unwrap(), (0o644, 12345));
        assert_eq!(parse_c_line(b"C7777 0 a b c").unwrap(), (0o7777, 0));
        assert_eq!(
            parse_c_line(b"C0600 9223372036854775807 f").unwrap(),
            (0o600, i64::MAX as u64)
        );
        // 2^63 and past u64: the size bound, before anything uses it.
        for big in [
            &b"C0644 9223372036854775808 f"[..],
            b"C0644 99999999999999999999999 f",
        ] {
            match parse_c_line(big) {
                Err(Error::LimitExceeded { limit, what }) => {
                    assert_eq!(limit, i64::MAX as u64);
                    assert!(what.contains("size"), "{what}");
                }
                other => panic!("{other:?}"),
            }
        }
        for bad in [
            &b"C"[..],
            b"C0644",
            b"C0644 10",
            b"C0644 10 ",
            b"C06440 10 f",
            b"C0648 10 f",
            b"C+644 10 f",
            b"C0644 +10 f",
            b"C0644 -1 f",
            b"C0644 1e3 f",
            b"C 0644 10 f",
        ] {
            let e = parse_c_line(bad).expect_err(&String::from_utf8_lossy(bad));
            assert!(
                matches!(
                    e,
                    Error::Protocol {
                        protocol: crate::error::RemoteProtocol::Scp,
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn t_lines_are_validated() {
        assert_eq!(
            parse_t_line(b"T1600000000 0 1600000123 0").unwrap(),
            (1_600_000_000, 1_600_000_123)
        );
        for bad in [
            &b"T1 0 2"[..],
            b"T1 0 2 0 5",
            b"T1 0 x 0",
            b"T99999999999999999999999 0 1 0",
            b"T",
        ] {
            assert!(
                parse_t_line(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn remote_text_in_errors_is_escaped_and_capped() {
        let e = remote_error("scp: \x1b[2J\x1b]0;owned\x07: No such file or directory");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let msg = e.to_string();
        assert!(!msg.contains('\x1b') && !msg.contains('\x07'), "{msg:?}");
        assert!(msg.contains("\\x1b[2J"), "{msg}");
        let long = "x".repeat(MAX_LINE);
        assert!(remote_error(&long).to_string().len() < 1100);
        let e = bad_header(&[b'Q', 0x1b, b'[', b'H']);
        assert!(e.to_string().contains("Q\\x1b[H"), "{e}");
        assert!(matches!(
            overlong_line(),
            Error::LimitExceeded { limit, .. } if limit == MAX_LINE as u64
        ));
    }
}
