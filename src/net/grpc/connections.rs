//! The gRPC server's connections, bounded: at most `max_connections` open at once (one more is
//! closed as soon as it is accepted), each must send HTTP/2's preface within a deadline, and a
//! connection whose peer stops answering the server's pings (it stopped reading) is dropped.
//! Idle, slow or stuck sockets cannot hold the server's slots past these times.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::error::{Error, Result};

/// The environment variable that sets how many gRPC connections a node keeps open at once.
pub const MAX_CONNECTIONS_ENV: &str = "EXO_GRPC_MAX_CONNECTIONS";

/// The bytes of HTTP/2's client preface (`PRI * HTTP/2.0 ...`), which every gRPC client sends first.
const PREFACE_BYTES: usize = 24;

/// How often refusals over the limit are logged at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How the gRPC server bounds its connections.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionPolicy {
    /// Connections open at once; one more is closed as it is accepted.
    pub max_connections: usize,
    /// The time a new connection has to send HTTP/2's preface.
    pub preface_deadline: Duration,
    /// The silence after which the server pings a connection.
    pub keepalive_interval: Duration,
    /// The time a ping has to be answered; a peer that stops reading never answers and is dropped.
    pub keepalive_timeout: Duration,
}

impl Default for ConnectionPolicy {
    fn default() -> Self {
        Self {
            max_connections: 256,
            preface_deadline: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

impl ConnectionPolicy {
    /// The default policy with `EXO_GRPC_MAX_CONNECTIONS` applied when it is set.
    pub fn from_env() -> Result<Self> {
        let max_connections = std::env::var(MAX_CONNECTIONS_ENV).ok();
        parse_max_connections(max_connections.as_deref()).map(|max| Self {
            max_connections: max.unwrap_or(Self::default().max_connections),
            ..Self::default()
        })
    }
}

fn parse_max_connections(value: Option<&str>) -> Result<Option<usize>> {
    let Some(text) = value.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    match text.parse::<usize>() {
        Ok(count) if count > 0 => Ok(Some(count)),
        _ => Err(Error::InvalidConfig(format!(
            "{MAX_CONNECTIONS_ENV} must be a whole number above 0, got {text:?}"
        ))),
    }
}

/// The connections `listener` accepts, each holding one of `policy.max_connections` slots until
/// it closes; a connection accepted while every slot is held is closed at once.
pub(super) fn bounded_incoming(
    listener: TcpListener,
    policy: &ConnectionPolicy,
) -> impl Stream<Item = io::Result<BoundedConnection>> {
    let acceptor = Acceptor {
        listener,
        slots: Arc::new(Semaphore::new(policy.max_connections)),
        max_connections: policy.max_connections,
        preface_deadline: policy.preface_deadline,
        refused_since_log: 0,
        last_log: None,
    };
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let next = acceptor.next().await;
        Some((next, acceptor))
    })
}

/// Accepts connections and hands out slots.
struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max_connections: usize,
    preface_deadline: Duration,
    refused_since_log: u64,
    last_log: Option<Instant>,
}

impl Acceptor {
    async fn next(&mut self) -> io::Result<BoundedConnection> {
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, for one: wait a moment rather than spin on the error.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return Err(e);
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    stream.set_nodelay(true)?;
                    let preface = PrefaceDeadline {
                        deadline: Box::pin(tokio::time::sleep(self.preface_deadline)),
                        missing: PREFACE_BYTES,
                    };
                    return Ok(BoundedConnection { stream, _slot: slot, preface: Some(preface) });
                }
                Err(_) => self.refuse(stream),
            }
        }
    }

    /// Closes `stream`, logging refusals at most once a minute.
    fn refuse(&mut self, stream: TcpStream) {
        drop(stream);
        self.refused_since_log += 1;
        if self.last_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
            log::warn!(
                "gRPC server: refused {} connection(s) over its limit of {} open at once ({MAX_CONNECTIONS_ENV})",
                self.refused_since_log,
                self.max_connections
            );
            self.refused_since_log = 0;
            self.last_log = Some(Instant::now());
        }
    }
}

/// The part of HTTP/2's preface a new connection has still to send, and by when.
struct PrefaceDeadline {
    deadline: Pin<Box<Sleep>>,
    missing: usize,
}

/// An accepted TCP connection holding a slot until it is dropped; its reads fail once the preface
/// deadline passes before the preface has arrived.
pub(super) struct BoundedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    preface: Option<PrefaceDeadline>,
}

impl AsyncRead for BoundedConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(preface) = &mut this.preface else {
            return polled;
        };
        match &polled {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                preface.missing = preface.missing.saturating_sub(read);
                if preface.missing == 0 || read == 0 {
                    this.preface = None;
                }
                polled
            }
            Poll::Ready(Err(_)) => polled,
            Poll::Pending => match preface.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection did not send HTTP/2's preface in time",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for BoundedConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for BoundedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_comes_from_the_environment_and_a_bad_value_is_named() {
        assert_eq!(parse_max_connections(None).unwrap(), None);
        assert_eq!(parse_max_connections(Some(" ")).unwrap(), None);
        assert_eq!(parse_max_connections(Some("12")).unwrap(), Some(12));
        for bad in ["0", "-1", "many"] {
            let error = parse_max_connections(Some(bad)).unwrap_err().to_string();
            assert!(error.contains(MAX_CONNECTIONS_ENV) && error.contains(bad), "{error}");
        }
    }
}
