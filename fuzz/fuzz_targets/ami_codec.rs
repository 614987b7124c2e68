//! Fuzz target `ami_codec`: see `callbridge::fuzzing::ami_codec`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        callbridge::fuzzing::ami_codec(data);
    });
}
