//! Fuzz target `agi_request`: see `callbridge::fuzzing::agi_request`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        callbridge::fuzzing::agi_request(data);
    });
}
