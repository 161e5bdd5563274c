//! nca-ndarray
