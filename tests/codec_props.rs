//! Property tests of the AMI codec on the real fixture traces: however the
//! byte stream is cut into reads, and whether lines end in CRLF or LF, the
//! decoder yields the same messages.

mod support;

use callbridge::ami::codec::{AmiMessage, CodecLimits};
use proptest::prelude::*;
use std::sync::OnceLock;
use support::trace;

fn fixtures() -> &'static [(String, Vec<u8>)] {
    static ALL: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    ALL.get_or_init(trace::all)
}

fn whole(index: usize) -> &'static [AmiMessage] {
    static DECODED: OnceLock<Vec<Vec<AmiMessage>>> = OnceLock::new();
    &DECODED.get_or_init(|| fixtures().iter().map(|(_, bytes)| trace::decode(bytes)).collect())[index]
}

fn to_lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if !(b == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    out
}

/// Messages with frames reduced to their (key, value) lines, so CRLF and LF
/// versions of the same frame compare equal.
fn logical(messages: &[AmiMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| match m {
            AmiMessage::Frame(f) => format!("{:?}", f.headers().collect::<Vec<_>>()),
            other => format!("{other:?}"),
        })
        .collect()
}

/// Read sizes: mostly tiny (every boundary inside a line, "\r" split from
/// "\n"), sometimes socket-sized.
fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![4 => 1usize..4, 3 => 1usize..200, 1 => 1usize..70_000], 1..40)
}

#[test]
fn fixtures_decode_without_malformed_frames() {
    for (i, (name, _)) in fixtures().iter().enumerate() {
        let messages = whole(i);
        assert!(matches!(messages.first(), Some(AmiMessage::Banner(v)) if v == "9.0.0"), "{name}");
        assert!(!messages.iter().any(|m| matches!(m, AmiMessage::Malformed(_))), "{name} has malformed frames");
        assert!(trace::frames(messages).len() > 10, "{name}");
    }
}

#[test]
fn lf_only_traces_decode_to_the_same_frames() {
    for (i, (name, bytes)) in fixtures().iter().enumerate() {
        let lf = trace::decode(&to_lf(bytes));
        assert_eq!(logical(&lf), logical(whole(i)), "{name}");
    }
}

#[test]
fn byte_by_byte_decodes_like_the_whole_trace() {
    for (i, (name, bytes)) in fixtures().iter().enumerate() {
        let chunked = trace::decode_chunked(bytes, &[1], CodecLimits::default());
        assert!(chunked == whole(i), "{name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_split_decodes_like_the_whole_trace(index in 0usize..64, chunks in chunk_sizes()) {
        let index = index % fixtures().len();
        let (_, bytes) = &fixtures()[index];
        let chunked = trace::decode_chunked(bytes, &chunks, CodecLimits::default());
        prop_assert!(chunked == whole(index), "{} split as {:?}", fixtures()[index].0, chunks);
    }

    #[test]
    fn any_split_of_an_lf_only_trace_decodes_to_the_same_frames(index in 0usize..64, chunks in chunk_sizes()) {
        let index = index % fixtures().len();
        let lf = to_lf(&fixtures()[index].1);
        let chunked = trace::decode_chunked(&lf, &chunks, CodecLimits::default());
        prop_assert_eq!(logical(&chunked), logical(whole(index)));
    }
}
