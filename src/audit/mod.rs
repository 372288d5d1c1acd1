//! The tamper-evident audit log: security events and admin actions, one sealed
//! JSON line each, hash-chained ([`chain`]), verifiable ([`verify`]).

pub mod chain;
pub mod sink;
pub mod verify;
pub mod writer;
