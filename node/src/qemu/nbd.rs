//! A small NBD client: the fixed-newstyle handshake, `NBD_OPT_GO` for one export, and reads
//! with simple replies (see the NBD protocol, `doc/proto.md` of the NBD project). It reads the
//! point-in-time view of a disk that QEMU's own NBD server exports during a snapshot.

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
}

impl NbdClient {
    /// Connects to the server on `sock` and opens export `name`.
    pub async fn connect(sock: &std::path::Path, name: &str) -> Result<Self, NbdError> {
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
        // NBD_OPT_GO: the name, and no particular information asked for.
        let mut opt = Vec::with_capacity(26 + name.len());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).await?;
        let mut size = None;
        loop {
            if s.read_u64().await? != OPT_REPLY_MAGIC {
                return Err(proto("bad option reply magic".into()));
            }
            let (_opt, typ, len) = (s.read_u32().await?, s.read_u32().await?, s.read_u32().await?);
            if len > OPT_REPLY_BYTES_MAX {
                return Err(proto(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            match typ {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap_or_default()));
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(proto(format!("the server refused export {name:?} (error {:#x}: {})", t, String::from_utf8_lossy(&data))))
                }
                t => return Err(proto(format!("unexpected option reply {t:#x}"))),
            }
        }
        let size = size.ok_or_else(|| proto("the server did not say the export's size".into()))?;
        Ok(Self { s, size, next_handle: 1 })
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
