//! Tunnel address allocation (pure). STUB.
