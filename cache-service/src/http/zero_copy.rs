//! Plain-HTTP connections that send blob files with `sendfile`: a write whose bytes are a
//! live window of a stored blob's file or of a download's spool (`store::mapped`) goes from
//! the page cache to the socket without the copy through user space that writing the mapped
//! memory costs; every other write is an ordinary one. The bytes are the same either way: the
//! window *is* that file region, and neither a stored blob nor a spool's written bytes change.
//!
//! While a window goes out, the socket is corked (`TCP_CORK`, as nginx's `tcp_nopush`): a
//! window takes several `sendfile` calls when the client is slower than the disk, and each
//! call would otherwise push its partial last segment. A response head written together
//! with a window is corked as well, so it leaves in the window's first segment. The next
//! flush, which hyper makes once it has written what it holds, uncorks. Measured against
//! nginx serving the same file on loopback: its CPU per GB is ~10% lower with `tcp_nopush`
//! than without.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;
use crate::store::mapped;

/// The listener `regmirror serve` runs on: accepted connections are [`ZeroCopyStream`]s.
pub struct ZeroCopyListener {
    listener: TcpListener,
    /// Counts the bytes sent by `sendfile` (`regmirror_bytes_sendfile_total`).
    metrics: Arc<Metrics>,
}

impl ZeroCopyListener {
    pub fn new(listener: TcpListener, metrics: Arc<Metrics>) -> Self {
        Self { listener, metrics }
    }

    /// The next connection, whose writes fail once one has made no progress for
    /// `stalled_write`; failed accepts are logged and retried.
    pub async fn accept(&mut self, stalled_write: Duration) -> ZeroCopyStream {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let metrics = self.metrics.clone();
                    return ZeroCopyStream {
                        stream,
                        corked: false,
                        metrics,
                        stall: StallTimer {
                            limit: stalled_write,
                            timer: Box::pin(tokio::time::sleep(stalled_write)),
                            armed: false,
                        },
                    };
                }
                // A connection that went away before it was accepted: the next one.
                Err(e) if is_connection_error(&e) => {}
                // Out of file descriptors and the like: wait rather than spin.
                Err(e) => {
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A TCP connection whose writes of mapped blob windows use `sendfile`.
pub struct ZeroCopyStream {
    stream: TcpStream,
    /// `TCP_CORK` is set (a window is going out and no flush came since).
    corked: bool,
    metrics: Arc<Metrics>,
    stall: StallTimer,
}

/// Fails a write that has waited on the client for `limit`: armed when a write first finds
/// the socket full, disarmed by any write that goes through.
struct StallTimer {
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

impl StallTimer {
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            self.timer.as_mut().reset(Instant::now() + self.limit);
            self.armed = true;
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.armed = false;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {} s", self.limit.as_secs()),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl ZeroCopyStream {
    /// Sets or clears `TCP_CORK`. A socket that refuses keeps sending as it did: corking only
    /// saves CPU.
    fn cork(&mut self, on: bool) {
        if self.corked != on
            && socket2::SockRef::from(&self.stream)
                .set_tcp_cork(on)
                .is_ok()
        {
            self.corked = on;
        }
    }

    /// `len` bytes of `file` at `offset` to the socket; `Ok(0)` never: a file shorter than
    /// its window (truncated behind the cache) is an error, which cuts the response.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let mut off = i64::try_from(offset).map_err(io::Error::other)?;
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile64(&self.stream, file, Some(&mut off), len)
                    .map_err(io::Error::from)
            });
            return Poll::Ready(match sent {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file shorter than its mapped window",
                )),
                Ok(n) => {
                    self.metrics.bytes_sendfile.fetch_add(n as u64, Relaxed);
                    Ok(n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => Err(e),
            });
        }
    }
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// The leading slices up to the first window go out in one `writev`; a window (first)
    /// goes out by `sendfile`. Either way the count is of the leading bytes, as `writev`'s.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let window = |b: &IoSlice<'_>| {
            if b.is_empty() {
                None
            } else {
                mapped::region_of(b.as_ptr(), b.len())
            }
        };
        let first = bufs.iter().position(|b| !b.is_empty()).unwrap_or(0);
        let Some(lead) = bufs.get(first) else {
            return Poll::Ready(Ok(0));
        };
        let polled = if let Some((file, offset)) = window(lead) {
            self.cork(true);
            self.poll_sendfile(cx, &file, offset, lead.len())
        } else {
            // The lead is ordinary memory (looked up above): the run ends before the next window.
            let end = bufs
                .iter()
                .skip(first + 1)
                .position(|b| window(b).is_some())
                .map_or(bufs.len(), |i| first + 1 + i);
            if end < bufs.len() {
                // A window follows (a response's head before its body): the head goes out
                // in the window's first segment, not in a small one of its own.
                self.cork(true);
            }
            Pin::new(&mut self.stream).poll_write_vectored(cx, bufs.get(..end).unwrap_or(bufs))
        };
        self.stall.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cork(false);
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.stall.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cork(false);
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.stall.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn corked(s: &ZeroCopyStream) -> bool {
        socket2::SockRef::from(&s.stream).tcp_cork().unwrap()
    }

    /// A window goes out by `sendfile` with the socket corked, and the flush that follows
    /// uncorks it, so a response's last partial segment never waits for the cork's 200 ms
    /// ceiling; an ordinary write is corked only when a window follows it in the same call.
    #[tokio::test]
    async fn a_window_goes_out_corked_and_the_next_flush_uncorks() {
        let content: Vec<u8> = (0..3 * 4096 + 5u32).map(|i| (i % 253) as u8).collect();
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&content).unwrap();
        let file = Arc::new(std::fs::File::open(tmp.path()).unwrap());
        let window = mapped::window(&file, 0, content.len()).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut listener = ZeroCopyListener::new(listener, metrics.clone());
        let reader = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut s = listener.accept(Duration::from_secs(5)).await;

        s.write_all(b"head").await.unwrap();
        assert!(!corked(&s), "an ordinary write is not corked");
        s.write_all(&window).await.unwrap();
        assert!(corked(&s), "a window goes out corked");
        s.flush().await.unwrap();
        assert!(!corked(&s), "the flush uncorks");
        // A head queued with a window: corked from the head on.
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        let n = s
            .write_vectored(&[IoSlice::new(head), IoSlice::new(&window)])
            .await
            .unwrap();
        assert_eq!(n, head.len(), "the head alone, by writev");
        assert!(corked(&s), "the head before a window is corked");
        s.write_all(&window).await.unwrap();
        s.flush().await.unwrap();
        assert!(!corked(&s), "the flush uncorks");
        s.shutdown().await.unwrap();
        drop(s);

        let got = reader.await.unwrap();
        let (first, rest) = got.split_at(4 + content.len());
        assert_eq!(&first[..4], b"head");
        assert!(first[4..] == content[..], "the window's bytes");
        let (second_head, second) = rest.split_at(head.len());
        assert_eq!(second_head, head);
        assert!(*second == content[..], "the window's bytes after the head");
        assert_eq!(
            metrics.bytes_sendfile.load(Relaxed),
            2 * content.len() as u64,
            "by sendfile"
        );
    }
}
