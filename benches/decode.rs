//! Codec throughput over the real fixture traces concatenated (renamed copies),
//! reported by criterion in bytes/s and frames/s.
//!
//! `cargo bench --bench decode`

#[path = "support/mod.rs"]
mod support;

use callbridge::ami::codec::{decode_all, AmiCodec, AmiMessage};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn decode(c: &mut Criterion) {
    let data = callbridge::tracegen::concatenated(&support::fixture_traces(), 20);
    let mut frames = 0u64;
    decode_all(&mut AmiCodec::default(), &data, |m| frames += u64::from(matches!(m, AmiMessage::Frame(_))));
    let mut g = c.benchmark_group("decode");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("fixtures_x20_bytes", |b| {
        b.iter(|| {
            let mut n = 0u64;
            decode_all(&mut AmiCodec::default(), &data, |m| n += u64::from(matches!(m, AmiMessage::Frame(_))));
            n
        })
    });
    g.throughput(Throughput::Elements(frames));
    g.bench_function("fixtures_x20_frames", |b| {
        b.iter(|| {
            let mut n = 0u64;
            decode_all(&mut AmiCodec::default(), &data, |m| n += u64::from(matches!(m, AmiMessage::Frame(_))));
            n
        })
    });
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
