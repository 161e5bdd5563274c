//! nca-testkit
