//! Plumbing every simulator shares: serving an axum router on a listener whose
//! connections a handler can cut (to simulate a connection reset), and a guard
//! that stops the server when the last handle goes away. No API knowledge here.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Serves `app` until aborted; handlers take a [`Cut`] with `ConnectInfo<Cut>`.
pub(crate) async fn serve(listener: TcpListener, app: Router, name: &'static str) {
    let service = app.into_make_service_with_connect_info::<Cut>();
    if let Err(error) = axum::serve(CuttableListener(listener), service).await {
        tracing::warn!(%error, simulator = name, "The simulator stopped serving.");
    }
}

/// Aborts the server task when dropped (held by the last handle clone).
pub(crate) struct ServerGuard(pub(crate) AbortHandle);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Set it and the connection reads EOF and fails every write: it closes
/// without the response ever reaching the client.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cut(Arc<AtomicBool>);

impl Cut {
    pub(crate) fn cut(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_cut(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Accepts TCP connections and hands each handler a [`Cut`] for its connection.
struct CuttableListener(TcpListener);

impl Listener for CuttableListener {
    type Io = CuttableStream;
    type Addr = Cut;

    async fn accept(&mut self) -> (CuttableStream, Cut) {
        loop {
            match self.0.accept().await {
                Ok((tcp, _)) => {
                    let cut = Cut::default();
                    return (
                        CuttableStream {
                            tcp,
                            cut: cut.clone(),
                        },
                        cut,
                    );
                }
                Err(error) => {
                    tracing::debug!(%error, "A simulator could not accept a connection.");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Cut> {
        Ok(Cut::default())
    }
}

impl Connected<IncomingStream<'_, CuttableListener>> for Cut {
    fn connect_info(stream: IncomingStream<'_, CuttableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

struct CuttableStream {
    tcp: TcpStream,
    cut: Cut,
}

fn reset() -> io::Error {
    io::ErrorKind::ConnectionReset.into()
}

impl AsyncRead for CuttableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.cut.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A steady fault: every `every`-th request gets `fault` until it is lifted
/// (every 5th is a 20 % error rate; every 1st a storm). Consulted after the
/// queued one-off faults.
#[derive(Clone, Debug)]
pub(crate) struct SteadyFault<F> {
    fault: F,
    every: usize,
    seen: usize,
}

impl<F: Clone> SteadyFault<F> {
    pub(crate) fn new(fault: F, every: usize) -> SteadyFault<F> {
        SteadyFault {
            fault,
            every: every.max(1),
            seen: 0,
        }
    }

    /// The fault for this request, if it is its turn.
    pub(crate) fn next(&mut self) -> Option<F> {
        self.seen += 1;
        self.seen
            .is_multiple_of(self.every)
            .then(|| self.fault.clone())
    }
}
