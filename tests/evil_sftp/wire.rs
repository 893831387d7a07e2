//! The SFTP version 3 wire format, server side: reading requests and
//! building replies (draft-ietf-secsh-filexfer-02, section 3 onwards).
//!
//! Every reader method fails with a `BAD_MESSAGE` status on truncated
//! input, so a handler can use `?` and never panics on a short packet.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

/// Packet types.
pub mod fxp {
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

/// Status codes.
pub mod st {
    pub const OK: u32 = 0;
    pub const EOF: u32 = 1;
    pub const NO_SUCH_FILE: u32 = 2;
    pub const PERMISSION_DENIED: u32 = 3;
    pub const FAILURE: u32 = 4;
    pub const BAD_MESSAGE: u32 = 5;
    pub const OP_UNSUPPORTED: u32 = 8;
}

/// Open flags (`SSH_FXF_*`).
pub mod pflags {
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

pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;

/// A reply to send: the handlers' result (an error is a `Status` too).
#[derive(Debug)]
pub enum Reply {
    Status(u32, String),
    Handle(Vec<u8>),
    Data(Vec<u8>),
    Name(Vec<Entry>),
    Attrs(Attrs),
    Extended(Vec<u8>),
    /// Bytes written as they are (a deliberately broken reply).
    Raw(Vec<u8>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Status(st::OK, "Success".into())
    }

    pub fn fail(code: u32, msg: &str) -> Reply {
        Reply::Status(code, msg.into())
    }
}

impl From<std::io::Error> for Reply {
    fn from(e: std::io::Error) -> Reply {
        use std::io::ErrorKind::*;
        let code = match e.kind() {
            NotFound => st::NO_SUCH_FILE,
            PermissionDenied => st::PERMISSION_DENIED,
            _ => st::FAILURE,
        };
        Reply::Status(code, e.to_string())
    }
}

/// Encodes `reply` to request `id` as one framed packet.
pub fn encode(reply: Reply, id: u32) -> Vec<u8> {
    let mut p = Packet::new();
    match reply {
        Reply::Status(code, msg) => {
            p.byte(fxp::STATUS).u32(id).u32(code).string(msg.as_bytes());
            p.string(b"en");
        }
        Reply::Handle(h) => {
            p.byte(fxp::HANDLE).u32(id).string(&h);
        }
        Reply::Data(d) => {
            p.byte(fxp::DATA).u32(id).string(&d);
        }
        Reply::Name(entries) => {
            p.byte(fxp::NAME).u32(id).u32(entries.len() as u32);
            for e in &entries {
                p.entry(e);
            }
        }
        Reply::Attrs(a) => {
            p.byte(fxp::ATTRS).u32(id).attrs(Some(&a));
        }
        Reply::Extended(d) => {
            p.byte(fxp::EXTENDED_REPLY).u32(id).raw(&d);
        }
        Reply::Raw(bytes) => return bytes,
    }
    p.finish()
}

/// A packet under construction; [`Packet::finish`] prepends its length.
pub struct Packet(Vec<u8>);

impl Packet {
    pub fn new() -> Packet {
        Packet(vec![0; 4])
    }

    pub fn byte(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        self.u32(s.len() as u32).raw(s)
    }

    pub fn raw(&mut self, s: &[u8]) -> &mut Self {
        self.0.extend_from_slice(s);
        self
    }

    pub fn attrs(&mut self, a: Option<&Attrs>) -> &mut Self {
        let Some(a) = a else { return self.u32(0) };
        self.u32(ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME)
            .u64(a.size)
            .u32(a.uid)
            .u32(a.gid)
            .u32(a.mode)
            .u32(a.atime)
            .u32(a.mtime)
    }

    pub fn entry(&mut self, e: &Entry) -> &mut Self {
        self.string(&e.name).string(&e.long).attrs(e.attrs.as_ref())
    }

    /// The packet with its length field filled in.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.0);
        let len = (v.len() - 4) as u32;
        v[..4].copy_from_slice(&len.to_be_bytes());
        v
    }
}

/// Reads the fields of one request body.
pub struct Reader<'a>(&'a [u8]);

fn short() -> Reply {
    Reply::fail(st::BAD_MESSAGE, "truncated or malformed request")
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Reply> {
        if self.0.len() < n {
            return Err(short());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    pub fn u32(&mut self) -> Result<u32, Reply> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Reply> {
        Ok(((self.u32()? as u64) << 32) | self.u32()? as u64)
    }

    pub fn string(&mut self) -> Result<&'a [u8], Reply> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// Request attributes: only the fields present are to be changed.
    pub fn attrs(&mut self) -> Result<SetAttrs, Reply> {
        let flags = self.u32()?;
        let mut a = SetAttrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.owner = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.mode = Some(self.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.times = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_EXTENDED != 0 {
            for _ in 0..self.u32()? {
                self.string()?;
                self.string()?;
            }
        }
        Ok(a)
    }
}

/// Attributes a request asks to set.
#[derive(Debug, Default)]
pub struct SetAttrs {
    pub size: Option<u64>,
    pub owner: Option<(u32, u32)>,
    pub mode: Option<u32>,
    pub times: Option<(u32, u32)>,
}

/// The attributes we send: always every field.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub atime: u32,
    pub mtime: u32,
}

impl Attrs {
    /// Attributes of something we make up: `mode` with its type bits.
    pub fn made_up(mode: u32, size: u64) -> Attrs {
        Attrs {
            size,
            uid: 0,
            gid: 0,
            mode,
            atime: 1_600_000_000,
            mtime: 1_600_000_000,
        }
    }
}

impl From<&Metadata> for Attrs {
    fn from(m: &Metadata) -> Attrs {
        let t = |s: i64| s.clamp(0, u32::MAX as i64) as u32;
        Attrs {
            size: m.size(),
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode(),
            atime: t(m.atime()),
            mtime: t(m.mtime()),
        }
    }
}

/// One name of a NAME reply.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: Vec<u8>,
    pub long: Vec<u8>,
    pub attrs: Option<Attrs>,
}

impl Entry {
    /// An entry with an `ls -l`-style long name, as OpenSSH formats it.
    pub fn new(name: &[u8], a: Attrs) -> Entry {
        let kind = match a.mode & 0o170000 {
            S_IFDIR => 'd',
            S_IFLNK => 'l',
            S_IFREG => '-',
            _ => '?',
        };
        let mut perm = String::from(kind);
        for shift in [6, 3, 0] {
            let bits = (a.mode >> shift) & 7;
            perm.push(if bits & 4 != 0 { 'r' } else { '-' });
            perm.push(if bits & 2 != 0 { 'w' } else { '-' });
            perm.push(if bits & 1 != 0 { 'x' } else { '-' });
        }
        let mut long = format!(
            "{perm}    1 {:<8} {:<8} {:>8} Jan  1  1970 ",
            a.uid, a.gid, a.size
        )
        .into_bytes();
        long.extend_from_slice(name);
        Entry {
            name: name.to_vec(),
            long,
            attrs: Some(a),
        }
    }

    /// A bare name (REALPATH, READLINK): attributes with no field set.
    pub fn bare(name: &[u8]) -> Entry {
        Entry {
            name: name.to_vec(),
            long: name.to_vec(),
            attrs: None,
        }
    }
}

/// `bytes` made printable for the log, cut after `max` bytes.
pub fn escape(bytes: &[u8], max: usize) -> String {
    let mut s: String = bytes[..bytes.len().min(max)]
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > max {
        s.push_str(&format!("...({} bytes)", bytes.len()));
    }
    s
}
