//! The library half of `taskledger-replay`: only what other crates must call.
//! The audit-bundle verifier is here so the fuzz targets (`fuzz/`) exercise the
//! exact code `verify-export` runs; everything else stays in the binary.

pub mod bundle;
