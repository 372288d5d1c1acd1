//! Serde mirror of `sitegate.toml` (unknown keys refused). STUB.
