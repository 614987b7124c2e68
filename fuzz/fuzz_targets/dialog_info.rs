//! Fuzz target `dialog_info`: see `callbridge::fuzzing::dialog_info`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        callbridge::fuzzing::dialog_info(data);
    });
}
