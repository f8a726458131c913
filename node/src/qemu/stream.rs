//! QEMU's migration stream, as stock QEMU 7.2 sends it for precopy: parsed as it arrives,
//! and rebuilt for a fresh QEMU's `-incoming`.
//!
//! # Goals
//! - Split a stream into RAM pages (keyed by RAM block and page index) and everything after
//!   RAM (device state), without understanding any device: in precopy every `ram` section
//!   comes before the first device section, so "from the first non-RAM section to the end" is
//!   an opaque device tail that is stored verbatim.
//! - Refuse anything we do not understand before it can be committed: multifd, postcopy and
//!   return-path commands, compression, XBZRLE, RDMA, configuration capabilities such as
//!   `x-ignore-shared`, unknown sections, flags and configuration subsections, device state
//!   before RAM, a tail that does not end the way a stream ends.
//! - Rebuild a valid stream: the original header and configuration, the RAM block list, each
//!   page once (zero pages left out: the destination's RAM starts zeroed), the device tail.
//!
//! # Non-goals
//! - Parsing device state. The format of each record is in `docs/protocol.md`.
//!
//! All integers are big-endian; `str8` is a length byte and that many bytes.

use std::io::{self, Read, Write};
use vmcsnap_protocol::manifest::Block;
use vmcsnap_protocol::PAGE_SIZE;

const QEVM_MAGIC: u32 = 0x5145_564d;
const QEVM_VERSION: u32 = 3;

pub(super) const SEC_EOF: u8 = 0x00;
pub(super) const SEC_START: u8 = 0x01;
pub(super) const SEC_PART: u8 = 0x02;
pub(super) const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SEC_SUBSECTION: u8 = 0x05;
const SEC_VMDESC: u8 = 0x06;
const SEC_CONFIG: u8 = 0x07;
pub(super) const SEC_COMMAND: u8 = 0x08;
pub(super) const SEC_FOOTER: u8 = 0x7e;

pub(super) const F_ZERO: u64 = 0x02;
pub(super) const F_MEM_SIZE: u64 = 0x04;
pub(super) const F_PAGE: u64 = 0x08;
pub(super) const F_EOS: u64 = 0x10;
pub(super) const F_CONTINUE: u64 = 0x20;
const F_XBZRLE: u64 = 0x40;
const F_HOOK: u64 = 0x80;
const F_COMPRESS: u64 = 0x100;
const F_MULTIFD_FLUSH: u64 = 0x200;

/// Longest machine type name accepted.
pub const MACHINE_NAME_BYTES_MAX: usize = 256;
/// Most RAM blocks in one stream.
pub const RAM_BLOCKS_MAX: usize = vmcsnap_protocol::manifest::VM_BLOCKS_MAX;
/// Largest device tail accepted (QEMU 7.2's is about 118 KB, mostly the JSON description).
pub const TAIL_BYTES_MAX: usize = 16 << 20;
/// Page records accepted per page of the stream's RAM (pre-copy re-sends dirty pages once
/// per round; vmcsnap's live rounds are far fewer).
pub const PAGE_RECORDS_PER_PAGE_MAX: u64 = 64;
/// Largest guest RAM accepted (the largest VM a snapshot records).
pub const RAM_BYTES_MAX: u64 = vmcsnap_protocol::manifest::VM_BYTES_MAX;


/// What a stream says about itself, enough to rebuild it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamMeta {
    /// Magic, version and configuration section, verbatim.
    pub head: Vec<u8>,
    /// Machine type from the configuration section (`pc-i440fx-7.2`).
    pub machine: String,
    /// The `ram` section's id, instance id and version.
    pub ram_section: (u32, u32, u32),
    /// Whether sections carry footers (`send-section-footer`).
    pub footers: bool,
    /// RAM blocks in stream order: QEMU's RAMBlock id (`pc.ram`, `/rom@etc/acpi/tables`, ...)
    /// and used length, as the manifest records them.
    pub blocks: Vec<Block>,
}

/// The result of parsing a whole stream.
#[derive(Debug)]
pub struct Parsed {
    /// Header facts.
    pub meta: StreamMeta,
    /// Everything from the first non-RAM section to the end.
    pub tail: Vec<u8>,
    /// Page records (zero or data) seen, including re-sent pages.
    pub page_records: u64,
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream ended early or the socket failed.
    #[error("migration stream truncated or unreadable at byte {offset}: {source}")]
    Io {
        /// Bytes read before the failure.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// A feature vmcsnap does not capture.
    #[error("unsupported migration stream at byte {offset}: {what}")]
    Unsupported {
        /// Where.
        offset: u64,
        /// What.
        what: String,
    },
    /// Bytes that are not a QEMU migration stream.
    #[error("malformed migration stream at byte {offset}: {what}")]
    Malformed {
        /// Where.
        offset: u64,
        /// What.
        what: String,
    },
    /// The page consumer failed.
    #[error("{0}")]
    Sink(String),
}

struct Reader<R> {
    r: R,
    pos: u64,
    /// Bytes recorded while `recording` (the head).
    rec: Option<Vec<u8>>,
}

impl<R: Read> Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        self.r.read_exact(buf).map_err(|source| StreamError::Io { offset: self.pos, source })?;
        self.pos += buf.len() as u64;
        if let Some(rec) = &mut self.rec {
            rec.extend_from_slice(buf);
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, StreamError> {
        let mut b = [0u8; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }
    fn be16(&mut self) -> Result<u16, StreamError> {
        let mut b = [0u8; 2];
        self.read(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    fn be32(&mut self) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn be64(&mut self) -> Result<u64, StreamError> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    fn str8(&mut self) -> Result<String, StreamError> {
        let n = self.u8()? as usize;
        let mut b = vec![0u8; n];
        self.read(&mut b)?;
        String::from_utf8(b).map_err(|_| self.malformed("a name that is not UTF-8"))
    }
    fn malformed(&self, what: impl Into<String>) -> StreamError {
        StreamError::Malformed { offset: self.pos, what: what.into() }
    }
    fn unsupported(&self, what: impl Into<String>) -> StreamError {
        StreamError::Unsupported { offset: self.pos, what: what.into() }
    }
}

/// Parses a stream from `r`, calling `page(block, page_index, data)` for every page record
/// in order (`data` is `None` for a zero page). A page may come more than once in live
/// pre-copy; the last copy is the one that counts.
pub fn parse<R: Read>(
    r: R,
    mut page: impl FnMut(usize, u64, Option<&[u8]>) -> Result<(), StreamError>,
) -> Result<Parsed, StreamError> {
    let mut r = Reader { r, pos: 0, rec: Some(Vec::new()) };
    let (machine, mut t) = read_config(&mut r)?;
    // The head is everything before the first record's type byte.
    let mut head = r.rec.take().unwrap_or_default();
    head.pop();

    let mut ram_section: Option<(u32, u32, u32)> = None;
    let mut ram_done = false;
    let mut ram_parts = 0u64;
    let mut footers = false;
    let mut ram = RamRecords { blocks: Vec::new(), last_block: None, page_records: 0, buf: vec![0u8; PAGE_SIZE] };
    let tail_first: u8;
    loop {
        let sid = match t {
            SEC_START | SEC_FULL => {
                let sid = r.be32()?;
                let idstr = r.str8()?;
                let inst = r.be32()?;
                let ver = r.be32()?;
                if t == SEC_START && idstr == "ram" && ram_section.is_none() {
                    ram_section = Some((sid, inst, ver));
                    sid
                } else if t == SEC_FULL && (ram_done || ram_parts > 0) {
                    // The device tail starts here; rebuild its first bytes. (QEMU's background
                    // snapshot ends RAM with its last part, no `SECTION_END`, and then sends the
                    // device state it saved at the pause.)
                    let mut first = vec![SEC_FULL];
                    first.extend_from_slice(&sid.to_be_bytes());
                    first.push(idstr.len() as u8);
                    first.extend_from_slice(idstr.as_bytes());
                    first.extend_from_slice(&inst.to_be_bytes());
                    first.extend_from_slice(&ver.to_be_bytes());
                    let tail = read_tail(&mut r, first)?;
                    return Ok(Parsed { meta: meta(head, machine, ram_section, footers, ram.blocks, &r)?, tail, page_records: ram.page_records });
                } else if t == SEC_FULL {
                    return Err(r.unsupported(format!("device state ({idstr}) before RAM is complete")));
                } else {
                    return Err(r.unsupported(format!("iterative section {idstr:?} (block or dirty-bitmap migration)")));
                }
            }
            SEC_PART | SEC_END => {
                let sid = r.be32()?;
                match ram_section {
                    Some((rs, _, _)) if rs == sid && !ram_done => sid,
                    _ => return Err(r.unsupported(format!("section {sid} is not the RAM section"))),
                }
            }
            SEC_COMMAND => {
                let cmd = r.be16()?;
                return Err(r.unsupported(format!("migration command {cmd} (postcopy or return path)")));
            }
            SEC_EOF => {
                if !ram_done {
                    return Err(r.malformed("stream ended before RAM was complete"));
                }
                tail_first = SEC_EOF;
                break;
            }
            other => return Err(r.malformed(format!("unknown section type {other:#x}"))),
        };
        ram.payload(&mut r, t, &mut page)?;
        match t {
            SEC_END => ram_done = true,
            SEC_PART => ram_parts += 1,
            _ => {}
        }
        t = r.u8()?;
        if t == SEC_FOOTER {
            footers = true;
            let fs = r.be32()?;
            if fs != sid {
                return Err(r.malformed(format!("footer of section {fs} closes section {sid}")));
            }
            t = r.u8()?;
        }
    }
    let tail = read_tail(&mut r, vec![tail_first])?;
    Ok(Parsed { meta: meta(head, machine, ram_section, footers, ram.blocks, &r)?, tail, page_records: ram.page_records })
}

/// The RAM records read so far: the block list, the block of the last page (for
/// `CONTINUE`), and a page buffer.
struct RamRecords {
    blocks: Vec<Block>,
    last_block: Option<usize>,
    page_records: u64,
    buf: Vec<u8>,
}

impl RamRecords {
    /// One RAM section's payload (of section type `t`): records until `EOS`, each page handed
    /// to `page`.
    fn payload<R: Read>(
        &mut self,
        r: &mut Reader<R>,
        t: u8,
        page: &mut impl FnMut(usize, u64, Option<&[u8]>) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let Self { blocks, last_block, page_records, buf } = self;
        loop {
            let v = r.be64()?;
            let flags = v & (PAGE_SIZE as u64 - 1);
            let addr = v & !(PAGE_SIZE as u64 - 1);
            if flags & F_MEM_SIZE != 0 {
                if t != SEC_START || !blocks.is_empty() {
                    return Err(r.malformed("RAM block list outside the RAM start section"));
                }
                if addr > RAM_BYTES_MAX {
                    return Err(r.unsupported(format!("{addr} bytes of RAM")));
                }
                let mut left = addr;
                while left > 0 {
                    if blocks.len() >= RAM_BLOCKS_MAX {
                        return Err(r.malformed(format!("more than {RAM_BLOCKS_MAX} RAM blocks")));
                    }
                    let name = r.str8()?;
                    let len = r.be64()?;
                    if len > left || len % PAGE_SIZE as u64 != 0 {
                        return Err(r.malformed(format!("RAM block {name} of {len} bytes")));
                    }
                    left -= len;
                    blocks.push(Block { name, bytes: len });
                }
                continue;
            }
            if flags == F_EOS {
                break;
            }
            if flags & F_MULTIFD_FLUSH != 0 {
                return Err(r.unsupported("multifd"));
            }
            if flags & F_HOOK != 0 {
                return Err(r.unsupported("RDMA"));
            }
            if flags & F_COMPRESS != 0 {
                return Err(r.unsupported("compress"));
            }
            if flags & F_XBZRLE != 0 {
                return Err(r.unsupported("xbzrle"));
            }
            let kind = flags & !F_CONTINUE;
            if kind != F_ZERO && kind != F_PAGE {
                return Err(r.unsupported(format!("RAM record flags {flags:#x}")));
            }
            let b = if flags & F_CONTINUE != 0 {
                (*last_block).ok_or_else(|| r.malformed("CONTINUE with no block before it"))?
            } else {
                let name = r.str8()?;
                blocks.iter().position(|b| b.name == name).ok_or_else(|| r.malformed(format!("page of unknown RAM block {name:?}")))?
            };
            *last_block = Some(b);
            if addr >= blocks[b].bytes {
                return Err(r.malformed(format!("page at {addr:#x} beyond RAM block {}", blocks[b].name)));
            }
            let index = addr / PAGE_SIZE as u64;
            *page_records += 1;
            // Pre-copy re-sends dirty pages, but a stream that sends its RAM over and over
            // without end is refused: what the capture keeps per record stays bounded by the
            // VM's size.
            let declared: u64 = blocks.iter().map(|b| b.bytes / PAGE_SIZE as u64).sum();
            if *page_records > declared.saturating_mul(PAGE_RECORDS_PER_PAGE_MAX) {
                return Err(r.malformed(format!("more than {PAGE_RECORDS_PER_PAGE_MAX} page records per page of RAM")));
            }
            if kind == F_ZERO {
                let fill = r.u8()?;
                if fill == 0 {
                    page(b, index, None)?;
                } else {
                    buf.fill(fill);
                    page(b, index, Some(buf.as_slice()))?;
                }
            } else {
                r.read(buf)?;
                page(b, index, Some(buf.as_slice()))?;
            }
        }
        Ok(())
    }
}

/// The stream's magic, version and configuration section. Returns the machine type and the
/// type byte of the first record after them.
fn read_config<R: Read>(r: &mut Reader<R>) -> Result<(String, u8), StreamError> {
    if r.be32()? != QEVM_MAGIC {
        return Err(r.malformed("not a QEMU migration stream (bad magic)"));
    }
    let v = r.be32()?;
    if v != QEVM_VERSION {
        return Err(r.unsupported(format!("stream version {v} (supported: {QEVM_VERSION})")));
    }
    let mut machine = String::new();
    let mut t = r.u8()?;
    if t == SEC_CONFIG {
        let len = r.be32()? as usize;
        if len > MACHINE_NAME_BYTES_MAX {
            return Err(r.malformed(format!("machine name of {len} bytes")));
        }
        let mut b = vec![0u8; len];
        r.read(&mut b)?;
        machine = String::from_utf8(b).map_err(|_| r.malformed("machine name is not UTF-8"))?;
        loop {
            t = r.u8()?;
            if t != SEC_SUBSECTION {
                break;
            }
            let name = r.str8()?;
            let _version = r.be32()?;
            match name.as_str() {
                "configuration/target-page-bits" => {
                    let bits = r.be32()?;
                    // An untrusted width: checked, never a shift overflow.
                    if 1u64.checked_shl(bits) != Some(PAGE_SIZE as u64) {
                        return Err(r.unsupported(format!("target page size 2^{bits}")));
                    }
                }
                "configuration/uuid" => {
                    let mut u = [0u8; 16];
                    r.read(&mut u)?;
                }
                "configuration/capabilities" => {
                    let n = r.be32()?;
                    let mut caps = Vec::new();
                    for _ in 0..n.min(64) {
                        caps.push(r.str8()?);
                    }
                    return Err(r.unsupported(format!("migration capabilities {caps:?} (turn them off)")));
                }
                other => return Err(r.unsupported(format!("configuration subsection {other:?}"))),
            }
        }
    }
    Ok((machine, t))
}


fn meta<R>(head: Vec<u8>, machine: String, ram: Option<(u32, u32, u32)>, footers: bool, blocks: Vec<Block>, r: &Reader<R>) -> Result<StreamMeta, StreamError>
where
    R: Read,
{
    let ram_section = ram.ok_or_else(|| r.malformed("no RAM section"))?;
    if blocks.is_empty() {
        return Err(r.malformed("no RAM blocks listed"));
    }
    Ok(StreamMeta { head, machine, ram_section, footers, blocks })
}

/// Reads the rest of the stream as the device tail, and checks that it ends the way a stream
/// ends.
fn read_tail<R: Read>(r: &mut Reader<R>, first: Vec<u8>) -> Result<Vec<u8>, StreamError> {
    let mut tail = first;
    let start = r.pos;
    (&mut r.r)
        .take((TAIL_BYTES_MAX - tail.len()) as u64 + 1)
        .read_to_end(&mut tail)
        .map_err(|source| StreamError::Io { offset: start, source })?;
    r.pos += (tail.len()) as u64;
    if tail.len() > TAIL_BYTES_MAX {
        return Err(r.unsupported(format!("device state over {TAIL_BYTES_MAX} bytes")));
    }
    if !tail_is_complete(&tail) {
        return Err(StreamError::Malformed { offset: r.pos, what: "device state is truncated (no end-of-stream record)".into() });
    }
    Ok(tail)
}

/// A stream ends with `EOF`, `VMDESCRIPTION`, a be32 length and that many bytes of JSON.
/// (Streams without the description, `suppress-vmdesc=on`, are refused: without it a stream
/// cut right after some zero byte of device state would look complete.)
fn tail_is_complete(tail: &[u8]) -> bool {
    tail_eof_at(tail).is_some()
}

fn invalid(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, m)
}

/// A block name's length byte (QEMU's names are at most 255 bytes).
fn name_len(name: &str) -> io::Result<u8> {
    u8::try_from(name.len()).map_err(|_| invalid(format!("RAM block name of {} bytes (at most 255)", name.len())))
}

/// Writes the `ram` section's start: the RAM block list (names and used lengths; for a postcopy
/// destination, `postcopy_page_sizes` adds the host page size of each block of huge pages),
/// then its footer. The meta comes from a commit record: its sizes and names are checked, not
/// trusted.
pub(super) fn write_ram_setup<W: Write>(w: &mut W, meta: &StreamMeta, postcopy_page_sizes: Option<&[u64]>) -> io::Result<()> {
    let (sid, inst, ver) = meta.ram_section;
    w.write_all(&[SEC_START])?;
    w.write_all(&sid.to_be_bytes())?;
    w.write_all(&[3])?;
    w.write_all(b"ram")?;
    w.write_all(&inst.to_be_bytes())?;
    w.write_all(&ver.to_be_bytes())?;
    let total = meta.blocks.iter().try_fold(0u64, |a, b| a.checked_add(b.bytes)).filter(|t| *t <= RAM_BYTES_MAX);
    let total = total.ok_or_else(|| invalid("RAM blocks of more than the largest VM".into()))?;
    w.write_all(&(total | F_MEM_SIZE).to_be_bytes())?;
    for (i, b) in meta.blocks.iter().enumerate() {
        w.write_all(&[name_len(&b.name)?])?;
        w.write_all(b.name.as_bytes())?;
        w.write_all(&b.bytes.to_be_bytes())?;
        // A postcopy destination reads the host page size of a block whose pages are not
        // 4 KiB (huge pages), and checks it against its own.
        if let Some(&p) = postcopy_page_sizes.and_then(|s| s.get(i)).filter(|&&p| p != PAGE_SIZE as u64) {
            w.write_all(&p.to_be_bytes())?;
        }
    }
    w.write_all(&F_EOS.to_be_bytes())?;
    write_footer(w, meta)
}

/// A section footer, if the stream has them.
pub(super) fn write_footer<W: Write>(w: &mut W, meta: &StreamMeta) -> io::Result<()> {
    if meta.footers {
        w.write_all(&[SEC_FOOTER])?;
        w.write_all(&meta.ram_section.0.to_be_bytes())?;
    }
    Ok(())
}

/// Where a device tail's end-of-stream record is: the device sections are `tail[..at]`.
pub(super) fn tail_eof_at(tail: &[u8]) -> Option<usize> {
    let n = tail.len();
    (2..n.saturating_sub(6).min(4 << 20)).map(|json_len| n - json_len - 6).find(|&at| {
        tail[at] == SEC_EOF
            && tail[at + 1] == SEC_VMDESC
            && u32::from_be_bytes([tail[at + 2], tail[at + 3], tail[at + 4], tail[at + 5]]) as usize == n - at - 6
            && tail[at + 6] == b'{'
    })
}

/// Writes a stream for a fresh QEMU's `-incoming`: call [`Rebuilder::page`] for every non-zero
/// page (in any order, each once), then [`Rebuilder::finish`] with the device tail.
pub struct Rebuilder<W: Write> {
    w: W,
    meta: StreamMeta,
    last_block: Option<usize>,
}

impl<W: Write> Rebuilder<W> {
    /// Writes the head, the RAM start section and opens the RAM part section.
    pub fn start(mut w: W, meta: StreamMeta) -> io::Result<Self> {
        w.write_all(&meta.head)?;
        write_ram_setup(&mut w, &meta, None)?;
        let sid = meta.ram_section.0;
        let mut me = Self { w, meta, last_block: None };
        me.w.write_all(&[SEC_PART])?;
        me.w.write_all(&sid.to_be_bytes())?;
        Ok(me)
    }

    fn footer(&mut self) -> io::Result<()> {
        write_footer(&mut self.w, &self.meta)
    }

    /// Writes one page of block `block` at page index `index`.
    pub fn page(&mut self, block: usize, index: u64, data: &[u8]) -> io::Result<()> {
        let b = self.meta.blocks.get(block).ok_or_else(|| invalid(format!("page of block {block}, which the stream does not have")))?;
        if data.len() != PAGE_SIZE || index.checked_mul(PAGE_SIZE as u64).is_none_or(|off| off >= b.bytes) {
            return Err(invalid(format!("page {index} ({} bytes) outside block {} of {} bytes", data.len(), b.name, b.bytes)));
        }
        let cont = self.last_block == Some(block);
        let v = (index * PAGE_SIZE as u64) | F_PAGE | if cont { F_CONTINUE } else { 0 };
        self.w.write_all(&v.to_be_bytes())?;
        if !cont {
            let name = &self.meta.blocks[block].name;
            self.w.write_all(&[name_len(name)?])?;
            self.w.write_all(name.as_bytes())?;
            self.last_block = Some(block);
        }
        self.w.write_all(data)
    }

    /// Closes RAM and writes the device tail; returns the writer.
    pub fn finish(mut self, tail: &[u8]) -> io::Result<W> {
        self.w.write_all(&F_EOS.to_be_bytes())?;
        self.footer()?;
        self.w.write_all(&[SEC_END])?;
        self.w.write_all(&self.meta.ram_section.0.to_be_bytes())?;
        self.w.write_all(&F_EOS.to_be_bytes())?;
        self.footer()?;
        self.w.write_all(tail)?;
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Pages by (block, page index).
    pub(crate) type Pages = BTreeMap<(usize, u64), Vec<u8>>;

    /// A small stream in QEMU 7.2's shape: two blocks, zero and data pages, a page re-sent in
    /// a later part (live pre-copy), device sections, EOF and a JSON description.
    pub(crate) fn sample() -> (Vec<u8>, Pages) {
        let mut s = Vec::new();
        s.extend_from_slice(&QEVM_MAGIC.to_be_bytes());
        s.extend_from_slice(&QEVM_VERSION.to_be_bytes());
        s.push(SEC_CONFIG);
        s.extend_from_slice(&13u32.to_be_bytes());
        s.extend_from_slice(b"pc-i440fx-7.2");
        let sec = |s: &mut Vec<u8>, t: u8, sid: u32| {
            s.push(t);
            s.extend_from_slice(&sid.to_be_bytes());
        };
        sec(&mut s, SEC_START, 2);
        s.extend_from_slice(&[3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4]);
        s.extend_from_slice(&((8 * 4096u64 + 4096) | F_MEM_SIZE).to_be_bytes());
        s.extend_from_slice(&[6]);
        s.extend_from_slice(b"pc.ram");
        s.extend_from_slice(&(8 * 4096u64).to_be_bytes());
        s.extend_from_slice(&[6]);
        s.extend_from_slice(b"pc.rom");
        s.extend_from_slice(&4096u64.to_be_bytes());
        s.extend_from_slice(&F_EOS.to_be_bytes());
        sec(&mut s, SEC_FOOTER, 2);
        let mut want = BTreeMap::new();
        let page = |s: &mut Vec<u8>, want: &mut Pages, blk: Option<&str>, bi: usize, idx: u64, fill: u8| {
            let f = if blk.is_some() { 0 } else { F_CONTINUE };
            if fill == 0 {
                s.extend_from_slice(&((idx * 4096) | F_ZERO | f).to_be_bytes());
            } else {
                s.extend_from_slice(&((idx * 4096) | F_PAGE | f).to_be_bytes());
            }
            if let Some(b) = blk {
                s.push(b.len() as u8);
                s.extend_from_slice(b.as_bytes());
            }
            if fill == 0 {
                s.push(0);
                want.remove(&(bi, idx));
            } else {
                s.extend_from_slice(&[fill; 4096]);
                want.insert((bi, idx), vec![fill; 4096]);
            }
        };
        sec(&mut s, SEC_PART, 2);
        page(&mut s, &mut want, Some("pc.ram"), 0, 0, 1);
        page(&mut s, &mut want, None, 0, 1, 0);
        page(&mut s, &mut want, None, 0, 5, 7);
        page(&mut s, &mut want, Some("pc.rom"), 1, 0, 9);
        s.extend_from_slice(&F_EOS.to_be_bytes());
        sec(&mut s, SEC_FOOTER, 2);
        sec(&mut s, SEC_PART, 2);
        page(&mut s, &mut want, Some("pc.ram"), 0, 5, 8); // re-sent: last copy wins
        page(&mut s, &mut want, None, 0, 0, 0); // now zero
        s.extend_from_slice(&F_EOS.to_be_bytes());
        sec(&mut s, SEC_FOOTER, 2);
        sec(&mut s, SEC_END, 2);
        s.extend_from_slice(&F_EOS.to_be_bytes());
        sec(&mut s, SEC_FOOTER, 2);
        // device tail
        s.push(SEC_FULL);
        s.extend_from_slice(&3u32.to_be_bytes());
        s.extend_from_slice(&[5]);
        s.extend_from_slice(b"timer");
        s.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]);
        s.extend_from_slice(&[0xaa; 24]);
        sec(&mut s, SEC_FOOTER, 3);
        s.push(SEC_EOF);
        s.push(SEC_VMDESC);
        let json = br#"{"page_size":4096,"devices":[]}"#;
        s.extend_from_slice(&(json.len() as u32).to_be_bytes());
        s.extend_from_slice(json);
        (s, want)
    }

    fn collect(stream: &[u8]) -> Result<(Parsed, Pages), StreamError> {
        let mut pages = BTreeMap::new();
        let p = parse(stream, |b, i, d| {
            match d {
                Some(d) => pages.insert((b, i), d.to_vec()),
                None => pages.remove(&(b, i)),
            };
            Ok(())
        })?;
        Ok((p, pages))
    }

    #[test]
    fn parse_then_rebuild_round_trips() {
        let (s, want) = sample();
        let (p, pages) = collect(&s).expect("parse");
        assert_eq!(pages, want);
        assert_eq!(p.meta.machine, "pc-i440fx-7.2");
        assert_eq!(p.meta.blocks, vec![Block { name: "pc.ram".into(), bytes: 8 * 4096 }, Block { name: "pc.rom".into(), bytes: 4096 }]);
        assert!(p.meta.footers);
        assert_eq!(p.page_records, 6);
        assert_eq!(p.tail[0], SEC_FULL);
        // Rebuild, parse again: same pages, same tail, same head.
        let mut rb = Rebuilder::start(Vec::new(), p.meta.clone()).expect("start");
        for ((b, i), d) in &pages {
            rb.page(*b, *i, d).expect("page");
        }
        let out = rb.finish(&p.tail).expect("finish");
        let (p2, pages2) = collect(&out).expect("parse rebuilt");
        assert_eq!(pages2, want);
        assert_eq!(p2.meta, p.meta);
        assert_eq!(p2.tail, p.tail);
    }

    #[test]
    fn hostile_widths_and_sizes_are_errors() {
        let head = |s: &mut Vec<u8>| {
            s.extend_from_slice(&QEVM_MAGIC.to_be_bytes());
            s.extend_from_slice(&QEVM_VERSION.to_be_bytes());
            s.push(SEC_CONFIG);
            s.extend_from_slice(&1u32.to_be_bytes());
            s.push(b'm');
        };
        // A page-size width far past 64 bits.
        for bits in [12u32 + 1, 64, 200, u32::MAX] {
            let mut s = Vec::new();
            head(&mut s);
            s.push(SEC_SUBSECTION);
            let name = b"configuration/target-page-bits";
            s.push(name.len() as u8);
            s.extend_from_slice(name);
            s.extend_from_slice(&1u32.to_be_bytes());
            s.extend_from_slice(&bits.to_be_bytes());
            assert!(matches!(collect(&s), Err(StreamError::Unsupported { .. })), "bits {bits}");
        }
        // A stream declaring more RAM than any VM a snapshot records.
        let mut s = Vec::new();
        head(&mut s);
        s.push(SEC_START);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(&[3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4]);
        s.extend_from_slice(&((16u64 << 40) | F_MEM_SIZE).to_be_bytes());
        assert!(matches!(collect(&s), Err(StreamError::Unsupported { .. })));
    }

    #[test]
    fn a_background_snapshot_stream_ends_ram_without_section_end() {
        // QEMU's background snapshot: the last RAM part, then the device state saved at the pause.
        let (s, want) = sample();
        let mut end = vec![SEC_END, 0, 0, 0, 2];
        end.extend_from_slice(&F_EOS.to_be_bytes());
        end.extend_from_slice(&[SEC_FOOTER, 0, 0, 0, 2]);
        let at = s.windows(end.len()).position(|w| w == end.as_slice()).expect("the RAM section's end");
        let bg = [&s[..at], &s[at + end.len()..]].concat();
        let (p, pages) = collect(&bg).expect("parse");
        assert_eq!(pages, want);
        assert_eq!(p.tail[0], SEC_FULL);
        // Device state before any RAM page is still refused.
        let first_part = s.windows(5).position(|w| w == [SEC_PART, 0, 0, 0, 2]).expect("first part");
        let tail_at = s.len() - p.tail.len();
        let early = [&s[..first_part], &s[tail_at..]].concat();
        assert!(collect(&early).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (s, _) = sample();
        for cut in 0..s.len() {
            assert!(collect(&s[..cut]).is_err(), "truncated at {cut} of {} was accepted", s.len());
        }
    }

    #[test]
    fn unsupported_features_are_refused() {
        let (s, _) = sample();
        // Find the first data page record (flags PAGE, not CONTINUE) and set other flags on it.
        let at = s.windows(8).position(|w| u64::from_be_bytes(w.try_into().expect("8")) == F_PAGE).expect("page record");
        for (flag, what) in [(F_XBZRLE, "xbzrle"), (F_COMPRESS, "compress"), (F_MULTIFD_FLUSH, "multifd"), (F_HOOK, "RDMA"), (0x400, "flags")] {
            let mut bad = s.clone();
            bad[at..at + 8].copy_from_slice(&flag.to_be_bytes());
            let e = collect(&bad).expect_err("refused").to_string();
            assert!(e.contains(what), "{e}");
        }
        // A postcopy command right after the configuration.
        let cfg_end = 4 + 4 + 1 + 4 + 13;
        let mut bad = s.clone();
        bad.splice(cfg_end..cfg_end, [SEC_COMMAND, 0, 1, 0, 0]);
        assert!(collect(&bad).expect_err("refused").to_string().contains("postcopy"));
        // Device state before RAM.
        let mut bad = s[..cfg_end].to_vec();
        bad.extend_from_slice(&[SEC_FULL, 0, 0, 0, 9, 5, b't', b'i', b'm', b'e', b'r', 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(collect(&bad).expect_err("refused").to_string().contains("before RAM"));
        // Capabilities in the configuration (x-ignore-shared).
        let mut bad = s[..cfg_end].to_vec();
        bad.push(SEC_SUBSECTION);
        let n = b"configuration/capabilities";
        bad.push(n.len() as u8);
        bad.extend_from_slice(n);
        bad.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 15]);
        bad.extend_from_slice(b"x-ignore-shared");
        bad.extend_from_slice(&s[cfg_end..]);
        assert!(collect(&bad).expect_err("refused").to_string().contains("x-ignore-shared"));
        // Not a stream at all.
        assert!(collect(b"hello world, not qemu").expect_err("refused").to_string().contains("magic"));
    }
}
