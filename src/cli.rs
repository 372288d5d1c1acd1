//! clap command tree. STUB.
