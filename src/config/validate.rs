//! Raw → validated config. STUB.
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

pub fn load(_path: &Path) -> Result<super::Config, ConfigError> {
    todo!()
}
