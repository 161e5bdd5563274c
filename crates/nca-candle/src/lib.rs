//! nca-candle
