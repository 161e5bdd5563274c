//! nca-cli
