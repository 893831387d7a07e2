//! The SFTP version 3 wire format (draft-ietf-secsh-filexfer-02) and the
//! OpenSSH extensions we use: encoding of requests, decoding of replies.
//!
//! Pure functions over byte slices, no IO: every reply parser returns a
//! [`DecodeError`] on truncated or malformed input, never panics.
//!
//! Every size the server controls is bounded before anything is allocated
//! for it: a packet's length by 4 MiB, a `NAME` reply's count by
//! the bytes that follow it, a handle by the draft's 256 bytes, a file name
//! by [`MAX_NAME_LEN`], a status message by the text kept in errors.

use super::rope::Rope;
use std::fmt;

/// Packet types.
pub(crate) mod fxp {
    pub const INIT: u8 = 1;
    pub const VERSION: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const READ: u8 = 5;
    pub const WRITE: u8 = 6;
    pub const LSTAT: u8 = 7;
    pub const FSTAT: u8 = 8;
    pub const SETSTAT: u8 = 9;
    pub const FSETSTAT: u8 = 10;
    pub const OPENDIR: u8 = 11;
    pub const READDIR: u8 = 12;
    pub const REMOVE: u8 = 13;
    pub const MKDIR: u8 = 14;
    pub const RMDIR: u8 = 15;
    pub const REALPATH: u8 = 16;
    pub const STAT: u8 = 17;
    pub const RENAME: u8 = 18;
    pub const READLINK: u8 = 19;
    pub const SYMLINK: u8 = 20;
    pub const STATUS: u8 = 101;
    pub const HANDLE: u8 = 102;
    pub const DATA: u8 = 103;
    pub const NAME: u8 = 104;
    pub const ATTRS: u8 = 105;
    pub const EXTENDED: u8 = 200;
    pub const EXTENDED_REPLY: u8 = 201;
}

pub use crate::error::sftp_status as status;
pub use crate::error::sftp_status::name as status_name;

/// Open flags (`SSH_FXF_*`).
pub(crate) mod open_flags {
    pub const READ: u32 = 0x01;
    pub const WRITE: u32 = 0x02;
    pub const APPEND: u32 = 0x04;
    pub const CREAT: u32 = 0x08;
    pub const TRUNC: u32 = 0x10;
    pub const EXCL: u32 = 0x20;
}

const ATTR_SIZE: u32 = 0x01;
const ATTR_UIDGID: u32 = 0x02;
const ATTR_PERMISSIONS: u32 = 0x04;
const ATTR_ACMODTIME: u32 = 0x08;
const ATTR_EXTENDED: u32 = 0x8000_0000;

/// The largest reply we accept; OpenSSH's server sends at most 256 KiB.
pub(crate) const MAX_PACKET: usize = 4 * 1024 * 1024;

/// The longest handle the draft allows ("MUST NOT be longer than 256
/// bytes").
pub(crate) const MAX_HANDLE_LEN: usize = 256;

/// The longest file name accepted in a `NAME` reply (a listing's entry, a
/// REALPATH or READLINK answer): `PATH_MAX`.
pub const MAX_NAME_LEN: usize = 4096;

/// The longest `ls -l`-style line accepted with a name: the name and room
/// for the columns before it.
pub const MAX_LONGNAME_LEN: usize = MAX_NAME_LEN + 1024;

/// The fewest bytes one `NAME` entry takes: two string lengths and the
/// attribute flags.
const MIN_NAME_ENTRY: usize = 4 + 4 + 4;

/// Entries reserved up front for a `NAME` reply; more grow as they parse.
const NAME_RESERVE: usize = 256;

/// File attributes: each field is present only if the server sent it (or,
/// in a request, only if it should be changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileAttributes {
    /// Size in bytes.
    pub size: Option<u64>,
    /// Owner user id.
    pub uid: Option<u32>,
    /// Owner group id.
    pub gid: Option<u32>,
    /// Mode bits: file type and permissions as in `st_mode`.
    pub permissions: Option<u32>,
    /// Last access time, seconds since the epoch.
    pub atime: Option<u32>,
    /// Last modification time, seconds since the epoch.
    pub mtime: Option<u32>,
}

/// The file type bits of `st_mode`.
const S_IFMT: u32 = 0o170000;

impl FileAttributes {
    /// Whether the mode says directory.
    pub fn is_dir(&self) -> bool {
        self.permissions.is_some_and(|p| p & S_IFMT == 0o040000)
    }

    /// Whether the mode says regular file.
    pub fn is_file(&self) -> bool {
        self.permissions.is_some_and(|p| p & S_IFMT == 0o100000)
    }

    /// Whether the mode says symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.permissions.is_some_and(|p| p & S_IFMT == 0o120000)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.size.is_some() {
            flags |= ATTR_SIZE;
        }
        if self.uid.is_some() || self.gid.is_some() {
            flags |= ATTR_UIDGID;
        }
        if self.permissions.is_some() {
            flags |= ATTR_PERMISSIONS;
        }
        if self.atime.is_some() || self.mtime.is_some() {
            flags |= ATTR_ACMODTIME;
        }
        put_u32(out, flags);
        if let Some(s) = self.size {
            put_u64(out, s);
        }
        if flags & ATTR_UIDGID != 0 {
            // The protocol sets both or neither; -1 would be an odd id, so
            // a missing half is an error caught by the caller's validation.
            put_u32(out, self.uid.unwrap_or(u32::MAX));
            put_u32(out, self.gid.unwrap_or(u32::MAX));
        }
        if let Some(p) = self.permissions {
            put_u32(out, p);
        }
        if flags & ATTR_ACMODTIME != 0 {
            put_u32(out, self.atime.or(self.mtime).unwrap_or(0));
            put_u32(out, self.mtime.or(self.atime).unwrap_or(0));
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let flags = r.u32()?;
        let mut a = FileAttributes::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(r.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.uid = Some(r.u32()?);
            a.gid = Some(r.u32()?);
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.permissions = Some(r.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.atime = Some(r.u32()?);
            a.mtime = Some(r.u32()?);
        }
        if flags & ATTR_EXTENDED != 0 {
            let n = r.u32()?;
            for _ in 0..n {
                r.string()?;
                r.string()?;
            }
        }
        Ok(a)
    }
}

/// One entry of a directory listing or of a `NAME` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    /// The file name (raw bytes: SFTP v3 does not fix an encoding).
    pub filename: Vec<u8>,
    /// The `ls -l`-style line the server formats.
    pub longname: Vec<u8>,
    /// The attributes the server sent with it.
    pub attrs: FileAttributes,
}

/// File system statistics (`statvfs@openssh.com`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatVfs {
    /// File system block size.
    pub bsize: u64,
    /// Fundamental block size.
    pub frsize: u64,
    /// Blocks, in `frsize` units.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Free inodes for unprivileged users.
    pub favail: u64,
    /// File system id.
    pub fsid: u64,
    /// Mount flags (1: read-only, 2: nosuid).
    pub flag: u64,
    /// Maximum file name length.
    pub namemax: u64,
}

/// The server's `limits@openssh.com` reply; 0 means "not announced".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Largest packet the server accepts.
    pub max_packet_length: u64,
    /// Largest read it serves in one reply.
    pub max_read_length: u64,
    /// Largest write it accepts in one request.
    pub max_write_length: u64,
    /// Most handles it keeps open at once.
    pub max_open_handles: u64,
}

/// A reply, by type.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Status {
        code: u32,
        message: String,
    },
    Handle(Vec<u8>),
    /// A READ reply's data, in the pieces it arrived in.
    Data(Rope),
    Name(Vec<NameEntry>),
    Attrs(FileAttributes),
    Extended(Vec<u8>),
}

/// Why a reply could not be decoded, or which bound it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub(crate) Problem);

/// The kinds of [`DecodeError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Truncated, trailing bytes, a count that cannot fit, a bad type.
    Malformed(&'static str),
    /// A packet whose length field exceeds [`MAX_PACKET`].
    PacketTooLong(u64),
    /// A field longer than a bound the client keeps.
    TooLong { what: &'static str, limit: u64 },
}

impl DecodeError {
    pub(crate) const fn malformed(why: &'static str) -> Self {
        DecodeError(Problem::Malformed(why))
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Problem::Malformed(why) => write!(f, "malformed SFTP reply: {why}"),
            Problem::PacketTooLong(len) => write!(
                f,
                "SFTP packet length {len} exceeds the client's limit of {MAX_PACKET} bytes"
            ),
            Problem::TooLong { what, limit } => {
                write!(f, "{what} exceeds the client's limit of {limit}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for crate::error::Error {
    /// [`Error::LimitExceeded`](crate::error::Error::LimitExceeded) for a
    /// field over a client bound, [`Error::Protocol`](crate::error::Error::Protocol)
    /// otherwise.
    fn from(e: DecodeError) -> Self {
        match e.0 {
            Problem::TooLong { what, limit } => crate::error::Error::LimitExceeded { what, limit },
            _ => crate::error::Error::sftp_protocol(e.to_string()),
        }
    }
}

/// A bounds-checked cursor over a reply.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::malformed("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn string(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A string of at most `limit` bytes; a longer one is `what` over it.
    fn string_max(&mut self, limit: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let s = self.string()?;
        if s.len() > limit {
            return Err(DecodeError(Problem::TooLong {
                what,
                limit: limit as u64,
            }));
        }
        Ok(s)
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s);
}

/// Builds one request packet in place at the end of `out`: the length is
/// patched in when the builder is finished.
pub(crate) struct Request<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Request<'a> {
    /// Starts a packet of type `kind` with request id `id`.
    pub(crate) fn new(out: &'a mut Vec<u8>, kind: u8, id: u32) -> Self {
        let start = out.len();
        put_u32(out, 0);
        out.push(kind);
        if kind != fxp::INIT {
            put_u32(out, id);
        }
        Request { out, start }
    }

    pub(crate) fn u32(self, v: u32) -> Self {
        put_u32(self.out, v);
        self
    }

    pub(crate) fn u64(self, v: u64) -> Self {
        put_u64(self.out, v);
        self
    }

    pub(crate) fn str(self, s: &[u8]) -> Self {
        put_str(self.out, s);
        self
    }

    pub(crate) fn attrs(self, a: &FileAttributes) -> Self {
        a.encode(self.out);
        self
    }

    /// A string whose bytes `fill` appends to the buffer it is given,
    /// returning how many: its length is patched in after. `Ok(None)`, with
    /// the whole packet taken back out, if `fill` appended nothing.
    pub(crate) fn str_from(
        self,
        fill: impl FnOnce(&mut Vec<u8>) -> std::io::Result<usize>,
    ) -> std::io::Result<Option<Self>> {
        let at = self.out.len();
        put_u32(self.out, 0);
        let n = match fill(self.out) {
            Ok(n) => n,
            Err(e) => {
                self.out.truncate(self.start);
                return Err(e);
            }
        };
        debug_assert_eq!(self.out.len(), at + 4 + n);
        if n == 0 {
            self.out.truncate(self.start);
            return Ok(None);
        }
        self.out[at..at + 4].copy_from_slice(&(n as u32).to_be_bytes());
        Ok(Some(self))
    }

    /// Patches the length; returns the packet's size on the wire.
    pub(crate) fn finish(self) -> usize {
        let len = self.out.len() - self.start - 4;
        self.out[self.start..self.start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        len + 4
    }
}

/// Bytes of a `WRITE` packet before its data.
pub(crate) const WRITE_HEADER: usize = 4 + 1 + 4 + 4 + 8 + 4;

/// The length of the first complete packet in `buf`, if there is one:
/// `Ok(None)` while more bytes are needed. The length field is checked
/// against [`MAX_PACKET`] as soon as its 4 bytes are in, before a caller
/// waits for the rest.
pub(crate) fn frame(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(DecodeError::malformed("empty packet"));
    }
    if len > MAX_PACKET {
        return Err(DecodeError(Problem::PacketTooLong(len as u64)));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some(4 + len))
}

/// An extension the server announces: its name and data.
pub(crate) type Extension = (String, Vec<u8>);

/// Decodes the server's `VERSION` packet (without its length): the version
/// and the extensions it announces.
pub(crate) fn decode_version(body: &[u8]) -> Result<(u32, Vec<Extension>), DecodeError> {
    let mut r = Reader::new(body);
    if r.u8()? != fxp::VERSION {
        return Err(DecodeError::malformed("expected VERSION"));
    }
    let version = r.u32()?;
    let mut ext = Vec::new();
    while !r.is_empty() {
        let name = String::from_utf8_lossy(r.string()?).into_owned();
        let data = r.string()?.to_vec();
        ext.push((name, data));
    }
    Ok((version, ext))
}

/// The request id of a reply packet (without its length), if it is long
/// enough to carry one: a reply whose body fails to decode still fails only
/// the request it answers.
pub(crate) fn reply_id(body: &[u8]) -> Option<u32> {
    let b = body.get(1..5)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decodes a reply packet (without its length): its request id and body.
pub(crate) fn decode_reply(body: &[u8]) -> Result<(u32, Reply), DecodeError> {
    let mut r = Reader::new(body);
    let kind = r.u8()?;
    let id = r.u32()?;
    let reply = match kind {
        fxp::STATUS => {
            let code = r.u32()?;
            // Version 3 servers send a message and a language tag; very old
            // ones may omit both.
            // The server's text ends up in errors that fleet tools print:
            // capped and with control characters escaped.
            let message = if r.is_empty() {
                String::new()
            } else {
                let m = crate::session::remote_text(r.string()?);
                if !r.is_empty() {
                    r.string()?;
                }
                m
            };
            Reply::Status { code, message }
        }
        fxp::HANDLE => {
            let h = r.string()?;
            if h.is_empty() {
                return Err(DecodeError::malformed("empty handle"));
            }
            if h.len() > MAX_HANDLE_LEN {
                return Err(DecodeError::malformed("handle longer than 256 bytes"));
            }
            Reply::Handle(h.to_vec())
        }
        fxp::DATA => Reply::Data(Rope::from(r.string()?)),
        fxp::NAME => {
            let n = r.u32()? as usize;
            // Each entry takes at least MIN_NAME_ENTRY bytes: a count the
            // rest of the packet cannot hold is refused before allocating.
            if n > r.remaining() / MIN_NAME_ENTRY {
                return Err(DecodeError::malformed("name count larger than the packet"));
            }
            let mut names = Vec::with_capacity(n.min(NAME_RESERVE));
            for _ in 0..n {
                let filename = r
                    .string_max(MAX_NAME_LEN, "a file name in an SFTP NAME reply")?
                    .to_vec();
                let longname = r
                    .string_max(MAX_LONGNAME_LEN, "a long name in an SFTP NAME reply")?
                    .to_vec();
                let attrs = FileAttributes::decode(&mut r)?;
                names.push(NameEntry {
                    filename,
                    longname,
                    attrs,
                });
            }
            Reply::Name(names)
        }
        fxp::ATTRS => Reply::Attrs(FileAttributes::decode(&mut r)?),
        fxp::EXTENDED_REPLY => Reply::Extended(r.rest().to_vec()),
        _ => return Err(DecodeError::malformed("unknown reply type")),
    };
    if !r.is_empty() {
        return Err(DecodeError::malformed("trailing bytes"));
    }
    Ok((id, reply))
}

/// Decodes `statvfs@openssh.com`'s reply.
pub(crate) fn decode_statvfs(data: &[u8]) -> Result<StatVfs, DecodeError> {
    let mut r = Reader::new(data);
    let v = StatVfs {
        bsize: r.u64()?,
        frsize: r.u64()?,
        blocks: r.u64()?,
        bfree: r.u64()?,
        bavail: r.u64()?,
        files: r.u64()?,
        ffree: r.u64()?,
        favail: r.u64()?,
        fsid: r.u64()?,
        flag: r.u64()?,
        namemax: r.u64()?,
    };
    if !r.is_empty() {
        return Err(DecodeError::malformed("trailing bytes in statvfs"));
    }
    Ok(v)
}

/// Decodes `limits@openssh.com`'s reply.
pub(crate) fn decode_limits(data: &[u8]) -> Result<Limits, DecodeError> {
    let mut r = Reader::new(data);
    let v = Limits {
        max_packet_length: r.u64()?,
        max_read_length: r.u64()?,
        max_write_length: r.u64()?,
        max_open_handles: r.u64()?,
    };
    if !r.is_empty() {
        return Err(DecodeError::malformed("trailing bytes in limits"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_string_filled_in_place_gets_its_length_and_an_empty_one_no_packet() {
        let mut out = b"queued".to_vec();
        let n = Request::new(&mut out, fxp::WRITE, 7)
            .str(b"h")
            .u64(3)
            .str_from(|o| {
                o.extend_from_slice(b"data!");
                Ok(5)
            })
            .unwrap()
            .unwrap()
            .finish();
        assert_eq!(n, WRITE_HEADER + 1 + 5);
        let mut want = b"queued".to_vec();
        Request::new(&mut want, fxp::WRITE, 7)
            .str(b"h")
            .u64(3)
            .str(b"data!")
            .finish();
        assert_eq!(out, want);
        // Nothing to send, or a failed fill: the packet is taken back out.
        let r = Request::new(&mut out, fxp::WRITE, 8)
            .str(b"h")
            .str_from(|_| Ok(0));
        assert!(r.unwrap().is_none());
        assert_eq!(out, want);
        let r = Request::new(&mut out, fxp::WRITE, 9)
            .str(b"h")
            .str_from(|_| Err(std::io::ErrorKind::Other.into()));
        assert!(r.is_err());
        assert_eq!(out, want);
    }

    #[test]
    fn request_layout() {
        let mut out = Vec::new();
        let n = Request::new(&mut out, fxp::OPEN, 7)
            .str(b"/tmp/x")
            .u32(open_flags::READ)
            .attrs(&FileAttributes::default())
            .finish();
        assert_eq!(n, out.len());
        let expect: Vec<u8> = [
            &[0, 0, 0, 23][..],
            &[fxp::OPEN],
            &[0, 0, 0, 7],
            &[0, 0, 0, 6],
            b"/tmp/x",
            &[0, 0, 0, 1],
            &[0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(out, expect);

        let mut out = Vec::new();
        Request::new(&mut out, fxp::INIT, 0).u32(3).finish();
        assert_eq!(out, [0, 0, 0, 5, fxp::INIT, 0, 0, 0, 3]);
    }

    #[test]
    fn write_header_matches_encoding() {
        let mut out = Vec::new();
        Request::new(&mut out, fxp::WRITE, 1)
            .str(&[9; 4])
            .u64(0)
            .u32(0)
            .finish();
        assert_eq!(out.len(), WRITE_HEADER + 4);
    }

    #[test]
    fn attrs_round_trip() {
        let a = FileAttributes {
            size: Some(1 << 40),
            uid: Some(1000),
            gid: Some(100),
            permissions: Some(0o100644),
            atime: Some(1_700_000_000),
            mtime: Some(1_700_000_001),
        };
        let mut out = Vec::new();
        a.encode(&mut out);
        let b = FileAttributes::decode(&mut Reader::new(&out)).unwrap();
        assert_eq!(a, b);
        assert!(b.is_file() && !b.is_dir() && !b.is_symlink());
    }

    #[test]
    fn status_and_handle_and_data() {
        let body = [
            &[fxp::STATUS][..],
            &[0, 0, 0, 9],
            &[0, 0, 0, 2],
            &[0, 0, 0, 7],
            b"no file",
            &[0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(
            decode_reply(&body).unwrap(),
            (
                9,
                Reply::Status {
                    code: status::NO_SUCH_FILE,
                    message: "no file".into()
                }
            )
        );
        let body = [&[fxp::HANDLE][..], &[0, 0, 0, 1], &[0, 0, 0, 2], b"h1"].concat();
        assert_eq!(
            decode_reply(&body).unwrap(),
            (1, Reply::Handle(b"h1".to_vec()))
        );
        let body = [&[fxp::DATA][..], &[0, 0, 0, 3], &[0, 0, 0, 3], b"abc"].concat();
        assert_eq!(
            decode_reply(&body).unwrap(),
            (3, Reply::Data(Rope::from(b"abc".to_vec())))
        );
    }

    #[test]
    fn names() {
        let mut body = vec![fxp::NAME, 0, 0, 0, 4, 0, 0, 0, 2];
        for name in [&b"a"[..], b"bb"] {
            put_str(&mut body, name);
            put_str(&mut body, b"long");
            FileAttributes {
                size: Some(5),
                ..Default::default()
            }
            .encode(&mut body);
        }
        let (id, r) = decode_reply(&body).unwrap();
        assert_eq!(id, 4);
        let Reply::Name(n) = r else { panic!("{r:?}") };
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].filename, b"bb");
        assert_eq!(n[1].attrs.size, Some(5));
    }

    #[test]
    fn framing() {
        assert_eq!(frame(&[0, 0]).unwrap(), None);
        assert_eq!(frame(&[0, 0, 0, 3, 1]).unwrap(), None);
        assert_eq!(frame(&packet(&[1, 2, 3])).unwrap(), Some(7));
        assert!(frame(&[0, 0, 0, 0]).is_err());
        assert!(frame(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn truncated_and_malformed_replies_are_errors() {
        let good = [
            &[fxp::STATUS][..],
            &[0, 0, 0, 9],
            &[0, 0, 0, 2],
            &[0, 0, 0, 7],
            b"no file",
            &[0, 0, 0, 0],
        ]
        .concat();
        // Every strict prefix fails cleanly, except those that end right
        // after the code or after the message (old servers send no message
        // or no language tag).
        for cut in 0..good.len() {
            let r = decode_reply(&good[..cut]);
            if cut == 9 || cut == 20 {
                assert!(r.is_ok());
            } else {
                assert!(r.is_err(), "prefix {cut} decoded: {r:?}");
            }
        }
        // Trailing garbage, unknown types, absurd counts and lengths.
        let mut long = good.clone();
        long.push(0);
        assert!(decode_reply(&long).is_err());
        assert!(decode_reply(&[99, 0, 0, 0, 1]).is_err());
        assert!(decode_reply(&[fxp::NAME, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_reply(&[fxp::DATA, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 1]).is_err());
        assert!(decode_reply(&[fxp::HANDLE, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
        assert!(decode_version(&[fxp::VERSION, 0, 0]).is_err());
        assert!(decode_statvfs(&[0; 87]).is_err());
        assert!(decode_limits(&[0; 33]).is_err());
    }

    /// A NAME reply body with id 4 and one entry per name.
    fn name_reply(names: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut body = vec![fxp::NAME, 0, 0, 0, 4];
        put_u32(&mut body, names.len() as u32);
        for (name, long) in names {
            put_str(&mut body, name);
            put_str(&mut body, long);
            put_u32(&mut body, 0);
        }
        body
    }

    #[test]
    fn packet_length_is_bounded_before_the_packet_arrives() {
        // Only the length field is present: refused at once, naming it.
        let e = frame(&[0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(e, DecodeError(Problem::PacketTooLong(u32::MAX as u64)));
        let msg = e.to_string();
        assert!(
            msg.contains("4294967295") && msg.contains("4194304"),
            "{msg}"
        );
        match crate::error::Error::from(e) {
            crate::error::Error::Protocol { message: m, .. } => assert_eq!(m, msg),
            other => panic!("{other:?}"),
        }
        let over = ((MAX_PACKET + 1) as u32).to_be_bytes();
        assert!(frame(&over).is_err());
        // The largest accepted length waits for its bytes.
        let at = (MAX_PACKET as u32).to_be_bytes();
        assert_eq!(frame(&at).unwrap(), None);
    }

    #[test]
    fn name_count_is_bounded_by_the_bytes_present() {
        // Each entry takes at least 12 bytes: 3 empty entries fit in 36.
        let body = name_reply(&[(b"", b""), (b"", b""), (b"", b"")]);
        let (_, r) = decode_reply(&body).unwrap();
        assert!(matches!(r, Reply::Name(ref n) if n.len() == 3), "{r:?}");
        // One more announced than the bytes can hold: refused before
        // anything is reserved.
        let mut over = body.clone();
        over[5..9].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            decode_reply(&over).unwrap_err(),
            DecodeError::malformed("name count larger than the packet")
        );
        let mut huge = body;
        huge[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode_reply(&huge).unwrap_err(),
            DecodeError::malformed("name count larger than the packet")
        );
    }

    #[test]
    fn handles_longer_than_256_bytes_are_refused() {
        let handle = |len: usize| {
            let mut body = vec![fxp::HANDLE, 0, 0, 0, 1];
            put_str(&mut body, &vec![7; len]);
            decode_reply(&body)
        };
        assert!(matches!(handle(256), Ok((1, Reply::Handle(h))) if h.len() == 256));
        let e = handle(257).unwrap_err();
        assert_eq!(e, DecodeError::malformed("handle longer than 256 bytes"));
        assert!(matches!(
            crate::error::Error::from(e),
            crate::error::Error::Protocol { message: m, .. } if m.contains("256")
        ));
        assert!(handle(0).is_err());
        assert!(handle(MAX_PACKET - 16).is_err());
    }

    #[test]
    fn names_longer_than_path_max_are_refused() {
        let ok = vec![b'n'; MAX_NAME_LEN];
        let (_, r) = decode_reply(&name_reply(&[(&ok, b"l")])).unwrap();
        assert!(matches!(r, Reply::Name(ref n) if n[0].filename.len() == MAX_NAME_LEN));
        let long = vec![b'n'; MAX_NAME_LEN + 1];
        let e = decode_reply(&name_reply(&[(b"a", b"l"), (&long, b"l")])).unwrap_err();
        match crate::error::Error::from(e) {
            crate::error::Error::LimitExceeded { what, limit } => {
                assert_eq!(limit, MAX_NAME_LEN as u64);
                assert!(what.contains("file name"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        let longname = vec![b'l'; MAX_LONGNAME_LEN + 1];
        let e = decode_reply(&name_reply(&[(b"a", &longname)])).unwrap_err();
        assert!(matches!(
            crate::error::Error::from(e),
            crate::error::Error::LimitExceeded { limit, .. } if limit == MAX_LONGNAME_LEN as u64
        ));
    }

    #[test]
    fn status_messages_are_capped_and_escaped() {
        let mut body = vec![fxp::STATUS, 0, 0, 0, 2, 0, 0, 0, 4];
        let mut text = b"\x1b[31mred".to_vec();
        text.extend(std::iter::repeat_n(b'x', 100_000));
        put_str(&mut body, &text);
        put_str(&mut body, b"en");
        let (_, r) = decode_reply(&body).unwrap();
        let Reply::Status { code, message } = r else {
            panic!("{r:?}")
        };
        assert_eq!(code, status::FAILURE);
        assert!(message.starts_with("\\x1b[31mred"), "{}", &message[..20]);
        assert!(!message.contains('\x1b'));
        assert!(message.len() < 1100, "{} bytes kept", message.len());
        assert!(
            message.ends_with("(100008 bytes)"),
            "{}",
            &message[message.len() - 20..]
        );
    }

    #[test]
    fn the_id_of_a_malformed_reply_is_still_readable() {
        assert_eq!(reply_id(&[fxp::HANDLE, 0, 0, 1, 2, 0xff]), Some(258));
        assert_eq!(reply_id(&[fxp::HANDLE, 0, 0, 1]), None);
        assert_eq!(reply_id(&[]), None);
    }

    #[test]
    fn version_with_extensions() {
        let mut body = vec![fxp::VERSION, 0, 0, 0, 3];
        put_str(&mut body, b"posix-rename@openssh.com");
        put_str(&mut body, b"1");
        let (v, ext) = decode_version(&body).unwrap();
        assert_eq!(v, 3);
        assert_eq!(
            ext,
            vec![("posix-rename@openssh.com".into(), b"1".to_vec())]
        );
    }

    #[test]
    fn fuzz_like_inputs_never_panic() {
        // A deterministic sweep of short random inputs.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut b = Vec::with_capacity(len);
            let mut y = x;
            for _ in 0..len {
                y = y.wrapping_mul(6364136223846793005).wrapping_add(1);
                b.push((y >> 56) as u8);
            }
            if !b.is_empty() {
                b[0] =
                    [fxp::STATUS, fxp::HANDLE, fxp::DATA, fxp::NAME, fxp::ATTRS][(x % 5) as usize];
            }
            let _ = decode_reply(&b);
            let _ = decode_version(&b);
            let _ = frame(&b);
        }
    }
}
