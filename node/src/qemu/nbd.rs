//! A small NBD client: the fixed-newstyle handshake, `NBD_OPT_GO` for one export, reads with
//! simple replies, and — on a connection opened with a metadata context — block status with
//! structured replies (see the NBD protocol, `doc/proto.md` of the NBD project). It reads the
//! point-in-time view of a disk that QEMU's own NBD server exports during a snapshot, and the
//! dirty bitmap that says which blocks changed since the last one.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_META_CONTEXT: u32 = 4;
const CMD_BLOCK_STATUS: u16 = 7;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Largest structured reply chunk accepted.
const CHUNK_BYTES_MAX: u32 = 1 << 20;
/// Longest range asked about in one block-status request.
pub const STATUS_BYTES_MAX: u32 = 1 << 30;
/// Largest read asked for in one request (QEMU's server allows 32 MiB).
pub const READ_BYTES_MAX: u32 = 4 << 20;
/// Largest option reply accepted.
const OPT_REPLY_BYTES_MAX: u32 = 64 << 10;

/// Why an NBD conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("NBD: {0}")]
    Io(#[from] std::io::Error),
    /// The server said something this client does not accept.
    #[error("NBD: {0}")]
    Protocol(String),
}

/// A connection to one export, in transmission phase.
pub struct NbdClient {
    s: UnixStream,
    /// The export's size in bytes.
    pub size: u64,
    next_handle: u64,
    /// The id of the metadata context this connection asked for.
    context: Option<u32>,
}

/// Sends one option request.
async fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).await?;
    Ok(())
}

/// Reads one option reply: its type and data.
async fn option_reply(s: &mut UnixStream) -> Result<(u32, Vec<u8>), NbdError> {
    if s.read_u64().await? != OPT_REPLY_MAGIC {
        return Err(NbdError::Protocol("bad option reply magic".into()));
    }
    let (_opt, typ, len) = (s.read_u32().await?, s.read_u32().await?, s.read_u32().await?);
    if len > OPT_REPLY_BYTES_MAX {
        return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    if typ & 0x8000_0000 != 0 {
        return Err(NbdError::Protocol(format!("the server refused an option (error {typ:#x}: {})", String::from_utf8_lossy(&data))));
    }
    Ok((typ, data))
}

fn string_field(v: &str) -> Vec<u8> {
    [&(v.len() as u32).to_be_bytes()[..], v.as_bytes()].concat()
}

impl NbdClient {
    /// Connects to the server on `sock` and opens export `name`.
    pub async fn connect(sock: &std::path::Path, name: &str) -> Result<Self, NbdError> {
        Self::connect_with(sock, name, None).await
    }

    /// [`NbdClient::connect`], asking for the metadata context `context` (such as
    /// `qemu:dirty-bitmap:NAME`) for [`NbdClient::block_status`]. Reads are not for such a
    /// connection (its replies are structured).
    pub async fn connect_with(sock: &std::path::Path, name: &str, context: Option<&str>) -> Result<Self, NbdError> {
        let proto = |m: String| NbdError::Protocol(m);
        let mut s = UnixStream::connect(sock).await?;
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic).await?;
        if &magic != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
            return Err(proto("not a newstyle NBD server".into()));
        }
        let flags = s.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("the server does not speak fixed newstyle".into()));
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = FLAG_FIXED_NEWSTYLE as u32 | if no_zeroes { FLAG_NO_ZEROES as u32 } else { 0 };
        s.write_u32(client_flags).await?;
        let mut context_id = None;
        if let Some(ctx) = context {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[]).await?;
            if option_reply(&mut s).await?.0 != REP_ACK {
                return Err(proto("the server did not accept structured replies".into()));
            }
            let query = [string_field(name), 1u32.to_be_bytes().to_vec(), string_field(ctx)].concat();
            send_option(&mut s, OPT_SET_META_CONTEXT, &query).await?;
            loop {
                match option_reply(&mut s).await? {
                    (REP_ACK, _) => break,
                    (REP_META_CONTEXT, d) if d.len() >= 4 => context_id = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]])),
                    (t, _) => return Err(proto(format!("unexpected option reply {t:#x}"))),
                }
            }
            if context_id.is_none() {
                return Err(proto(format!("export {name:?} has no metadata context {ctx:?}")));
            }
        }
        // NBD_OPT_GO: the name, and no particular information asked for.
        send_option(&mut s, OPT_GO, &[string_field(name), 0u16.to_be_bytes().to_vec()].concat()).await?;
        let mut size = None;
        loop {
            match option_reply(&mut s).await.map_err(|e| proto(format!("export {name:?}: {e}")))? {
                (REP_ACK, _) => break,
                (REP_INFO, data) if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap_or_default()));
                }
                (REP_INFO, _) => {}
                (t, _) => return Err(proto(format!("unexpected option reply {t:#x}"))),
            }
        }
        let size = size.ok_or_else(|| proto("the server did not say the export's size".into()))?;
        Ok(Self { s, size, next_handle: 1, context: context_id })
    }

    /// The status of `len` bytes (at most [`STATUS_BYTES_MAX`]) at `offset` in this
    /// connection's metadata context: extents `(length, flags)` in order from `offset`,
    /// possibly covering less than `len` (ask again from where they end).
    pub async fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<(u64, u32)>, NbdError> {
        let proto = |m: String| NbdError::Protocol(m);
        let context = self.context.ok_or_else(|| proto("no metadata context on this connection".into()))?;
        let len = len.min(STATUS_BYTES_MAX);
        let handle = self.next_handle;
        self.next_handle += 1;
        self.request(CMD_BLOCK_STATUS, handle, offset, len).await?;
        let mut extents = Vec::new();
        loop {
            if self.s.read_u32().await? != STRUCTURED_REPLY_MAGIC {
                return Err(proto("bad structured reply magic".into()));
            }
            let (flags, typ, h, n) = (self.s.read_u16().await?, self.s.read_u16().await?, self.s.read_u64().await?, self.s.read_u32().await?);
            if h != handle || n > CHUNK_BYTES_MAX {
                return Err(proto(format!("reply chunk for request {h} of {n} bytes")));
            }
            let mut data = vec![0u8; n as usize];
            self.s.read_exact(&mut data).await?;
            if typ & 0x8000 != 0 {
                let msg = data.get(6..).map(String::from_utf8_lossy).unwrap_or_default();
                return Err(proto(format!("block status at {offset} failed: {msg}")));
            }
            if typ == REPLY_TYPE_BLOCK_STATUS && data.len() >= 4 && u32::from_be_bytes([data[0], data[1], data[2], data[3]]) == context {
                for d in data[4..].chunks_exact(8) {
                    extents.push((u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64, u32::from_be_bytes([d[4], d[5], d[6], d[7]])));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if extents.is_empty() || extents.iter().any(|e| e.0 == 0) {
            return Err(proto(format!("no block status at {offset}")));
        }
        Ok(extents)
    }

    /// The byte ranges `(offset, length)` of the whole export whose status has bit 0 set
    /// (for `qemu:dirty-bitmap:` contexts: dirty), merged.
    pub async fn ranges_with_bit0(&mut self) -> Result<Vec<(u64, u64)>, NbdError> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut off = 0u64;
        while off < self.size {
            let len = (self.size - off).min(STATUS_BYTES_MAX as u64) as u32;
            for (l, flags) in self.block_status(off, len).await? {
                let l = l.min(self.size - off);
                if flags & 1 != 0 {
                    match out.last_mut() {
                        Some((o, n)) if *o + *n == off => *n += l,
                        _ => out.push((off, l)),
                    }
                }
                off += l;
                if off >= self.size {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reads `len` bytes (at most [`READ_BYTES_MAX`]) at `offset` into `buf`.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let len = u32::try_from(buf.len()).ok().filter(|l| *l <= READ_BYTES_MAX).ok_or_else(|| NbdError::Protocol("read too large".into()))?;
        let handle = self.next_handle;
        self.next_handle += 1;
        self.request(CMD_READ, handle, offset, len).await?;
        if self.s.read_u32().await? != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad reply magic".into()));
        }
        let (err, h) = (self.s.read_u32().await?, self.s.read_u64().await?);
        if h != handle {
            return Err(NbdError::Protocol(format!("reply to request {h}, expected {handle}")));
        }
        if err != 0 {
            return Err(NbdError::Protocol(format!("read of {len} bytes at {offset} failed (error {err})")));
        }
        self.s.read_exact(buf).await?;
        Ok(())
    }

    async fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32) -> Result<(), NbdError> {
        let mut r = [0u8; 28];
        r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[6..8].copy_from_slice(&cmd.to_be_bytes());
        r[8..16].copy_from_slice(&handle.to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..28].copy_from_slice(&len.to_be_bytes());
        self.s.write_all(&r).await?;
        Ok(())
    }

    /// Ends the conversation politely.
    pub async fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0).await;
        let _ = self.s.shutdown().await;
    }
}
