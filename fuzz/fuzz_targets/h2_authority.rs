//! The launcher socket's HTTP/2 `:authority` rewriter (`rvmm_launcher::kubevirt::h2_authority`):
//! a client's byte stream, fed in chunks of any size, never panics it; the output never grows
//! without bound; and a well-formed client stream (the preface, then header blocks of
//! arbitrary headers, split over HEADERS and CONTINUATION frames, between other frames)
//! reaches the server with the same header lists, except an authority h2 would refuse, which
//! becomes `localhost`, and with every other frame unchanged.
#![no_main]

use arbitrary::Arbitrary;
use rvmm_launcher::kubevirt::h2_authority::{LOCALHOST, PREFACE, Rewriter};
use libfuzzer_sys::fuzz_target;
use loona_hpack::{Decoder, Encoder};

#[derive(Arbitrary, Debug)]
enum Frame {
    /// A header block, split in `pieces` frames.
    Headers {
        headers: Vec<(String, String)>,
        authority: Option<String>,
        pieces: u8,
    },
    /// Any other frame (type not HEADERS or CONTINUATION).
    Other { kind: u8, flags: u8, payload: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
enum Input {
    /// Bytes as they come.
    Raw { bytes: Vec<u8>, chunk: u8 },
    /// A well-formed client stream.
    Client { frames: Vec<Frame>, chunk: u8 },
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn feed(bytes: &[u8], chunk: u8) -> Option<Vec<u8>> {
    let mut rewriter = Rewriter::default();
    let mut out = Vec::new();
    for piece in bytes.chunks(usize::from(chunk).max(1)) {
        rewriter.feed(piece, &mut out).ok()?;
    }
    Some(out)
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw { bytes, chunk } => {
            if let Some(out) = feed(&bytes, chunk) {
                // Re-encoding without Huffman may grow a block, never without bound.
                assert!(out.len() <= 16 * bytes.len() + 64, "{} -> {}", bytes.len(), out.len());
            }
        }
        Input::Client { frames, chunk } => {
            let mut encoder = Encoder::new();
            let mut stream = PREFACE.to_vec();
            let mut sent = Vec::new();
            let mut others = Vec::new();
            for (i, f) in frames.into_iter().enumerate() {
                let id = 2 * i as u32 + 1;
                match f {
                    Frame::Headers { mut headers, authority, pieces } => {
                        headers.retain(|(n, _)| n != ":authority");
                        if let Some(a) = authority {
                            headers.insert(0, (":authority".into(), a));
                        }
                        let block = encoder
                            .encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
                        let size = block.len().div_ceil(usize::from(pieces).max(1)).max(1);
                        let parts: Vec<&[u8]> = if block.is_empty() {
                            vec![&[]]
                        } else {
                            block.chunks(size).collect()
                        };
                        for (j, part) in parts.iter().enumerate() {
                            let kind = if j == 0 { 0x1 } else { 0x9 };
                            let flags = if j + 1 == parts.len() { 0x4 } else { 0 };
                            frame(&mut stream, kind, flags, id, part);
                        }
                        sent.push(headers);
                    }
                    Frame::Other { kind, flags, payload } => {
                        let kind = if kind == 0x1 || kind == 0x9 { 0x0 } else { kind };
                        let payload = &payload[..payload.len().min(1 << 14)];
                        frame(&mut stream, kind, flags, id, payload);
                        others.push((kind, flags, id, payload.to_vec()));
                    }
                }
            }
            let out = feed(&stream, chunk).expect("a well-formed stream is rewritten");
            assert_eq!(&out[..PREFACE.len()], PREFACE);
            let mut rest = &out[PREFACE.len()..];
            let mut decoder = Decoder::new();
            let (mut got, mut got_others, mut block) = (Vec::new(), Vec::new(), Vec::new());
            while !rest.is_empty() {
                let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
                let (kind, flags) = (rest[3], rest[4]);
                let id = u32::from_be_bytes(rest[5..9].try_into().unwrap());
                let payload = &rest[9..9 + length];
                assert!(length <= 1 << 14, "frame of {length} bytes");
                if kind == 0x1 || kind == 0x9 {
                    block.extend_from_slice(payload);
                    if flags & 0x4 != 0 {
                        got.push(decoder.decode(&block).expect("the server decodes the block"));
                        block.clear();
                    }
                } else {
                    got_others.push((kind, flags, id, payload.to_vec()));
                }
                rest = &rest[9 + length..];
            }
            assert_eq!(got_others, others);
            assert_eq!(got.len(), sent.len());
            for (got, sent) in got.iter().zip(&sent) {
                assert_eq!(got.len(), sent.len());
                for ((gn, gv), (sn, sv)) in got.iter().zip(sent) {
                    assert_eq!(gn, sn.as_bytes());
                    if sn == ":authority" && gv != sv.as_bytes() {
                        assert_eq!(gv, LOCALHOST.as_bytes(), "{sv:?}");
                    } else {
                        assert_eq!(gv, sv.as_bytes());
                    }
                }
            }
        }
    }
});
