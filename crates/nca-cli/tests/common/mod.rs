//! Helpers shared by the integration tests that drive the real `nca-cli` binary.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

/// The binary under test: this build's, or `$NCA_CLI_UNDER_TEST` to run the same tests
/// against another build (e.g. one from before a fix, to see its reproductions fail).
pub fn binary() -> PathBuf {
    std::env::var_os("NCA_CLI_UNDER_TEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nca-cli")))
}

/// A command running [`binary`].
pub fn nca() -> assert_cmd::Command {
    assert_cmd::Command::new(binary())
}

/// Writes `text` to `dir/name` and returns that path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write test file");
    p
}

/// The command's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
