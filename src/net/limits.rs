//! What one peer, or everyone together, can hold of a server: open connections, idle time on
//! a connection, and requests in flight per peer address.
//!
//! `Bounded` wraps any listener (plain TCP or TLS): it accepts only while fewer than
//! `max_connections` are open (the rest wait in the kernel's backlog), each connection is
//! closed once it has moved no byte for `idle` (a client that sends half a request and stops,
//! or never reads its answer), and each logs one line when it closes: peer, bytes each way,
//! how long, and whether it idled out. `PerPeer` counts requests in flight by address, so one
//! busy or hostile peer cannot take every worker from the others.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// A listener that holds at most `max_connections` open, each closed after `idle` without
/// traffic.
pub struct Bounded<L> {
    inner: L,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl<L> Bounded<L> {
    pub fn new(inner: L, max_connections: usize, idle: Duration) -> Self {
        Self { inner, slots: Arc::new(Semaphore::new(max_connections)), idle }
    }
}

impl<L: Listener<Addr = SocketAddr>> Listener for Bounded<L> {
    type Io = Idle<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (io, peer) = self.inner.accept().await;
        let idle = Idle {
            io,
            limit: self.idle,
            deadline: Box::pin(tokio::time::sleep(self.idle)),
            _slot: slot,
            session: Session { peer, opened: Instant::now(), bytes_in: 0, bytes_out: 0, timed_out: false },
        };
        (idle, peer)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
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
/// it gives its slot back, and logs its session, when dropped.
pub struct Idle<Io> {
    io: Io,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
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

/// The address a connection came from, as the per-peer limit sees it (axum gives the
/// address only for a bare `TcpListener`; this works over `Bounded` and TLS alike).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl<L: Listener<Addr = SocketAddr>> Connected<IncomingStream<'_, Bounded<L>>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, Bounded<L>>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// Requests in flight by peer address.
#[derive(Default)]
pub struct PerPeer {
    in_flight: Mutex<HashMap<IpAddr, usize>>,
}

impl PerPeer {
    /// A place for one more request from `peer`, or None when it already has `max` in flight.
    pub fn enter(self: &Arc<Self>, peer: IpAddr, max: usize) -> Option<InFlight> {
        let mut counts = self.in_flight.lock().expect("no panics while locked");
        let count = counts.entry(peer).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(InFlight { peers: self.clone(), peer })
    }
}

/// One request counted against its peer until dropped.
pub struct InFlight {
    peers: Arc<PerPeer>,
    peer: IpAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self.peers.in_flight.lock().expect("no panics while locked");
        if let Some(count) = counts.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}
