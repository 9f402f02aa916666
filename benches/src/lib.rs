//! Criterion benchmarks live in `benches/*.rs` of this crate; `benches/boot-time` (a script
//! beside them) measures start-up. This library is empty.
