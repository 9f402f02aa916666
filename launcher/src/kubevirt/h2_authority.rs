//! Requests whose HTTP/2 `:authority` is not a URI authority, on the launcher socket.
//!
//! gRPC clients of a unix socket disagree on `:authority`: Go's grpc (virt-handler) sends
//! `localhost`, grpcio (Python, C++) since 1.57 the socket path percent-encoded, grpc-java the
//! path itself. The HTTP/2 server under tonic (h2) resets a stream whose `:authority` does not
//! parse as an authority with PROTOCOL_ERROR, so those clients could not talk to rvmm. For a
//! unix socket the authority means nothing, and [`AuthorityFix`] stands between the socket and
//! tonic: it passes the client's bytes through, except that it decodes every request header
//! block (HEADERS and its CONTINUATIONs, with the client's HPACK table) and encodes it again
//! (with its own table, in step with the server's), with `localhost` for an authority h2 would
//! refuse. Everything the server sends goes through untouched.
//!
//! The rewriter ([`Rewriter`]) is a pure function of the bytes fed to it; a client that breaks
//! the framing or the header compression gets its connection closed, as h2 would.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::http::uri::Authority;
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The HTTP/2 connection preface every client starts with.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The authority put in place of one h2 refuses.
pub const LOCALHOST: &str = "localhost";
/// HPACK's dynamic table size, as the server announces it (h2's default, which tonic keeps).
const HEADER_TABLE_SIZE: usize = 4096;
/// The largest frame payload the server takes (HTTP/2's default, which tonic keeps).
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The largest header block the rewriter buffers (h2's own limit on a header list is 16 KiB
/// by default; a block is at most as large).
const MAX_HEADER_BLOCK: usize = 256 << 10;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a client's bytes cannot be rewritten (its connection is then closed).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// A header block does not decode (HPACK).
    #[error("Malformed HTTP/2 header block: {0}")]
    Hpack(String),
    /// A frame is malformed (padding longer than the frame, a CONTINUATION out of place).
    #[error("Malformed HTTP/2 frame: {0}")]
    Frame(&'static str),
    /// A header block is larger than the rewriter keeps.
    #[error("HTTP/2 header block larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
}

/// A header block being collected: its HEADERS frame's stream, flags, priority, and the
/// fragments so far.
struct PendingBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Where the rewriter is in the client's byte stream.
enum State {
    /// In the connection preface: how much of it has gone by.
    Preface(usize),
    /// Not HTTP/2 (no preface): bytes pass as they are.
    Raw,
    /// At a frame header.
    FrameHeader,
    /// Inside a frame that passes through: bytes left.
    Passing(usize),
    /// Inside a HEADERS or CONTINUATION frame: its header.
    HeaderFrame([u8; FRAME_HEADER]),
}

/// Rewrites a client's HTTP/2 byte stream (see the module documentation).
pub struct Rewriter {
    state: State,
    input: Vec<u8>,
    block: Option<PendingBlock>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter").finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            state: State::Preface(0),
            input: Vec::new(),
            block: None,
            decoder,
            encoder: Encoder::new(),
        }
    }
}

impl Rewriter {
    /// Takes the next bytes from the client and appends what the server should get to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        self.input.extend_from_slice(bytes);
        let mut at = 0;
        let result = self.process(&mut at, out);
        self.input.drain(..at);
        result
    }

    fn process(&mut self, at: &mut usize, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        loop {
            let rest = &self.input[*at..];
            match self.state {
                State::Preface(seen) => {
                    let take = rest.len().min(PREFACE.len() - seen);
                    if take == 0 {
                        return Ok(());
                    }
                    out.extend_from_slice(&rest[..take]);
                    *at += take;
                    self.state = if rest[..take] != PREFACE[seen..seen + take] {
                        State::Raw
                    } else if seen + take == PREFACE.len() {
                        State::FrameHeader
                    } else {
                        State::Preface(seen + take)
                    };
                }
                State::Raw => {
                    out.extend_from_slice(rest);
                    *at += rest.len();
                    return Ok(());
                }
                State::Passing(left) => {
                    let take = rest.len().min(left);
                    if take == 0 && left > 0 {
                        return Ok(());
                    }
                    out.extend_from_slice(&rest[..take]);
                    *at += take;
                    self.state = match left - take {
                        0 => State::FrameHeader,
                        left => State::Passing(left),
                    };
                }
                State::FrameHeader => {
                    let Some(header) = rest.first_chunk::<FRAME_HEADER>().copied() else {
                        return Ok(());
                    };
                    let length = frame_length(&header);
                    let kind = header[3];
                    if self.block.is_some() && kind != CONTINUATION {
                        return Err(RewriteError::Frame("a header block is not continued"));
                    }
                    if kind == HEADERS || kind == CONTINUATION {
                        if length > MAX_HEADER_BLOCK {
                            return Err(RewriteError::TooLarge);
                        }
                        *at += FRAME_HEADER;
                        self.state = State::HeaderFrame(header);
                    } else {
                        out.extend_from_slice(&header);
                        *at += FRAME_HEADER;
                        self.state = State::Passing(length);
                    }
                }
                State::HeaderFrame(header) => {
                    let length = frame_length(&header);
                    if rest.len() < length {
                        return Ok(());
                    }
                    let payload = rest[..length].to_vec();
                    *at += length;
                    self.state = State::FrameHeader;
                    self.header_frame(&header, &payload, out)?;
                }
            }
        }
    }

    /// A complete HEADERS or CONTINUATION frame.
    fn header_frame(
        &mut self,
        header: &[u8; FRAME_HEADER],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut block = match (kind, self.block.take()) {
            (HEADERS, None) => {
                let (priority, fragment) = headers_fragment(flags, payload)?;
                PendingBlock {
                    stream,
                    flags,
                    priority,
                    fragment: fragment.to_vec(),
                }
            }
            (CONTINUATION, Some(mut block)) if block.stream == stream => {
                if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(RewriteError::TooLarge);
                }
                block.fragment.extend_from_slice(payload);
                block
            }
            _ => return Err(RewriteError::Frame("a CONTINUATION without its HEADERS")),
        };
        if flags & END_HEADERS == 0 {
            self.block = Some(block);
            return Ok(());
        }
        let fragment = self.reencode(&block.fragment)?;
        block.fragment = fragment;
        write_block(&block, out);
        Ok(())
    }

    /// The header block decoded with the client's table and encoded with the server's, with an
    /// authority h2 would refuse replaced.
    fn reencode(&mut self, fragment: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(fragment, |name, value| {
                headers.push((name.into_owned(), value.into_owned()))
            })
            .map_err(|e| RewriteError::Hpack(format!("{e:?}")))?;
        for (name, value) in &mut headers {
            if name == b":authority" && Authority::try_from(value.as_slice()).is_err() {
                *value = LOCALHOST.as_bytes().to_vec();
            }
        }
        Ok(self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))))
    }
}

fn frame_length(header: &[u8; FRAME_HEADER]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// A HEADERS frame's priority fields and header block fragment, without its padding.
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), RewriteError> {
    let mut rest = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&length, after) = rest
            .split_first()
            .ok_or(RewriteError::Frame("no pad length"))?;
        padding = usize::from(length);
        rest = after;
    }
    let priority = if flags & PRIORITY != 0 {
        let (fields, after) = rest
            .split_first_chunk::<5>()
            .ok_or(RewriteError::Frame("no priority fields"))?;
        rest = after;
        Some(*fields)
    } else {
        None
    };
    let end = rest
        .len()
        .checked_sub(padding)
        .ok_or(RewriteError::Frame("padding longer than the frame"))?;
    Ok((priority, &rest[..end]))
}

/// Writes `block` as a HEADERS frame (its END_STREAM and priority kept, no padding) and as
/// many CONTINUATION frames as its size needs.
fn write_block(block: &PendingBlock, out: &mut Vec<u8>) {
    let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| &p[..]);
    let first = block.fragment.len().min(MAX_FRAME_PAYLOAD - priority.len());
    let (head, mut rest) = block.fragment.split_at(first);
    let mut flags = block.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    write_frame(out, HEADERS, flags, block.stream, &[priority, head]);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        rest = after;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame(out, CONTINUATION, flags, block.stream, &[chunk]);
    }
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
    let length = parts.iter().map(|p| p.len()).sum::<usize>();
    let length = u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// A launcher-socket client, its bytes to the server rewritten by a [`Rewriter`].
#[derive(Debug)]
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by the server.
    ready: Vec<u8>,
    /// How much of `ready` was read.
    read: usize,
}

impl<S> AuthorityFix<S> {
    /// Wraps a client's connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            ready: Vec::new(),
            read: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.read < this.ready.len() {
                let take = buf.remaining().min(this.ready.len() - this.read);
                buf.put_slice(&this.ready[this.read..this.read + take]);
                this.read += take;
                if this.read == this.ready.len() {
                    this.ready.clear();
                    this.read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut raw = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw) {
                Poll::Ready(Ok(())) if raw.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let filled = raw.filled().to_vec();
                    this.rewriter
                        .feed(&filled, &mut this.ready)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for AuthorityFix<UnixStream> {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[path = "h2_authority_tests.rs"]
mod tests;
