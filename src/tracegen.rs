//! Builds large synthetic traces from real ones, for benchmarks and soak
//! tests: the fixture traces concatenated many times, each copy with its own
//! call and channel ids, so that every copy is a distinct set of calls.
//!
//! Ids and timestamps in the lab traces all start with `179547`; copy `k`
//! replaces that prefix with `179547 + k` wherever it starts a number, which
//! keeps ids unique across copies and timestamps increasing.

/// `copies` renamed copies of `traces` (each a raw AMI byte stream).
pub fn concatenated(traces: &[Vec<u8>], copies: usize) -> Vec<u8> {
    let total: usize = traces.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total * copies);
    for k in 0..copies {
        let prefix = format!("{}", 179_547 + k);
        for t in traces {
            rename_into(t, prefix.as_bytes(), &mut out);
        }
    }
    out
}

fn rename_into(src: &[u8], prefix: &[u8], out: &mut Vec<u8>) {
    const FROM: &[u8] = b"179547";
    let mut i = 0;
    while i < src.len() {
        if src[i..].starts_with(FROM) && (i == 0 || !src[i - 1].is_ascii_digit()) {
            out.extend_from_slice(prefix);
            i += FROM.len();
        } else {
            out.push(src[i]);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_get_distinct_ids() {
        let t = b"Uniqueid: 1795471080.4\r\nTimestamp: 1795471080.044838\r\nX: a179547\r\n\r\n".to_vec();
        let out = super::concatenated(&[t], 2);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("Uniqueid: 1795471080.4"));
        assert!(s.contains("Uniqueid: 1795481080.4"));
        assert!(s.contains("X: a179547"));
    }
}
