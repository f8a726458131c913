//! Pages fetched from other members, shared between the fetches running on this node at once
//! (restores of clones of one VM, VMs of one image, a restore beside a verify): a page that
//! several of them want is fetched from its owners once. The first to want it leads (fetches
//! it); the others follow (wait for the leader's copy, for at most [`FOLLOW_WAIT`], then fetch
//! it themselves), or find it among the last [`RECENT_PAGES`] fetched.
//!
//! Everything here lives only while some fetch is running ([`FetchShare::enter`]): once the
//! last one ends, the recent pages are dropped, so an idle node holds none of them; and a
//! fetch running alone keeps a page only for a follower (no copy per page fetched).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use vmcsnap_protocol::PageHash;

/// Pages kept after their fetch (32 MiB), for fetches that come a little later. Each is a
/// slice of the `Get` answer it came in (up to 1 MiB), which lives until its last kept page
/// goes; pages are kept and dropped in the order they came, so that is a few answers more.
pub const RECENT_PAGES: usize = 8192;
/// Longest a follower waits for a leader's copy before it fetches the page itself: a leader's
/// fetch may sit unpolled behind its restore's full queue, and a guest's page fault must not
/// wait on another guest's pace.
pub const FOLLOW_WAIT: Duration = Duration::from_millis(200);

/// A fetched page, or `None` while its leader fetches it.
type Cell = watch::Receiver<Option<Bytes>>;

/// The node's shared fetches.
#[derive(Default)]
pub struct FetchShare {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Pages being fetched (a cell still `None`) or fetched lately.
    pages: HashMap<PageHash, Cell>,
    /// The fetched ones, oldest first.
    recent: VecDeque<PageHash>,
    /// Fetches running.
    users: usize,
}

/// What a fetch does about each page it wants (see [`FetchShare::claim`]).
#[derive(Default)]
pub struct Claim {
    /// Fetched lately by another fetch: here.
    pub have: Vec<(PageHash, Bytes)>,
    /// Being fetched by another: wait for it ([`follow`]).
    pub follow: Vec<(PageHash, Cell)>,
    /// Fetch it, then [`FetchShare::led`].
    pub lead: Vec<(PageHash, watch::Sender<Option<Bytes>>)>,
}

/// A running fetch: the share lives while one does.
pub struct Entered<'a>(&'a FetchShare);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut i = self.0.lock();
        i.users -= 1;
        if i.users == 0 {
            *i = Inner::default();
        }
    }
}

impl FetchShare {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fetch starts; the share lives until every such guard is dropped.
    pub fn enter(&self) -> Entered<'_> {
        self.lock().users += 1;
        Entered(self)
    }

    /// Sorts `hashes` (distinct) into those another fetch has, those it is fetching, and those
    /// this fetch leads.
    pub fn claim(&self, hashes: &[PageHash]) -> Claim {
        let mut c = Claim::default();
        let mut i = self.lock();
        for h in hashes {
            // Fetched lately, being fetched, or neither (or its leader gave up): lead it.
            let seen = i.pages.get(h).map(|cell| (cell.borrow().clone(), cell.has_changed().is_ok(), cell.clone()));
            match seen {
                Some((Some(p), _, _)) => c.have.push((*h, p)),
                Some((None, true, cell)) => c.follow.push((*h, cell)),
                _ => c.lead.push((*h, Self::insert(&mut i, *h))),
            }
        }
        c
    }

    fn insert(i: &mut Inner, h: PageHash) -> watch::Sender<Option<Bytes>> {
        let (tx, rx) = watch::channel(None);
        i.pages.insert(h, rx);
        tx
    }

    /// A led page's fetch ended: `page` (verified) for its followers and later fetches, or
    /// `None` (the fetch failed: followers fetch it themselves). A fetch running alone with no
    /// follower keeps nothing (no copy of every page it fetches).
    pub fn led(&self, h: PageHash, tx: watch::Sender<Option<Bytes>>, page: Option<&Bytes>) {
        let mut i = self.lock();
        let wanted = i.users > 1 || tx.receiver_count() > 1;
        match page {
            Some(p) if wanted => {
                let _ = tx.send(Some(p.clone()));
                i.recent.push_back(h);
                while i.recent.len() > RECENT_PAGES {
                    if let Some(old) = i.recent.pop_front() {
                        i.pages.remove(&old);
                    }
                }
            }
            _ => {
                i.pages.remove(&h);
            }
        }
    }
}

/// Waits for a leader's copy of a page, at most [`FOLLOW_WAIT`]; `None` if it gave up or is
/// slow (fetch the page yourself).
pub async fn follow(mut cell: Cell) -> Option<Bytes> {
    tokio::time::timeout(FOLLOW_WAIT, cell.wait_for(|p| p.is_some())).await.ok()?.ok().and_then(|p| p.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> PageHash {
        PageHash([i; 32])
    }

    #[tokio::test]
    async fn a_page_two_fetches_want_is_fetched_once_and_forgotten_when_both_end() {
        let share = FetchShare::default();
        let a = share.enter();
        let first = share.claim(&[h(1), h(2)]);
        assert_eq!((first.have.len(), first.follow.len(), first.lead.len()), (0, 0, 2));
        let b = share.enter();
        let second = share.claim(&[h(2), h(3)]);
        assert_eq!(second.follow.iter().map(|f| f.0).collect::<Vec<_>>(), [h(2)]);
        assert_eq!(second.lead.iter().map(|f| f.0).collect::<Vec<_>>(), [h(3)]);
        // The leader delivers page 2; gives up on page 1.
        let mut leads = first.lead.into_iter();
        let (h1, tx1) = leads.next().expect("lead 1");
        let (h2, tx2) = leads.next().expect("lead 2");
        share.led(h2, tx2, Some(&Bytes::from(vec![7u8; 8])));
        share.led(h1, tx1, None);
        let (_, cell) = second.follow.into_iter().next().expect("follow");
        assert_eq!(follow(cell).await.as_deref(), Some(&[7u8; 8][..]));
        // Later: page 2 is here, page 1 is to be led again.
        let third = share.claim(&[h(1), h(2)]);
        assert_eq!((third.have.len(), third.lead.len()), (1, 1));
        // A leader that drops its sender without a word: its followers stop waiting.
        let fourth = share.claim(&[h(1)]);
        drop(third);
        let (_, cell) = fourth.follow.into_iter().next().expect("follow 1");
        assert_eq!(follow(cell).await, None);
        drop((a, b));
        assert!(share.lock().pages.is_empty() && share.lock().recent.is_empty(), "nothing kept once every fetch ended");
    }

    #[tokio::test]
    async fn recent_pages_are_bounded_and_kept_only_while_another_fetch_runs() {
        let share = FetchShare::default();
        let alone = share.enter();
        let c = share.claim(&[h(1)]);
        for (hh, tx) in c.lead {
            share.led(hh, tx, Some(&Bytes::from(vec![1u8])));
        }
        assert!(share.lock().pages.is_empty(), "a fetch alone keeps nothing");
        let _other = share.enter();
        drop(alone);
        let _e = share.enter();
        for i in 0..(RECENT_PAGES + 10) as u32 {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_le_bytes());
            let c = share.claim(&[PageHash(b)]);
            for (hh, tx) in c.lead {
                share.led(hh, tx, Some(&Bytes::from(vec![1u8])));
            }
        }
        let i = share.lock();
        assert_eq!((i.recent.len(), i.pages.len()), (RECENT_PAGES, RECENT_PAGES));
    }
}
