//! The HTTP/2 client preface, read by the proxy before hyper sees the
//! connection: a client must send it first (RFC 9113 §3.4), so waiting for it
//! under the handshake deadline drops a peer that connects (or completes TLS)
//! and then stays silent, which hyper alone would keep forever.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the preface from `io`; `Ok(None)` when the peer sent something else.
pub(crate) async fn read_preface<IO>(mut io: IO) -> std::io::Result<Option<Prefaced<IO>>>
where
    IO: AsyncRead + Unpin,
{
    let mut first = [0u8; PREFACE.len()];
    io.read_exact(&mut first).await?;
    Ok((&first == PREFACE).then_some(Prefaced { replayed: 0, io }))
}

/// A connection whose preface was read: it is replayed to the reader first.
pub(crate) struct Prefaced<IO> {
    replayed: usize,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefaced<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.replayed < PREFACE.len() {
            let rest = &PREFACE[self.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefaced<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_preface_is_replayed_then_the_rest_follows() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(PREFACE).await.unwrap();
        client.write_all(b"settings").await.unwrap();
        drop(client);
        let mut prefaced = read_preface(server).await.unwrap().unwrap();
        let mut all = Vec::new();
        // One byte at a time too: the replay must survive small buffers.
        let mut byte = [0u8; 1];
        for _ in 0..5 {
            prefaced.read_exact(&mut byte).await.unwrap();
            all.push(byte[0]);
        }
        prefaced.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, [&PREFACE[..], b"settings"].concat());
    }

    #[tokio::test]
    async fn anything_else_is_not_http2() {
        let (mut client, server) = tokio::io::duplex(64);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_preface(server).await.unwrap().is_none());
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        assert!(
            read_preface(server).await.is_err(),
            "EOF before the preface"
        );
    }
}
