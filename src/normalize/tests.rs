//! Unit tests of the normalizer on hand-written event sequences; the real
//! traces are covered by the golden tests in `tests/golden.rs`.
