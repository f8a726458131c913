//! A participant as the coordinator sees it: a [`Session`] that takes commands and yields
//! reports. This node's own participant runs in-process; another host's runs behind one QUIC
//! stream ([`vmcsnap_protocol::wire::DataRequest::Cut`]) with heartbeats both ways, and a
//! silent or broken stream is reported as a failure.

use super::participate::participate;
use crate::engine::error::net_kind;
use crate::net::{read_frame, write_frame_open};
use vmcsnap_protocol::control::ErrorKind;
use crate::node::Node;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use vmcsnap_dht::Member;
use vmcsnap_protocol::wire::{CutBegin, CutCommand, CutReport, DataRequest, CUT_HEARTBEAT_MS, CUT_SILENCE_MAX_MS};

/// The coordinator's handle on one participant.
pub struct Session {
    tx: mpsc::Sender<CutCommand>,
}

impl Session {
    /// Sends a command; a participant that is gone has already reported so.
    pub async fn send(&self, cmd: CutCommand) {
        let _ = self.tx.send(cmd).await;
    }
}

/// Starts a participant for `begin` on `host` (this node runs it in-process). Its reports
/// arrive on `reports` tagged with `index`, then `None` once it has ended; a participant that
/// goes silent or whose stream breaks is reported as `Failed`.
pub async fn start_session(node: &Arc<Node>, host: Member, begin: CutBegin, index: usize, reports: mpsc::Sender<(usize, Option<CutReport>)>) -> Session {
    let (tx, cmd_rx) = mpsc::channel::<CutCommand>(8);
    let (rep_tx, mut rep_rx) = mpsc::channel::<CutReport>(8);
    if host.id == node.id {
        tokio::spawn(participate(node.clone(), begin, cmd_rx, rep_tx));
    } else {
        let node = node.clone();
        tokio::spawn(async move {
            match node.open_session(&host, &DataRequest::Cut(begin)).await {
                Ok((send, recv)) => bridge(send, recv, cmd_rx, rep_tx).await,
                Err(e) => {
                    let _ = rep_tx.send(CutReport::Failed { vm: None, kind: net_kind(&e), reason: format!("cannot start the cut there: {e}") }).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some(r) = rep_rx.recv().await {
            if reports.send((index, Some(r))).await.is_err() {
                return;
            }
        }
        let _ = reports.send((index, None)).await; // this participant has ended
    });
    Session { tx }
}

/// Serves a participant's side of a cut on a data-plane stream.
pub async fn serve(node: Arc<Node>, begin: CutBegin, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    // A peer names only VMs registered here: never a file or socket of its choosing.
    if begin.vms.iter().any(|(_, source)| source.is_some()) {
        let _ = write_frame_open(&mut send, &CutReport::Failed { vm: None, kind: ErrorKind::Invalid, reason: "a remote cut may only name VMs registered on this host".into() }).await;
        let _ = send.finish();
        return;
    }
    // A stopping node waits for this conversation, not only for the part: its last report must
    // reach the coordinator (which then ends the stream) before the endpoint closes.
    let _held = node.drain.enter();
    let (cmd_tx, cmd_rx) = mpsc::channel::<CutCommand>(8);
    let (rep_tx, rep_rx) = mpsc::channel::<CutReport>(8);
    let work = tokio::spawn(participate(node.clone(), begin, cmd_rx, rep_tx));
    bridge(send, recv, rep_rx, cmd_tx).await;
    let _ = work.await;
}

/// Carries a cut's conversation over a QUIC stream, both ways, with heartbeats: frames from
/// `outgoing` go out, frames read come in on `incoming`. Used on both sides, with `O`/`I` the
/// side's outgoing and incoming message types.
async fn bridge<O, I>(mut send: quinn::SendStream, mut recv: quinn::RecvStream, mut outgoing: mpsc::Receiver<O>, incoming: mpsc::Sender<I>)
where
    O: serde::Serialize + Send + Sync + 'static + CutMessage,
    I: serde::de::DeserializeOwned + Send + 'static + CutMessage,
{
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(CUT_HEARTBEAT_MS));
        loop {
            tokio::select! {
                m = outgoing.recv() => match m {
                    Some(m) => {
                        let last = m.is_final();
                        if write_frame_open(&mut send, &m).await.is_err() { break; }
                        if last { let _ = send.finish(); break; }
                    }
                    None => { let _ = send.finish(); break; }
                },
                _ = tick.tick() => {
                    if write_frame_open(&mut send, &O::heartbeat()).await.is_err() { break; }
                }
            }
        }
    });
    loop {
        match tokio::time::timeout(Duration::from_millis(CUT_SILENCE_MAX_MS), read_frame::<I>(&mut recv)).await {
            Ok(Ok(m)) if m.is_heartbeat() => {}
            Ok(Ok(m)) => {
                let last = m.is_final();
                if incoming.send(m).await.is_err() || last {
                    break;
                }
            }
            Ok(Err(e)) => {
                let _ = incoming.send(I::lost(&format!("the connection broke: {e}"))).await;
                break;
            }
            Err(_) => {
                let _ = incoming.send(I::lost(&format!("no word for {} s (host down?)", CUT_SILENCE_MAX_MS / 1000))).await;
                break;
            }
        }
    }
    // Nothing more comes in: say so at once, then let the writer drain what is queued.
    drop(incoming);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// What [`bridge`] needs to know of a cut message.
trait CutMessage: Sized {
    /// The heartbeat message.
    fn heartbeat() -> Self;
    /// Whether this is a heartbeat.
    fn is_heartbeat(&self) -> bool;
    /// Whether this ends the conversation from its sender's side.
    fn is_final(&self) -> bool;
    /// The message standing for "the other side is gone".
    fn lost(reason: &str) -> Self;
}

impl CutMessage for CutCommand {
    fn heartbeat() -> Self {
        CutCommand::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, CutCommand::Heartbeat)
    }
    fn is_final(&self) -> bool {
        false
    }
    fn lost(reason: &str) -> Self {
        CutCommand::Abort { reason: format!("the initiating node is gone: {reason}") }
    }
}

impl CutMessage for CutReport {
    fn heartbeat() -> Self {
        CutReport::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, CutReport::Heartbeat)
    }
    fn is_final(&self) -> bool {
        matches!(self, CutReport::Done { .. })
    }
    fn lost(reason: &str) -> Self {
        CutReport::Failed { vm: None, kind: ErrorKind::Unavailable, reason: reason.to_string() }
    }
}
