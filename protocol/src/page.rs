//! Pages, page hashes and node identities.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Size of one guest page, the unit of dedup, storage and transfer.
pub const PAGE_SIZE: usize = 4096;

const _: () = assert!(PAGE_SIZE.is_power_of_two() && PAGE_SIZE.is_multiple_of(32));

/// BLAKE3-256 of a page's bytes: the page's address everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageHash(pub [u8; 32]);

/// The mark stored in place of a hash for an all-zero page. Zero pages are never stored or
/// sent. No real BLAKE3 output is all zeros (that would be a preimage of zero), so the mark
/// cannot collide with the hash of a stored page.
pub const ZERO_HASH: PageHash = PageHash([0; 32]);

impl PageHash {
    /// True for the zero-page mark.
    pub fn is_zero(&self) -> bool {
        *self == ZERO_HASH
    }

    /// The first 8 bytes as a big-endian integer; page hashes are uniform, so this is a
    /// uniformly distributed placement key.
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }

    /// Short hex form for logs and errors.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for PageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageHash({})", self.short())
    }
}

/// True when every byte of `page` is zero.
pub fn is_zero_page(page: &[u8]) -> bool {
    // OR the page together 8 bytes at a time; the compiler vectorises this loop.
    let words = page.chunks_exact(8);
    let tail = words.remainder();
    let mut acc = 0u64;
    for w in words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        acc |= u64::from_ne_bytes(b);
    }
    acc == 0 && tail.iter().all(|&b| b == 0)
}

/// The hash of a page, or [`ZERO_HASH`] when the page is all zeros.
pub fn hash_page(page: &[u8]) -> PageHash {
    if is_zero_page(page) {
        ZERO_HASH
    } else {
        PageHash(*blake3::hash(page).as_bytes())
    }
}

/// A node's identity: its ed25519 public key. The libp2p `PeerId` and the data plane's TLS
/// certificate are both derived from the same key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// Short hex form for tables and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// 32 raw bytes in binary formats (bincode), a hex string in human-readable ones (JSON).
macro_rules! serde_as_32_bytes {
    ($t:ident) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex::encode(self.0))
                } else {
                    self.0.serialize(s)
                }
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    let mut b = [0u8; 32];
                    hex::decode_to_slice(&s, &mut b).map_err(serde::de::Error::custom)?;
                    Ok($t(b))
                } else {
                    Ok($t(<[u8; 32]>::deserialize(d)?))
                }
            }
        }
    };
}
serde_as_32_bytes!(PageHash);
serde_as_32_bytes!(NodeId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_get_the_mark() {
        assert_eq!(hash_page(&[0u8; PAGE_SIZE]), ZERO_HASH);
        let mut p = [0u8; PAGE_SIZE];
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&p));
        assert_ne!(hash_page(&p), ZERO_HASH);
        assert_eq!(hash_page(&p).0, *blake3::hash(&p).as_bytes());
    }
}
