//! Fuzz target `trace`: see `callbridge::fuzzing::trace`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        callbridge::fuzzing::trace(data);
    });
}
