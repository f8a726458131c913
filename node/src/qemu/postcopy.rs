//! QEMU's postcopy with the node as the migration source: a fresh QEMU runs the restored guest
//! as soon as it has the device state, and asks for each page it touches before the page has
//! arrived (stock QEMU 7.2, `postcopy-ram` on the destination).
//!
//! # What goes to QEMU (all integers big-endian)
//! 1. The recorded head (magic, version, configuration), `OPEN_RETURN_PATH`, `POSTCOPY_ADVISE`
//!    (host and target page size), the `ram` section's start (the RAM block list, with the host
//!    page size of each block backed by huge pages), one `POSTCOPY_RAM_DISCARD` (QEMU 7.2
//!    needs one, and the first turns transparent huge pages off; see [`Source::start_with`]),
//!    and optionally a part section of pages that must be there before the guest runs (QEMU
//!    loads them as pre-copy pages, as it does a real source's first rounds: resident, never
//!    asked for). QEMU empties its RAM at the advice: every page of the guest must come from
//!    the source.
//! 2. `PACKAGED`: one length-prefixed blob of `POSTCOPY_LISTEN`, the recorded device state
//!    (without its end-of-stream record and JSON description) and `POSTCOPY_RUN`. QEMU reads
//!    the whole blob first, so that page requests can flow while devices load; at `RUN` the
//!    guest runs.
//! 3. `ram` part sections with pages, in any order, each page at most once (QEMU places a page
//!    with `UFFDIO_COPY` and fails the migration on a second copy). Pages never sent are zero.
//!    A block backed by huge pages (hugetlbfs) is placed a host page at a time: all of a host
//!    page's 4 KiB pages, zero ones included, go one after another, no other page between them.
//! 4. The `ram` section's end and `EOF`: QEMU unregisters userfaultfd; the guest's memory is
//!    all resident.
//!
//! # What QEMU sends back (the return path; `be16 type`, `be16 len`, payload)
//! `REQ_PAGES_ID` (`be64 offset`, `be32 len`, `str8` block) and `REQ_PAGES` (same block as the
//! last request) ask for pages a vCPU or device faulted on; `SHUT` ends the conversation;
//! `PONG` answers a ping (never sent here).
//!
//! # Recovery
//! If the source goes away (node killed, pages unavailable), QEMU pauses the migration
//! (`postcopy-paused`): the guest's vCPUs wait on missing pages, it never runs on memory that
//! is not the snapshot's. After `migrate-recover unix:PATH` on the destination, a source
//! connects there and sends, with no head: `RECV_BITMAP` per RAM block (QEMU answers with the
//! bitmap of pages it has: `be64 size`, that many bytes of little-endian 64-bit words, `be64`
//! end marker), then `POSTCOPY_RESUME` (answered by `RESUME_ACK`), then more part sections.

use super::stream::{
    tail_eof_at, write_footer, write_ram_setup, StreamMeta, F_CONTINUE, F_EOS, F_PAGE, F_ZERO, SEC_COMMAND, SEC_END, SEC_EOF, SEC_PART,
};
use std::io::{self, Read, Write};
use vmcsnap_protocol::PAGE_SIZE;

const CMD_OPEN_RETURN_PATH: u16 = 1;
const CMD_POSTCOPY_ADVISE: u16 = 3;
const CMD_POSTCOPY_LISTEN: u16 = 4;
const CMD_POSTCOPY_RUN: u16 = 5;
const CMD_POSTCOPY_RAM_DISCARD: u16 = 6;
const CMD_PACKAGED: u16 = 7;
const CMD_POSTCOPY_RESUME: u16 = 9;
const CMD_RECV_BITMAP: u16 = 10;

const RP_SHUT: u16 = 1;
const RP_PONG: u16 = 2;
const RP_REQ_PAGES_ID: u16 = 3;
const RP_REQ_PAGES: u16 = 4;
const RP_RECV_BITMAP: u16 = 5;
const RP_RESUME_ACK: u16 = 6;

/// End marker QEMU writes after a received-pages bitmap.
const RECV_BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;
/// Largest device state sent in one package.
pub const PACKAGE_BYTES_MAX: usize = 1 << 24;
/// Pages per part section (a part ends, and is flushed, sooner when a request waits).
pub const PART_PAGES_MAX: usize = 256;

fn invalid(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m)
}

/// The source's side of a postcopy stream, written into `w` (a buffer the caller sends on).
pub struct Source<W: Write> {
    w: W,
    meta: StreamMeta,
    in_part: bool,
    last_block: Option<usize>,
}

impl<W: Write> Source<W> {
    /// A new stream: head, return path, postcopy advice, the RAM block list.
    pub fn start(w: W, meta: StreamMeta) -> io::Result<Self> {
        Self::start_with(w, meta, Vec::new(), std::iter::empty())
    }

    /// A new stream whose `early` pages (block, page index, data or `None` for zero) are
    /// loaded before `LISTEN`, as pre-copy pages: they are resident when the guest runs, and
    /// QEMU never asks for them. A block of huge pages cannot have any.
    ///
    /// `page_sizes`: the destination's host page size of each block, in bytes (QEMU's `info
    /// ramblock`), as QEMU checks it against its own; empty when every block has 4 KiB pages.
    pub fn start_with<'a>(
        mut w: W,
        meta: StreamMeta,
        page_sizes: Vec<u64>,
        early: impl IntoIterator<Item = (usize, u64, Option<&'a [u8]>)>,
    ) -> io::Result<Self> {
        let page_sizes = checked_page_sizes(&meta, page_sizes)?;
        w.write_all(&meta.head)?;
        command(&mut w, CMD_OPEN_RETURN_PATH, &[])?;
        let mut advise = Vec::with_capacity(16);
        // QEMU compares the sizes' bitwise OR over all blocks with its own.
        let summary = page_sizes.iter().fold(0, |a, s| a | s).max(PAGE_SIZE as u64);
        advise.extend_from_slice(&summary.to_be_bytes()); // host page size summary
        advise.extend_from_slice(&(PAGE_SIZE as u64).to_be_bytes()); // target page size
        command(&mut w, CMD_POSTCOPY_ADVISE, &advise)?;
        write_ram_setup(&mut w, &meta, Some(&page_sizes))?;
        // QEMU 7.2 needs a discard before `LISTEN`: when none came, its `LISTEN` handler moves
        // the incoming state from listening back to "discard", and the pages that follow are
        // loaded as pre-copy pages, written straight into registered RAM — the loading thread
        // then faults on the very page it is loading, for ever. The first host page of the
        // first block is discarded (QEMU discards whole host pages): it is empty anyway since
        // the advice. It goes before the early pages: QEMU's first discard also turns
        // transparent huge pages off in its RAM, and an early page written while they are on
        // can fault in a whole 2 MiB of zeros around it, present when userfaultfd registers —
        // a later page of those 2 MiB then fails its `UFFDIO_COPY` (`File exists`) and QEMU
        // pauses the migration.
        if let Some(b) = meta.blocks.first() {
            let mut d = vec![0u8, u8::try_from(b.name.len()).map_err(|_| invalid("RAM block name over 255 bytes".into()))?];
            d.extend_from_slice(b.name.as_bytes());
            d.push(0);
            d.extend_from_slice(&0u64.to_be_bytes());
            d.extend_from_slice(&page_sizes[0].to_be_bytes());
            command(&mut w, CMD_POSTCOPY_RAM_DISCARD, &d)?;
        }
        let mut s = Self { w, meta, in_part: false, last_block: None };
        for (block, index, data) in early {
            if page_sizes.get(block).is_some_and(|&p| p != PAGE_SIZE as u64) {
                return Err(invalid("a block of huge pages cannot have early pages".into()));
            }
            s.page(block, index, data)?;
        }
        s.end_part()?;
        Ok(s)
    }

    /// A stream resumed on a new channel after `migrate-recover`: asks for the bitmap of
    /// pages QEMU has, block by block (answered on the return path).
    pub fn resume(mut w: W, meta: StreamMeta) -> io::Result<Self> {
        for b in &meta.blocks {
            let mut data = vec![u8::try_from(b.name.len()).map_err(|_| invalid("RAM block name over 255 bytes".into()))?];
            data.extend_from_slice(b.name.as_bytes());
            command(&mut w, CMD_RECV_BITMAP, &data)?;
        }
        Ok(Self { w, meta, in_part: false, last_block: None })
    }

    /// Tells a resumed destination to go on (after every bitmap came back).
    pub fn send_resume(&mut self) -> io::Result<()> {
        command(&mut self.w, CMD_POSTCOPY_RESUME, &[])
    }

    /// The device state `tail` (as recorded: device sections, `EOF`, JSON description) in
    /// one package between `LISTEN` and `RUN`.
    pub fn package(&mut self, tail: &[u8]) -> io::Result<()> {
        let end = tail_eof_at(tail).ok_or_else(|| invalid("the recorded device state does not end like a stream".into()))?;
        let devices = &tail[..end];
        let mut pkg = Vec::with_capacity(devices.len() + 10);
        command(&mut pkg, CMD_POSTCOPY_LISTEN, &[])?;
        pkg.extend_from_slice(devices);
        command(&mut pkg, CMD_POSTCOPY_RUN, &[])?;
        if pkg.len() > PACKAGE_BYTES_MAX {
            return Err(invalid(format!("device state of {} bytes (a package holds at most {PACKAGE_BYTES_MAX})", pkg.len())));
        }
        command(&mut self.w, CMD_PACKAGED, &(pkg.len() as u32).to_be_bytes())?;
        self.w.write_all(&pkg)
    }

    /// One page of block `block` at page index `index`: `data`, or zero when `None`.
    pub fn page(&mut self, block: usize, index: u64, data: Option<&[u8]>) -> io::Result<()> {
        let b = self.meta.blocks.get(block).ok_or_else(|| invalid(format!("page of block {block}, which the stream does not have")))?;
        if data.is_some_and(|d| d.len() != PAGE_SIZE) || index.checked_mul(PAGE_SIZE as u64).is_none_or(|off| off >= b.bytes) {
            return Err(invalid(format!("page {index} outside block {} of {} bytes", b.name, b.bytes)));
        }
        if !self.in_part {
            self.w.write_all(&[SEC_PART])?;
            self.w.write_all(&self.meta.ram_section.0.to_be_bytes())?;
            self.in_part = true;
            self.last_block = None;
        }
        let cont = self.last_block == Some(block);
        let kind = if data.is_some() { F_PAGE } else { F_ZERO };
        let v = (index * PAGE_SIZE as u64) | kind | if cont { F_CONTINUE } else { 0 };
        self.w.write_all(&v.to_be_bytes())?;
        if !cont {
            let name = &self.meta.blocks[block].name;
            self.w.write_all(&[name.len() as u8])?;
            self.w.write_all(name.as_bytes())?;
            self.last_block = Some(block);
        }
        match data {
            Some(d) => self.w.write_all(d),
            None => self.w.write_all(&[0]),
        }
    }

    /// Ends the open part section, if any.
    pub fn end_part(&mut self) -> io::Result<()> {
        if self.in_part {
            self.w.write_all(&F_EOS.to_be_bytes())?;
            write_footer(&mut self.w, &self.meta)?;
            self.in_part = false;
        }
        Ok(())
    }

    /// The writer, to take what was written so far.
    pub fn writer(&mut self) -> &mut W {
        &mut self.w
    }

    /// Ends RAM and the stream: every page not sent is zero.
    pub fn finish(mut self) -> io::Result<W> {
        self.end_part()?;
        self.w.write_all(&[SEC_END])?;
        self.w.write_all(&self.meta.ram_section.0.to_be_bytes())?;
        self.w.write_all(&F_EOS.to_be_bytes())?;
        write_footer(&mut self.w, &self.meta)?;
        self.w.write_all(&[SEC_EOF])?;
        Ok(self.w)
    }
}

/// `page_sizes` for `meta`'s blocks (empty: 4 KiB each), each a power of two of at least
/// 4 KiB that divides its block.
fn checked_page_sizes(meta: &StreamMeta, page_sizes: Vec<u64>) -> io::Result<Vec<u64>> {
    if page_sizes.is_empty() {
        return Ok(vec![PAGE_SIZE as u64; meta.blocks.len()]);
    }
    if page_sizes.len() != meta.blocks.len() {
        return Err(invalid(format!("{} page sizes for {} RAM blocks", page_sizes.len(), meta.blocks.len())));
    }
    for (b, &p) in meta.blocks.iter().zip(&page_sizes) {
        if !p.is_power_of_two() || p < PAGE_SIZE as u64 || b.bytes % p != 0 {
            return Err(invalid(format!("RAM block {} of {} bytes cannot have host pages of {p} bytes", b.name, b.bytes)));
        }
    }
    Ok(page_sizes)
}

fn command<W: Write>(w: &mut W, cmd: u16, data: &[u8]) -> io::Result<()> {
    w.write_all(&[SEC_COMMAND])?;
    w.write_all(&cmd.to_be_bytes())?;
    w.write_all(&(data.len() as u16).to_be_bytes())?;
    w.write_all(data)
}

/// A message on QEMU's return path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RpMessage {
    /// QEMU will send no more (`0`: it finished well).
    Shut(u32),
    /// Answer to a ping.
    Pong(u32),
    /// Pages wanted.
    ReqPages {
        /// RAM block (`None`: the last request's).
        block: Option<String>,
        /// Byte offset in the block.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// The pages QEMU has of one block.
    RecvBitmap {
        /// RAM block.
        block: String,
        /// Bit `i % 8` of byte `i / 8`: page `i`.
        bitmap: Vec<u8>,
    },
    /// A resumed destination is ready.
    ResumeAck(u32),
}

/// Reads one return-path message. A bitmap is at most `bitmap_max` bytes.
pub fn read_message<R: Read>(r: &mut R, bitmap_max: usize) -> io::Result<RpMessage> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h)?;
    let (ty, len) = (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]) as usize);
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    let be32 = |d: &[u8]| -> io::Result<u32> {
        d.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(|| invalid(format!("return-path message {ty} too short")))
    };
    let str8 = |d: &[u8]| -> io::Result<String> {
        let n = *d.first().ok_or_else(|| invalid("missing block name".into()))? as usize;
        let s = d.get(1..1 + n).ok_or_else(|| invalid("block name past the message".into()))?;
        String::from_utf8(s.to_vec()).map_err(|_| invalid("block name is not UTF-8".into()))
    };
    match ty {
        RP_SHUT => Ok(RpMessage::Shut(be32(&data)?)),
        RP_PONG => Ok(RpMessage::Pong(be32(&data)?)),
        RP_REQ_PAGES | RP_REQ_PAGES_ID => {
            if data.len() < 12 {
                return Err(invalid("page request too short".into()));
            }
            let offset = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
            let len = be32(&data[8..])?;
            let block = if ty == RP_REQ_PAGES_ID { Some(str8(&data[12..])?) } else { None };
            Ok(RpMessage::ReqPages { block, offset, len })
        }
        RP_RECV_BITMAP => {
            let block = str8(&data)?;
            let mut b8 = [0u8; 8];
            r.read_exact(&mut b8)?;
            let size = u64::from_be_bytes(b8) as usize;
            if size > bitmap_max {
                return Err(invalid(format!("bitmap of {size} bytes for block {block} (at most {bitmap_max})")));
            }
            let mut bitmap = vec![0u8; size];
            r.read_exact(&mut bitmap)?;
            r.read_exact(&mut b8)?;
            if u64::from_be_bytes(b8) != RECV_BITMAP_ENDING {
                return Err(invalid(format!("bitmap of block {block} without its end marker")));
            }
            Ok(RpMessage::RecvBitmap { block, bitmap })
        }
        RP_RESUME_ACK => Ok(RpMessage::ResumeAck(be32(&data)?)),
        t => Err(invalid(format!("unknown return-path message type {t}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcsnap_protocol::manifest::Block;

    fn meta() -> StreamMeta {
        StreamMeta {
            head: b"QEVM\0\0\0\x03".to_vec(),
            machine: "m".into(),
            ram_section: (2, 0, 4),
            footers: true,
            blocks: vec![Block { name: "pc.ram".into(), bytes: 8 * 4096 }, Block { name: "pc.rom".into(), bytes: 4096 }],
        }
    }

    #[test]
    fn a_stream_has_the_commands_in_qemus_order() {
        let mut s = Source::start(Vec::new(), meta()).expect("start");
        let tail = [&[0x04u8, 0, 0, 0, 9][..], b"devices", &[SEC_EOF, 0x06, 0, 0, 0, 2], b"{}"].concat();
        s.package(&tail).expect("package");
        s.page(0, 3, Some(&[7u8; 4096])).expect("page");
        s.page(0, 4, None).expect("zero");
        s.page(1, 0, Some(&[1u8; 4096])).expect("page");
        assert!(s.page(1, 1, None).is_err(), "past the block");
        let out = s.finish().expect("finish");
        let head = 8;
        assert_eq!(&out[head..head + 5], &[SEC_COMMAND, 0, 1, 0, 0], "open return path");
        assert_eq!(&out[head + 5..head + 10], &[SEC_COMMAND, 0, 3, 0, 16], "advise");
        let pkg_at = out.windows(5).position(|w| w == [SEC_COMMAND, 0, 7, 0, 4]).expect("package");
        let len = u32::from_be_bytes(out[pkg_at + 5..pkg_at + 9].try_into().expect("4")) as usize;
        let pkg = &out[pkg_at + 9..pkg_at + 9 + len];
        assert_eq!(&pkg[..5], &[SEC_COMMAND, 0, 4, 0, 0], "listen first");
        assert_eq!(&pkg[5..5 + 12], &[&[0x04u8, 0, 0, 0, 9][..], b"devices"].concat()[..], "devices without EOF and description");
        assert_eq!(&pkg[len - 5..], &[SEC_COMMAND, 0, 5, 0, 0], "run last");
        assert_eq!(&out[out.len() - 1..], &[SEC_EOF]);
    }

    #[test]
    fn early_pages_come_after_the_discard_and_before_the_package() {
        let page = [9u8; 4096];
        let mut s = Source::start_with(Vec::new(), meta(), Vec::new(), [(0, 2, Some(&page[..])), (0, 5, None), (0, 0, None)]).expect("start");
        let tail = [&[0x04u8, 0, 0, 0, 9][..], b"devices", &[SEC_EOF, 0x06, 0, 0, 0, 2], b"{}"].concat();
        s.package(&tail).expect("package");
        let out = s.finish().expect("finish");
        let data_at = out.windows(4096).position(|w| w == page).expect("early page");
        let discard_at = out.windows(3).position(|w| w == [SEC_COMMAND, 0, 6]).expect("discard");
        let pkg_at = out.windows(3).position(|w| w == [SEC_COMMAND, 0, 7]).expect("package");
        assert!(discard_at < data_at && data_at < pkg_at, "discard (huge pages off), early pages, package");
        // Page 2's record: its offset with the page flag, the block named.
        let rec = ((2 * 4096u64) | F_PAGE).to_be_bytes();
        assert_eq!(&out[data_at - 8 - 7..data_at - 7], &rec, "page 2 of pc.ram");
    }

    #[test]
    fn huge_pages_are_in_the_advice_the_ram_list_and_the_discard() {
        let mut m = meta();
        m.blocks[0].bytes = 4 << 20;
        let out = Source::start_with(Vec::new(), m.clone(), vec![2 << 20, 4096], std::iter::empty()).expect("start").finish().expect("finish");
        let advise_at = out.windows(5).position(|w| w == [SEC_COMMAND, 0, 3, 0, 16]).expect("advise");
        assert_eq!(&out[advise_at + 5..advise_at + 13], &((2u64 << 20) | 4096).to_be_bytes(), "the OR of the page sizes");
        let name_at = out.windows(7).position(|w| w == b"\x06pc.ram").expect("pc.ram listed");
        assert_eq!(&out[name_at + 7..name_at + 15], &(4u64 << 20).to_be_bytes(), "its length");
        assert_eq!(&out[name_at + 15..name_at + 23], &(2u64 << 20).to_be_bytes(), "its host page size");
        assert_eq!(out[name_at + 23], 6, "pc.rom next, no page size (4 KiB)");
        let discard_at = out.windows(3).position(|w| w == [SEC_COMMAND, 0, 6]).expect("discard");
        assert_eq!(&out[discard_at + 5 + 9 + 8..discard_at + 5 + 9 + 16], &(2u64 << 20).to_be_bytes(), "a whole host page discarded");
        assert!(Source::start_with(Vec::new(), m.clone(), vec![2 << 20, 4096], [(0, 600, None)]).is_err(), "no early page in huge pages");
        assert!(Source::start_with(Vec::new(), m.clone(), vec![3 << 20, 4096], std::iter::empty()).is_err(), "not a power of two");
        assert!(Source::start_with(Vec::new(), m, vec![4096], std::iter::empty()).is_err(), "one size per block");
    }

    #[test]
    fn return_path_messages_parse_and_junk_is_an_error() {
        let mut m = vec![0, 3, 0, 19];
        m.extend_from_slice(&4096u64.to_be_bytes());
        m.extend_from_slice(&4096u32.to_be_bytes());
        m.push(6);
        m.extend_from_slice(b"pc.ram");
        m.extend_from_slice(&[0, 4, 0, 12]);
        m.extend_from_slice(&8192u64.to_be_bytes());
        m.extend_from_slice(&4096u32.to_be_bytes());
        m.extend_from_slice(&[0, 5, 0, 7, 6]);
        m.extend_from_slice(b"pc.ram");
        m.extend_from_slice(&8u64.to_be_bytes());
        m.extend_from_slice(&[0b101, 0, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&RECV_BITMAP_ENDING.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 4, 0, 0, 0, 0]);
        let mut r = &m[..];
        assert_eq!(read_message(&mut r, 64).expect("id"), RpMessage::ReqPages { block: Some("pc.ram".into()), offset: 4096, len: 4096 });
        assert_eq!(read_message(&mut r, 64).expect("req"), RpMessage::ReqPages { block: None, offset: 8192, len: 4096 });
        assert_eq!(read_message(&mut r, 64).expect("bitmap"), RpMessage::RecvBitmap { block: "pc.ram".into(), bitmap: vec![0b101, 0, 0, 0, 0, 0, 0, 0] });
        assert_eq!(read_message(&mut r, 64).expect("shut"), RpMessage::Shut(0));
        assert!(read_message(&mut r, 64).is_err(), "end of stream");
        for junk in [&[0u8, 9, 0, 0][..], &[0, 3, 0, 2, 1, 2], &[0, 5, 0, 1, 6]] {
            assert!(read_message(&mut &junk[..], 64).is_err(), "{junk:?}");
        }
    }
}
