//! The algorithm offers both sides sent, read off the wire.
//!
//! libssh2 frees both KEXINIT messages when negotiation fails, and its
//! error (`-5 Unable to exchange encryption keys`) names nothing. Both
//! KEXINITs travel in clear as the first binary packet after each side's
//! identification line, so the transport callbacks show the first bytes of
//! each direction to a [`Sniffer`], which keeps at most [`CAPTURE_MAX`]
//! bytes, parses the offer once, and then ignores the stream.

/// Bytes of a direction's start kept while looking for its KEXINIT (lines
/// before the identification, the identification, one packet).
pub const CAPTURE_MAX: usize = 64 * 1024;
/// Names kept per list of a peer's offer (more are dropped).
pub const NAMES_MAX: usize = 128;
/// Bytes kept per name.
pub const NAME_MAX: usize = 64;

/// `SSH_MSG_KEXINIT`.
const MSG_KEXINIT: u8 = 20;

/// One side's KEXINIT name-lists, in the protocol's order: key exchange,
/// host key, cipher c→s, cipher s→c, MAC c→s, MAC s→c, compression c→s,
/// compression s→c.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// The eight lists (languages are not kept).
    pub lists: [Vec<String>; 8],
}

/// Watches one direction's first bytes for its KEXINIT.
#[derive(Debug, Default)]
pub struct Sniffer {
    buf: Vec<u8>,
    state: State,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Looking,
    Found(Offer),
    /// Not a KEXINIT, malformed, or too long: stop looking.
    GaveUp,
}

impl Sniffer {
    /// Whether more bytes are still of interest.
    pub fn wants(&self) -> bool {
        matches!(self.state, State::Looking)
    }

    /// Shows the sniffer the next bytes of its direction.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.wants() {
            return;
        }
        let room = CAPTURE_MAX - self.buf.len();
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        match parse(&self.buf) {
            Parse::Done(offer) => self.state = State::Found(offer),
            Parse::Invalid => self.state = State::GaveUp,
            Parse::Incomplete if self.buf.len() >= CAPTURE_MAX => self.state = State::GaveUp,
            Parse::Incomplete => return,
        }
        self.buf = Vec::new();
    }

    /// The offer, once seen.
    pub fn offer(&self) -> Option<&Offer> {
        match &self.state {
            State::Found(o) => Some(o),
            _ => None,
        }
    }
}

enum Parse {
    Done(Offer),
    Incomplete,
    Invalid,
}

/// Parses identification lines then one binary packet holding a KEXINIT.
fn parse(buf: &[u8]) -> Parse {
    // Skip lines up to and including the one that starts with "SSH-".
    let mut at = 0;
    loop {
        let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else {
            return Parse::Incomplete;
        };
        let line = &buf[at..at + nl];
        at += nl + 1;
        if line.starts_with(b"SSH-") {
            break;
        }
    }
    let rest = &buf[at..];
    let Some(len) = rest.get(..4) else {
        return Parse::Incomplete;
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if !(2..=CAPTURE_MAX).contains(&len) {
        return Parse::Invalid;
    }
    let Some(packet) = rest.get(4..4 + len) else {
        return Parse::Incomplete;
    };
    let padding = packet[0] as usize;
    let Some(payload) = packet.get(1..len.saturating_sub(padding)) else {
        return Parse::Invalid;
    };
    // type, 16-byte cookie, then the name-lists.
    if payload.first() != Some(&MSG_KEXINIT) || payload.len() < 17 {
        return Parse::Invalid;
    }
    let mut at = 17;
    let mut offer = Offer::default();
    for list in offer.lists.iter_mut() {
        let Some(n) = payload.get(at..at + 4) else {
            return Parse::Invalid;
        };
        let n = u32::from_be_bytes(n.try_into().expect("4 bytes")) as usize;
        let Some(text) = payload.get(at + 4..at + 4 + n) else {
            return Parse::Invalid;
        };
        *list = text
            .split(|&b| b == b',')
            .filter(|name| !name.is_empty())
            .take(NAMES_MAX)
            .map(|name| crate::session::remote_text(&name[..name.len().min(NAME_MAX)]))
            .collect();
        at += 4 + n;
    }
    Parse::Done(offer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(lists: &[&str]) -> Vec<u8> {
        let mut payload = vec![MSG_KEXINIT];
        payload.extend_from_slice(&[0xAB; 16]);
        for l in lists {
            payload.extend_from_slice(&(l.len() as u32).to_be_bytes());
            payload.extend_from_slice(l.as_bytes());
        }
        payload.extend_from_slice(&[0; 5]); // first_kex_follows, reserved
        let padding = 8 - (payload.len() + 5) % 8 + 4;
        let mut p = ((payload.len() + padding + 1) as u32)
            .to_be_bytes()
            .to_vec();
        p.push(padding as u8);
        p.extend_from_slice(&payload);
        p.extend(std::iter::repeat_n(0, padding));
        p
    }

    const LISTS: [&str; 10] = [
        "mlkem768x25519-sha256,curve25519-sha256",
        "ssh-ed25519",
        "aes128-ctr",
        "aes256-ctr",
        "hmac-sha2-256",
        "hmac-sha2-512",
        "none",
        "none,zlib",
        "",
        "",
    ];

    #[test]
    fn finds_the_offer_after_lines_and_banner_fed_byte_by_byte() {
        let mut wire = b"a line before\r\nSSH-2.0-OpenSSH_10.0\r\n".to_vec();
        wire.extend(packet(&LISTS));
        wire.extend_from_slice(b"whatever follows");
        let mut s = Sniffer::default();
        for b in &wire {
            s.feed(std::slice::from_ref(b));
        }
        let o = s.offer().expect("parsed");
        assert_eq!(o.lists[0], ["mlkem768x25519-sha256", "curve25519-sha256"]);
        assert_eq!(o.lists[7], ["none", "zlib"]);
        assert!(!s.wants());
    }

    #[test]
    fn hostile_input_is_bounded_and_never_panics() {
        // No newline ever: gives up after CAPTURE_MAX bytes.
        let mut s = Sniffer::default();
        for _ in 0..100 {
            s.feed(&[b'x'; 1024]);
        }
        assert!(!s.wants() && s.offer().is_none());
        // Lengths pointing past the packet, padding past the length.
        for bad in [
            [b"SSH-2.0-x\n".as_slice(), &[0xff, 0xff, 0xff, 0xff]].concat(),
            [
                b"SSH-2.0-x\n".as_slice(),
                &[0, 0, 0, 8, 200, 20, 0, 0, 0, 0, 0, 0],
            ]
            .concat(),
            [b"SSH-2.0-x\n".as_slice(), &[0, 0, 0, 4, 0, 21, 0, 0]].concat(),
        ] {
            let mut s = Sniffer::default();
            s.feed(&bad);
            assert!(!s.wants(), "{bad:?}");
            assert!(s.offer().is_none());
        }
        // A name list claiming more bytes than the packet holds.
        let mut p = packet(&LISTS);
        p[4 + 1 + 17 + 3] = 0xff;
        let mut s = Sniffer::default();
        s.feed(&[b"SSH-2.0-x\r\n".as_slice(), &p].concat());
        assert!(s.offer().is_none() && !s.wants());
        // Many long, escaped names: bounded.
        let long = vec!["\x1b[31m".repeat(40); 300].join(",");
        let mut lists = LISTS;
        lists[0] = &long;
        let mut s = Sniffer::default();
        s.feed(&[b"SSH-2.0-x\r\n".as_slice(), &packet(&lists)].concat());
        let o = s.offer().unwrap();
        assert_eq!(o.lists[0].len(), NAMES_MAX);
        assert!(o.lists[0].iter().all(|n| !n.contains('\x1b')));
    }
}
