//! nca-dfdx
