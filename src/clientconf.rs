//! wg-quick client config rendering. STUB.
