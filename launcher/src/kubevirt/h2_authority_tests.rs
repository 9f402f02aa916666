//! The rewriter on made-up client streams, and the real command server answering a raw HTTP/2
//! client that sends a socket path as `:authority`, as grpcio and grpc-java do.

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::kubevirt::grpc::tests::TempDir;
use crate::kubevirt::proto::cmd::v1 as cmd;

const DATA: u8 = 0x0;
const SETTINGS: u8 = 0x4;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// A header list: (name, value) pairs.
type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;
/// A frame: type, flags, stream, payload.
type RawFrame = (u8, u8, u32, Vec<u8>);

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, kind, flags, stream, &[payload]);
    out
}

/// A gRPC call's request headers with `authority`.
fn grpc_headers(path: &str, authority: &str) -> HeaderList {
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        (
            "user-agent",
            "grpc-python/1.68.0 grpc-c/44.0.0 (linux; chttp2)",
        ),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect()
}

fn encode(encoder: &mut Encoder<'static>, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
}

/// The frames of a server-bound stream after the preface: (type, flags, stream, payload).
fn frames(mut bytes: &[u8]) -> Vec<RawFrame> {
    let mut all = Vec::new();
    while !bytes.is_empty() {
        let header: [u8; FRAME_HEADER] = bytes[..FRAME_HEADER].try_into().unwrap();
        let length = frame_length(&header);
        let stream = u32::from_be_bytes(header[5..9].try_into().unwrap());
        all.push((
            header[3],
            header[4],
            stream,
            bytes[FRAME_HEADER..][..length].to_vec(),
        ));
        bytes = &bytes[FRAME_HEADER + length..];
    }
    all
}

/// Two requests from one client (the second refers to the first's HPACK entries), the first
/// header block split over HEADERS (padded, with priority) and a CONTINUATION.
fn client_stream(authority: &str) -> (Vec<u8>, Vec<HeaderList>) {
    let mut encoder = Encoder::new();
    let first = grpc_headers("/kubevirt.cmd.v1.Cmd/Ping", authority);
    let second = grpc_headers("/kubevirt.cmd.v1.Cmd/GetDomain", authority);
    let block = encode(&mut encoder, &first);
    let (a, b) = block.split_at(block.len() / 2);
    let mut stream = PREFACE.to_vec();
    stream.extend(frame(SETTINGS, 0, 0, &[]));
    let mut padded = vec![3u8];
    padded.extend_from_slice(&[0, 0, 0, 0, 15]);
    padded.extend_from_slice(a);
    padded.extend_from_slice(&[0, 0, 0]);
    stream.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
    stream.extend(frame(CONTINUATION, END_HEADERS, 1, b));
    stream.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    let block = encode(&mut encoder, &second);
    stream.extend(frame(HEADERS, END_HEADERS, 3, &block));
    stream.extend(frame(DATA, END_STREAM, 3, &[0, 0, 0, 0, 0]));
    (stream, vec![first, second])
}

/// The header lists the server decodes from the rewritten stream.
fn server_view(rewritten: &[u8]) -> (Vec<HeaderList>, Vec<RawFrame>) {
    assert_eq!(&rewritten[..PREFACE.len()], PREFACE);
    let all = frames(&rewritten[PREFACE.len()..]);
    let mut decoder = Decoder::new();
    let mut lists = Vec::new();
    let mut block = Vec::new();
    for (kind, flags, _, payload) in &all {
        if *kind == HEADERS || *kind == CONTINUATION {
            let start = if flags & PRIORITY != 0 { 5 } else { 0 };
            block.extend_from_slice(&payload[start..]);
            if flags & END_HEADERS != 0 {
                lists.push(decoder.decode(&block).unwrap());
                block.clear();
            }
        }
    }
    (lists, all)
}

#[test]
fn socket_path_authority_becomes_localhost_and_every_other_header_and_frame_stays() {
    for authority in ["/var/run/kubevirt/sockets/launcher-sock", "%2Frun%2Fx.sock"] {
        let (stream, sent) = client_stream(authority);
        let mut out = Vec::new();
        Rewriter::default().feed(&stream, &mut out).unwrap();
        let (lists, all) = server_view(&out);
        assert_eq!(lists.len(), 2);
        for (got, sent) in lists.iter().zip(&sent) {
            let expected: Vec<_> = sent
                .iter()
                .map(|(n, v)| {
                    let v = if n == b":authority" {
                        b"localhost".to_vec()
                    } else {
                        v.clone()
                    };
                    (n.clone(), v)
                })
                .collect();
            assert_eq!(got, &expected, "{authority}");
        }
        // The priority and END_STREAM flags survive; padding goes; DATA is untouched.
        let kinds: Vec<(u8, u8, u32)> = all.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (SETTINGS, 0, 0),
                (HEADERS, PRIORITY | END_HEADERS, 1),
                (DATA, END_STREAM, 1),
                (HEADERS, END_HEADERS, 3),
                (DATA, END_STREAM, 3)
            ]
        );
        assert_eq!(&all[1].3[..5], &[0, 0, 0, 0, 15]);
    }
}

#[test]
fn a_valid_authority_is_kept_and_byte_by_byte_input_gives_the_same_stream() {
    let (stream, sent) = client_stream("localhost");
    let mut whole = Vec::new();
    Rewriter::default().feed(&stream, &mut whole).unwrap();
    let mut rewriter = Rewriter::default();
    let mut pieces = Vec::new();
    for byte in &stream {
        rewriter.feed(&[*byte], &mut pieces).unwrap();
    }
    assert_eq!(whole, pieces);
    assert_eq!(server_view(&whole).0, sent);
}

#[test]
fn a_large_header_block_is_split_into_frames_the_server_takes() {
    let mut headers = grpc_headers("/kubevirt.cmd.v1.Cmd/Ping", "/x.sock");
    headers.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
    let block = encode(&mut Encoder::new(), &headers);
    let mut stream = PREFACE.to_vec();
    for (i, chunk) in block.chunks(10_000).enumerate() {
        let last = (i + 1) * 10_000 >= block.len();
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        stream.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, chunk));
    }
    let mut out = Vec::new();
    Rewriter::default().feed(&stream, &mut out).unwrap();
    let (lists, all) = server_view(&out);
    assert!(all.iter().all(|f| f.3.len() <= MAX_FRAME_PAYLOAD));
    assert_eq!(lists[0].last().unwrap().1.len(), 40_000);
}

#[test]
fn broken_framing_and_compression_are_errors_and_non_http2_passes() {
    let mut out = Vec::new();
    let mut stream = PREFACE.to_vec();
    stream.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
    assert!(matches!(
        Rewriter::default().feed(&stream, &mut out),
        Err(RewriteError::Hpack(_))
    ));
    let mut stream = PREFACE.to_vec();
    stream.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
    assert!(matches!(
        Rewriter::default().feed(&stream, &mut out),
        Err(RewriteError::Frame(_))
    ));
    let mut stream = PREFACE.to_vec();
    stream.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]));
    assert!(matches!(
        Rewriter::default().feed(&stream, &mut out),
        Err(RewriteError::Frame(_))
    ));
    out.clear();
    Rewriter::default()
        .feed(b"GET / HTTP/1.1\r\n\r\n", &mut out)
        .unwrap();
    assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
}

/// Reads frames from the server until stream 1 ends; returns its header lists (decoded with
/// the server's HPACK table) and DATA payloads, or the RST_STREAM/GOAWAY error code.
async fn read_answer(
    stream: &mut tokio::net::UnixStream,
) -> Result<(Vec<HeaderList>, Vec<u8>), u32> {
    let mut decoder = Decoder::new();
    let (mut lists, mut data) = (Vec::new(), Vec::new());
    loop {
        let mut header = [0u8; FRAME_HEADER];
        stream.read_exact(&mut header).await.unwrap();
        let mut payload = vec![0u8; frame_length(&header)];
        stream.read_exact(&mut payload).await.unwrap();
        let (kind, flags) = (header[3], header[4]);
        let id = u32::from_be_bytes(header[5..9].try_into().unwrap());
        match kind {
            SETTINGS if flags & ACK == 0 => {
                stream
                    .write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .await
                    .unwrap();
            }
            RST_STREAM | GOAWAY => {
                let code = &payload[payload.len() - 4..];
                return Err(u32::from_be_bytes(code.try_into().unwrap()));
            }
            HEADERS if id == 1 => lists.push(decoder.decode(&payload).unwrap()),
            DATA if id == 1 => data.extend_from_slice(&payload),
            _ => {}
        }
        if id == 1 && flags & END_STREAM != 0 {
            return Ok((lists, data));
        }
    }
}

#[tokio::test]
async fn command_server_answers_a_client_that_sends_the_socket_path_as_authority() {
    let dir = TempDir::new("authority");
    let sockets = dir.0.join("sockets");
    let listener = crate::kubevirt::grpc::bind(&sockets).unwrap();
    let backend = std::sync::Arc::new(crate::kubevirt::grpc::tests::FakeBackend::default());
    tokio::spawn(crate::kubevirt::grpc::serve(
        listener,
        backend,
        std::future::pending(),
    ));
    let socket = crate::kubevirt::grpc::init_socket_path(&sockets);
    // As grpcio 1.57 and later address a unix socket: the path, percent-encoded.
    let authority = socket.display().to_string().replace('/', "%2F");
    let mut client = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut request = PREFACE.to_vec();
    request.extend(frame(SETTINGS, 0, 0, &[]));
    let block = encode(
        &mut Encoder::new(),
        &grpc_headers("/kubevirt.cmd.v1.Cmd/Ping", &authority),
    );
    request.extend(frame(HEADERS, END_HEADERS, 1, &block));
    // A gRPC message: not compressed, the length, the (empty) EmptyRequest.
    let message = cmd::EmptyRequest {}.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&message);
    request.extend(frame(DATA, END_STREAM, 1, &body));
    client.write_all(&request).await.unwrap();

    let (lists, data) = read_answer(&mut client)
        .await
        .unwrap_or_else(|code| panic!("the server reset the call: HTTP/2 error {code}"));
    let header = |name: &[u8]| {
        lists
            .iter()
            .flatten()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header(b":status").as_deref(), Some("200"));
    assert_eq!(header(b"grpc-status").as_deref(), Some("0"));
    let response = cmd::Response::decode(&data[5..]).unwrap();
    assert!(response.success);
}
