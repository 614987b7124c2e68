//! Fuzz target `config`: see `callbridge::fuzzing::config`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        callbridge::fuzzing::config(data);
    });
}
