//! Every bound a server puts on what its clients can take, in one place, each with its value
//! and why (ARCHITECTURE.md's protocol section lists them too), and the pieces that enforce
//! them: `Bounded` (connections, by address too; idle connections), `Gate` (requests in
//! flight, long polls, buffered bytes, record streams, each overall and by address) and
//! `Paced` (a request body's deadline and its minimum rate).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::serve::Listener;
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Largest request body: one `RecordStream` frame's worth (a batch and one record past it).
pub const MAX_BODY: usize = crate::wire::protocol::MAX_FRAME;
/// Connections open at once (more wait in the kernel's backlog), and from one address: one
/// address cannot take every descriptor (a thousand idle sockets took a server down).
pub const MAX_CONNECTIONS: usize = 1024;
pub const MAX_CONNECTIONS_PER_ADDR: usize = 64;
/// A connection that moves no byte for this long is closed (above `protocol::MAX_WAIT`, so a
/// long poll is never cut).
pub const IDLE: Duration = Duration::from_secs(90);
/// A request's head must arrive whole within this (a client that opens and sends nothing, or
/// a byte a minute, holds no connection long).
pub const HEADER_READ: Duration = Duration::from_secs(10);
/// TLS handshakes going on at once (more connections wait in the kernel's backlog), and from
/// one address; one not finished in `HANDSHAKE_TIME` is dropped.
pub const MAX_HANDSHAKES: usize = 64;
pub const MAX_HANDSHAKES_PER_ADDR: usize = 8;
pub const HANDSHAKE_TIME: Duration = Duration::from_secs(10);
/// Requests doing work at once, over every route (store work runs on that many blocking
/// threads at most), and from one address: a quarter of them. A request takes its turn once
/// its body is in, so a slow sender holds none. It waits at most `IN_FLIGHT_WAIT` for one,
/// then is told to come back (503; 429 past its address's share).
pub const MAX_IN_FLIGHT: usize = 64;
pub const MAX_IN_FLIGHT_PER_ADDR: usize = 16;
pub const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);
/// Long polls of the heads waiting at once, outside `MAX_IN_FLIGHT` (a waiting poll costs a
/// timer, not a thread): past either bound, a poll is answered at once instead of waiting.
pub const MAX_LONG_POLLS: usize = 512;
pub const MAX_LONG_POLLS_PER_ADDR: usize = 16;
/// Request bytes held in memory at once, counted as they arrive: bodies being received and
/// handled, and the frames of record streams being read, checked and stored; and from one
/// address (a push's stream holds up to three batches of `replica::MAX_BATCH_BYTES`). With
/// the rest of a server's memory, this keeps it under half a GiB however many clients push.
pub const MAX_BUFFERED: usize = 320 << 20;
pub const MAX_BUFFERED_PER_ADDR: usize = 128 << 20;
/// Time a request may take once it is in (a record stream's, per piece).
pub const REQUEST_TIME: Duration = Duration::from_secs(120);
/// A buffered body must arrive within this; any body, stream or not, must bring at least
/// `MIN_BODY_RATE` in each `RATE_WINDOW` the server spends waiting for it: a trickle is cut, and
/// a fast start earns no credit for a trickle after it (time the server is busy elsewhere and
/// does not read does not count against the client).
pub const BODY_DEADLINE: Duration = Duration::from_secs(600);
pub const MIN_BODY_RATE: u64 = 64 << 10;
pub const RATE_WINDOW: Duration = Duration::from_secs(20);
/// Record streams open at once, and from one address: a stream's bytes count against
/// `MAX_BUFFERED` as they arrive, and it works on at most two blocking threads at a time.
pub const MAX_STREAMS: usize = 16;
pub const MAX_STREAMS_PER_ADDR: usize = 2;
/// Bytes of a record stream read and dropped after one of its batches was refused, so the
/// client still sending hears why.
pub const DRAIN: usize = crate::wire::protocol::MAX_FRAME * 2;
/// Capsule stores open at once (each costs descriptors, a thread and memory); one idle this
/// long is closed, whatever the number open.
pub const MAX_OPEN_STORES: usize = 64;
pub const STORE_IDLE: Duration = Duration::from_secs(60);
// Work per request on a capsule is bounded where the replica answers it, by the protocol's
// own `wire::MAX_SINCE_RECORDS`, `wire::MAX_BLOOM_RECORDS` and `wire::MAX_HASHES`.

/// The bounds an operator may set (`capsulefs serve` flags, or `[limits]` in its config
/// file); the rest are fixed above.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub idle: Duration,
    pub connections: usize,
    pub connections_per_addr: usize,
    pub open_stores: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle: IDLE,
            connections: MAX_CONNECTIONS,
            connections_per_addr: MAX_CONNECTIONS_PER_ADDR,
            open_stores: MAX_OPEN_STORES,
        }
    }
}

/// A listener that holds at most `connections` open, `connections_per_addr` from one
/// address (more are closed as they come), each closed after `idle` without traffic.
pub struct Bounded<L> {
    inner: L,
    slots: Arc<Semaphore>,
    per_addr: Arc<PerAddr>,
    per_addr_max: usize,
    idle: Duration,
}

impl<L> Bounded<L> {
    pub fn new(inner: L, limits: &Limits) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(limits.connections)),
            per_addr: Arc::default(),
            per_addr_max: limits.connections_per_addr,
            idle: limits.idle,
        }
    }
}

impl<L: Listener<Addr = SocketAddr>> Bounded<L> {
    /// The next connection within the bounds, with its peer's address.
    pub async fn accept(&mut self) -> (Idle<L::Io>, SocketAddr) {
        loop {
            let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
            let (io, peer) = self.inner.accept().await;
            let Some(counted) = self.per_addr.enter(peer.ip(), self.per_addr_max) else {
                tracing::info!("closed a connection from {peer}: {} of its connections are open", self.per_addr_max);
                continue; // `io` and `slot` dropped: the socket closes at once.
            };
            let idle = Idle {
                io,
                limit: self.idle,
                deadline: Box::pin(tokio::time::sleep(self.idle)),
                _slot: slot,
                _counted: counted,
                session: Session { peer, opened: Instant::now(), bytes_in: 0, bytes_out: 0, timed_out: false },
            };
            return (idle, peer);
        }
    }
}

/// What one connection did, logged in one line when it closes.
struct Session {
    peer: SocketAddr,
    opened: Instant,
    bytes_in: u64,
    bytes_out: u64,
    timed_out: bool,
}

/// A connection that fails with `TimedOut` once it has been waiting on its peer for `limit`;
/// it gives its slots back, and logs its session, when dropped.
pub struct Idle<Io> {
    io: Io,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
    _counted: Counted,
    session: Session,
}

impl<Io> Drop for Idle<Io> {
    fn drop(&mut self) {
        let s = &self.session;
        tracing::info!(
            "peer {}: {} bytes in, {} bytes out, {:.1} s{}",
            s.peer,
            s.bytes_in,
            s.bytes_out,
            s.opened.elapsed().as_secs_f64(),
            if s.timed_out { ", closed after idling" } else { "" }
        );
    }
}

impl<Io> Idle<Io> {
    /// What a waiting read or write returns: progress restarts the clock; waiting past the
    /// deadline is an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.deadline.as_mut().reset(Instant::now() + self.limit);
                Poll::Ready(result)
            }
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => {
                self.session.timed_out = true;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no traffic for {} s: connection closed", self.limit.as_secs()),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Idle<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.session.bytes_in += (buf.filled().len() - before) as u64;
        self.watch(cx, polled)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Idle<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.session.bytes_out += n as u64;
        }
        self.watch(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The address a request came from, put in each request's extensions by the server's accept
/// loop (over plain TCP and TLS alike).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// The address `peer` is counted as (see `PerAddr`).
fn counted_as(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
        v4 => v4,
    }
}

/// Things held by address, counted (connections, requests, bytes), at most `max` per address.
/// An IPv6 address counts with its /64 (one host or site holds a whole /64), and an IPv4
/// address mapped into IPv6 as itself.
#[derive(Default)]
pub struct PerAddr {
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddr {
    /// One more held by `peer`, or None when it already holds `max`.
    pub fn enter(self: &Arc<Self>, peer: IpAddr, max: usize) -> Option<Counted> {
        self.enter_n(peer, 1, max)
    }

    /// `n` more held by `peer`, or None when that would pass `max`.
    pub fn enter_n(self: &Arc<Self>, peer: IpAddr, n: usize, max: usize) -> Option<Counted> {
        let peer = counted_as(peer);
        let mut held = self.held.lock().expect("no panics while locked");
        let count = held.entry(peer).or_default();
        if *count + n > max {
            if *count == 0 {
                held.remove(&peer);
            }
            return None;
        }
        *count += n;
        Some(Counted { of: self.clone(), peer, n })
    }
}

/// What is counted against an address until dropped.
pub struct Counted {
    of: Arc<PerAddr>,
    peer: IpAddr,
    n: usize,
}

impl Counted {
    /// Takes what `other` counts (of the same address) into this one.
    fn merge(&mut self, mut other: Counted) {
        debug_assert_eq!(self.peer, other.peer);
        self.n += std::mem::take(&mut other.n);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut held = self.of.held.lock().expect("no panics while locked");
        if let Some(count) = held.get_mut(&self.peer) {
            *count -= self.n.min(*count);
            if *count == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

/// What a request is refused for when the server is full: said to the client as 503 with the
/// reason, and counted in `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    InFlight,
    PeerInFlight,
    Buffered,
    PeerBuffered,
    Streams,
    PeerStreams,
}

impl Busy {
    pub fn reason(self) -> &'static str {
        match self {
            Busy::InFlight => "busy",
            Busy::PeerInFlight => "peer_busy",
            Busy::Buffered => "memory_busy",
            Busy::PeerBuffered => "peer_memory_busy",
            Busy::Streams => "streams_busy",
            Busy::PeerStreams => "peer_streams_busy",
        }
    }

    pub fn message(self) -> String {
        match self {
            Busy::InFlight => format!("{MAX_IN_FLIGHT} requests are in flight: try again shortly"),
            Busy::PeerInFlight => {
                format!("{MAX_IN_FLIGHT_PER_ADDR} of your requests are in flight: wait for one to finish")
            }
            Busy::Buffered => {
                format!("{} MiB of request bodies are held already: try again shortly", MAX_BUFFERED >> 20)
            }
            Busy::PeerBuffered => {
                format!(
                    "{} MiB of your request bodies are held already: wait for one to finish",
                    MAX_BUFFERED_PER_ADDR >> 20
                )
            }
            Busy::Streams => format!("{MAX_STREAMS} record streams are being stored: try again shortly"),
            Busy::PeerStreams => format!("{MAX_STREAMS_PER_ADDR} of your record streams are being stored"),
        }
    }
}

/// The shared bounds on requests: in flight, long polls, buffered bytes and streams, each
/// overall and by address.
pub struct Gate {
    in_flight: Arc<Semaphore>,
    in_flight_by: Arc<PerAddr>,
    polls: Arc<Semaphore>,
    polls_by: Arc<PerAddr>,
    /// In bytes.
    buffered: Arc<Semaphore>,
    buffered_by: Arc<PerAddr>,
    streams: Arc<Semaphore>,
    streams_by: Arc<PerAddr>,
}

/// A request's turn: held until its work is done.
pub struct Turn {
    _slot: OwnedSemaphorePermit,
    _counted: Counted,
}

/// Room for bytes of request bodies in memory, held while they are; it grows as they arrive.
#[derive(Default)]
pub struct Room {
    held: Option<(OwnedSemaphorePermit, Counted)>,
}

impl Room {
    /// Takes `more` into this room.
    pub fn grow(&mut self, more: Room) {
        match (&mut self.held, more.held) {
            (Some((permit, counted)), Some((p, c))) => {
                permit.merge(p);
                counted.merge(c);
            }
            (held @ None, more) => *held = more,
            (Some(_), None) => {}
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            in_flight_by: Arc::default(),
            polls: Arc::new(Semaphore::new(MAX_LONG_POLLS)),
            polls_by: Arc::default(),
            buffered: Arc::new(Semaphore::new(MAX_BUFFERED)),
            buffered_by: Arc::default(),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            streams_by: Arc::default(),
        }
    }
}

impl Gate {
    /// A turn for one request from `peer` (waiting up to `IN_FLIGHT_WAIT`).
    pub async fn turn(&self, peer: IpAddr) -> Result<Turn, Busy> {
        let counted = self.in_flight_by.enter(peer, MAX_IN_FLIGHT_PER_ADDR).ok_or(Busy::PeerInFlight)?;
        waited_turn(&self.in_flight, counted, IN_FLIGHT_WAIT, Busy::InFlight).await
    }

    /// A place for one long poll from `peer`, or None: then the poll is answered at once.
    pub fn long_poll(&self, peer: IpAddr) -> Option<Turn> {
        let counted = self.polls_by.enter(peer, MAX_LONG_POLLS_PER_ADDR)?;
        let slot = self.polls.clone().try_acquire_owned().ok()?;
        Some(Turn { _slot: slot, _counted: counted })
    }

    /// Room for `bytes` more of `peer`'s bodies in memory (waiting up to `IN_FLIGHT_WAIT`
    /// for the server's, at once refused past the address's share).
    pub async fn room(&self, peer: IpAddr, bytes: usize) -> Result<Room, Busy> {
        let bytes = bytes.min(MAX_BUFFERED_PER_ADDR);
        let counted = self.buffered_by.enter_n(peer, bytes, MAX_BUFFERED_PER_ADDR).ok_or(Busy::PeerBuffered)?;
        let n = u32::try_from(bytes).expect("MAX_BUFFERED_PER_ADDR fits in u32");
        let permit = tokio::time::timeout(IN_FLIGHT_WAIT, self.buffered.clone().acquire_many_owned(n))
            .await
            .map_err(|_| Busy::Buffered)?
            .expect("the semaphore is never closed");
        Ok(Room { held: Some((permit, counted)) })
    }

    /// A record stream's turn for `peer` (waiting up to `REQUEST_TIME` for one overall).
    pub async fn stream(&self, peer: IpAddr) -> Result<Turn, Busy> {
        let counted = self.streams_by.enter(peer, MAX_STREAMS_PER_ADDR).ok_or(Busy::PeerStreams)?;
        waited_turn(&self.streams, counted, REQUEST_TIME, Busy::Streams).await
    }
}

/// A turn for a request its address's count let in: a slot of `slots`, waited for up to
/// `wait` (`busy` past it).
async fn waited_turn(slots: &Arc<Semaphore>, counted: Counted, wait: Duration, busy: Busy) -> Result<Turn, Busy> {
    let slot = tokio::time::timeout(wait, slots.clone().acquire_owned())
        .await
        .map_err(|_| busy)?
        .expect("the semaphore is never closed");
    Ok(Turn { _slot: slot, _counted: counted })
}

/// A request body held to `BODY_DEADLINE` (when `deadline` is set) and to `MIN_BODY_RATE` in
/// every `RATE_WINDOW` of waiting for it: a client that trickles is cut off with an error,
/// instead of holding a slot and its buffered bytes for as long as it likes.
pub struct Paced {
    inner: Body,
    started: Instant,
    bytes: u64,
    deadline: Option<Instant>,
    /// Bytes come, and time spent waiting for them, in the window being judged.
    window_bytes: u64,
    window_waited: Duration,
    /// Since when the server has been waiting for the next piece, if it is.
    waiting_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl Paced {
    pub fn new(inner: Body, deadline: bool) -> Self {
        let started = Instant::now();
        let deadline = deadline.then(|| started + BODY_DEADLINE);
        Self {
            inner,
            started,
            bytes: 0,
            deadline,
            window_bytes: 0,
            window_waited: Duration::ZERO,
            waiting_since: None,
            timer: Box::pin(tokio::time::sleep(RATE_WINDOW)),
        }
    }

    /// Time waited in this window, counting the wait going on.
    fn waited(&self, now: Instant) -> Duration {
        self.window_waited + self.waiting_since.map_or(Duration::ZERO, |since| now - since)
    }

    /// Judges the window once `RATE_WINDOW` of waiting has passed: a new one starts if it
    /// brought enough, else the body is late.
    fn judge(&mut self, now: Instant) -> Result<(), String> {
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(format!("the request body did not arrive within {} s", BODY_DEADLINE.as_secs()));
        }
        if self.waited(now) < RATE_WINDOW {
            return Ok(());
        }
        if self.window_bytes < MIN_BODY_RATE * RATE_WINDOW.as_secs() {
            return Err(format!(
                "the request body came too slowly ({} bytes in the last {} s of waiting, {} in {:.0} s in all; at \
                 least {} KiB/s)",
                self.window_bytes,
                RATE_WINDOW.as_secs(),
                self.bytes,
                self.started.elapsed().as_secs_f64(),
                MIN_BODY_RATE >> 10
            ));
        }
        self.window_bytes = 0;
        self.window_waited = Duration::ZERO;
        self.waiting_since = self.waiting_since.map(|_| now);
        Ok(())
    }

    /// Sets the timer for when the wait going on would end the window (or the deadline).
    fn rearm(&mut self, now: Instant) {
        let window_end = now + RATE_WINDOW.saturating_sub(self.waited(now));
        let due = self.deadline.map_or(window_end, |d| d.min(window_end));
        self.timer.as_mut().reset(due);
    }

    fn late(why: String) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Poll::Ready(Some(Err(axum::Error::new(io::Error::new(io::ErrorKind::TimedOut, why)))))
    }
}

impl http_body::Body for Paced {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let now = Instant::now();
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(since) = self.waiting_since.take() {
                    self.window_waited += now - since;
                }
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    self.window_bytes += data.len() as u64;
                }
                match self.judge(now) {
                    Ok(()) => Poll::Ready(Some(Ok(frame))),
                    Err(why) => Self::late(why),
                }
            }
            Poll::Pending => {
                if self.waiting_since.is_none() {
                    self.waiting_since = Some(now);
                }
                if let Err(why) = self.judge(now) {
                    return Self::late(why);
                }
                self.rearm(now);
                // Polled once armed, so that the timer wakes this task when it is due.
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => match self.judge(Instant::now()) {
                        Err(why) => Self::late(why),
                        Ok(()) => {
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                    },
                    Poll::Pending => Poll::Pending,
                }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_a_mapped_ipv4_as_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(counted_as(a), counted_as(b));
        assert_ne!(counted_as(a), counted_as(other));
        let mapped: IpAddr = "::ffff:127.0.0.9".parse().unwrap();
        assert_eq!(counted_as(mapped), "127.0.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(counted_as("127.0.0.9".parse().unwrap()), "127.0.0.9".parse::<IpAddr>().unwrap());
    }
}
