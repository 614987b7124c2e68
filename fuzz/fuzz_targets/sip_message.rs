//! Fuzz target `sip_message`: see `callbridge::fuzzing::sip_message`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        callbridge::fuzzing::sip_message(data);
    });
}
