//! The one codec: bincode 2 bodies, length-prefixed frames on the wire, magic-and-version
//! headers on disk. Every limit is checked before decoding.

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame body accepted on any socket (data plane or control), in bytes.
/// A `Put` of [`crate::wire::PUT_PAGES_MAX`] pages is about 1 MiB; the rest is headroom for
/// commit records.
pub const MESSAGE_BYTES_MAX: usize = 4 << 20;

/// Largest persisted record (commit record, member list) accepted from disk, in bytes.
pub const RECORD_BYTES_MAX: usize = 4 << 20;

/// Bytes of the big-endian length prefix in front of every frame.
pub const FRAME_HEADER_BYTES: usize = 4;

const _: () = assert!(MESSAGE_BYTES_MAX <= u32::MAX as usize);

/// Why a frame or record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The frame or record is larger than its limit.
    #[error("message of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit it broke.
        max: usize,
    },
    /// bincode could not decode the body.
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// bincode could not encode the value.
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The body decoded but left bytes over.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// A persisted record does not start with the expected magic.
    #[error("not a {expected} record")]
    BadMagic {
        /// What was expected, for the message.
        expected: &'static str,
    },
    /// A persisted record has a version this build cannot read.
    #[error("{what} record version {found} is not supported (this build reads {supported})")]
    BadVersion {
        /// Which kind of record.
        what: &'static str,
        /// The version found.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MESSAGE_BYTES_MAX>()
}

/// Encodes `msg` as a bare body (no frame header).
pub fn encode_body<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let body = bincode::serde::encode_to_vec(msg, config())?;
    if body.len() > MESSAGE_BYTES_MAX {
        return Err(CodecError::TooLarge { len: body.len(), max: MESSAGE_BYTES_MAX });
    }
    Ok(body)
}

/// Encodes `msg` as one frame: a 4-byte big-endian length, then the body (encoded in place,
/// behind the header, so page data is copied once).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    // A first pass only counts bytes, so the frame is allocated once at its exact size.
    let mut counter = ByteCounter(0);
    bincode::serde::encode_into_std_write(msg, &mut counter, config())?;
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + counter.0);
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    bincode::serde::encode_into_std_write(msg, &mut out, config())?;
    let len = out.len() - FRAME_HEADER_BYTES;
    if len > MESSAGE_BYTES_MAX {
        return Err(CodecError::TooLarge { len, max: MESSAGE_BYTES_MAX });
    }
    out[..FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads a frame header and checks the announced length against [`MESSAGE_BYTES_MAX`]
/// before the caller reads (or allocates) the body.
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MESSAGE_BYTES_MAX {
        return Err(CodecError::TooLarge { len, max: MESSAGE_BYTES_MAX });
    }
    Ok(len)
}

/// Decodes one body, refusing trailing bytes.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    decode_parts(&[body])
}

/// Decodes one body that arrived in `parts` (a frame's bytes as the transport handed them
/// over, in order), refusing trailing bytes: [`decode_body`] of the parts joined, without
/// joining them (each page is copied once, from its part into its own buffer).
pub fn decode_parts<T: DeserializeOwned, P: AsRef<[u8]>>(parts: &[P]) -> Result<T, CodecError> {
    let len: usize = parts.iter().map(|p| p.as_ref().len()).sum();
    if len > MESSAGE_BYTES_MAX {
        return Err(CodecError::TooLarge { len, max: MESSAGE_BYTES_MAX });
    }
    let mut r = PartsReader { parts, at: 0, off: 0, left: len };
    let v = bincode::serde::decode_from_reader(&mut r, config())?;
    if r.left != 0 {
        return Err(CodecError::Trailing(r.left));
    }
    Ok(v)
}

/// Reads across a list of byte slices as if they were one.
struct PartsReader<'a, P> {
    parts: &'a [P],
    /// The part being read, and how far into it.
    at: usize,
    off: usize,
    /// Bytes not read yet, over all parts.
    left: usize,
}

impl<P: AsRef<[u8]>> PartsReader<'_, P> {
    /// The unread bytes of the part being read, past empty parts.
    fn current(&mut self) -> &[u8] {
        while self.at < self.parts.len() && self.off == self.parts[self.at].as_ref().len() {
            self.at += 1;
            self.off = 0;
        }
        self.parts.get(self.at).map_or(&[], |p| &p.as_ref()[self.off..])
    }
}

impl<P: AsRef<[u8]>> bincode::de::read::Reader for PartsReader<'_, P> {
    fn read(&mut self, bytes: &mut [u8]) -> Result<(), bincode::error::DecodeError> {
        if bytes.len() > self.left {
            return Err(bincode::error::DecodeError::UnexpectedEnd { additional: bytes.len() - self.left });
        }
        let mut done = 0;
        while done < bytes.len() {
            let cur = self.current();
            let n = cur.len().min(bytes.len() - done);
            bytes[done..done + n].copy_from_slice(&cur[..n]);
            self.off += n;
            done += n;
        }
        self.left -= bytes.len();
        Ok(())
    }

    fn peek_read(&mut self, n: usize) -> Option<&[u8]> {
        let cur = self.current();
        (cur.len() >= n).then(|| &cur[..n])
    }

    fn consume(&mut self, n: usize) {
        self.off += n;
        self.left -= n;
    }
}

/// Encodes a persisted record: 4 magic bytes, a big-endian u16 version, then the body.
pub fn encode_record<T: Serialize>(
    magic: [u8; 4],
    version: u16,
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    let body = encode_body(value)?;
    if body.len() > RECORD_BYTES_MAX {
        return Err(CodecError::TooLarge { len: body.len(), max: RECORD_BYTES_MAX });
    }
    let mut out = Vec::with_capacity(6 + body.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a persisted record written by [`encode_record`], checking magic, version and size.
pub fn decode_record<T: DeserializeOwned>(
    magic: [u8; 4],
    what: &'static str,
    version: u16,
    bytes: &[u8],
) -> Result<T, CodecError> {
    if bytes.len() > RECORD_BYTES_MAX + 6 {
        return Err(CodecError::TooLarge { len: bytes.len(), max: RECORD_BYTES_MAX });
    }
    if bytes.len() < 6 || bytes[..4] != magic {
        return Err(CodecError::BadMagic { expected: what });
    }
    let found = u16::from_be_bytes([bytes[4], bytes[5]]);
    if found != version {
        return Err(CodecError::BadVersion { what, found, supported: version });
    }
    decode_body(&bytes[6..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{DataRequest, PagePuts};
    use crate::{PageHash, PAGE_SIZE};

    #[test]
    fn frame_round_trip() {
        let msg = DataRequest::Put { pages: PagePuts::from_parts(vec![PageHash([7; 32])], vec![1u8; PAGE_SIZE]) };
        let frame = encode_frame(&msg).expect("encode");
        let len = frame_len(frame[..4].try_into().expect("4 bytes")).expect("len");
        assert_eq!(len, frame.len() - 4);
        // The page travels as raw bytes, not one varint per byte.
        assert!(frame.len() < PAGE_SIZE + 64, "frame is {} bytes", frame.len());
        let back: DataRequest = decode_body(&frame[4..]).expect("decode");
        assert_eq!(back, msg);
    }

    #[test]
    fn a_body_in_parts_decodes_as_the_whole_would() {
        let msg = crate::wire::DataResponse::Pages {
            pages: crate::wire::PageSet::of([Some(vec![3u8; PAGE_SIZE]), None, Some(vec![4u8; PAGE_SIZE])]),
        };
        let body = encode_body(&msg).expect("encode");
        // Cut in two at every point, and in three around the second page.
        for cut in 0..=body.len() {
            let back: crate::wire::DataResponse = decode_parts(&[&body[..cut], &body[cut..]]).expect("two parts");
            assert_eq!(back, msg, "cut at {cut}");
        }
        let parts = [&body[..1], &[][..], &body[1..PAGE_SIZE + 9], &body[PAGE_SIZE + 9..]];
        assert_eq!(decode_parts::<crate::wire::DataResponse, _>(&parts).expect("parts"), msg);
        // Short, long and oversized bodies are errors, as whole.
        let short = decode_parts::<crate::wire::DataResponse, _>(&[&body[..body.len() - 1]]);
        assert!(matches!(short, Err(CodecError::Decode(_))), "{short:?}");
        let long = decode_parts::<crate::wire::DataResponse, _>(&[&body[..], &[0u8][..]]);
        assert!(matches!(long, Err(CodecError::Trailing(1))), "{long:?}");
        let big = vec![0u8; MESSAGE_BYTES_MAX];
        let over = decode_parts::<crate::wire::DataResponse, _>(&[&big[..], &[0u8][..]]);
        assert!(matches!(over, Err(CodecError::TooLarge { .. })), "{over:?}");
    }

    #[test]
    fn oversized_frames_are_refused_before_decode() {
        let header = ((MESSAGE_BYTES_MAX + 1) as u32).to_be_bytes();
        assert!(matches!(frame_len(header), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode_body::<DataRequest>(&junk);
        }
        // A vector length claiming far more elements than the limit allows.
        let mut body = vec![2u8]; // variant index of Get
        body.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode_body::<DataRequest>(&body).is_err());
    }

    #[test]
    fn records_check_magic_and_version() {
        let rec = encode_record(*b"TEST", 3, &42u32).expect("encode");
        assert_eq!(decode_record::<u32>(*b"TEST", "test", 3, &rec).expect("decode"), 42);
        assert!(matches!(
            decode_record::<u32>(*b"TEST", "test", 4, &rec),
            Err(CodecError::BadVersion { found: 3, .. })
        ));
        assert!(matches!(
            decode_record::<u32>(*b"NOPE", "test", 3, &rec),
            Err(CodecError::BadMagic { .. })
        ));
    }
}
