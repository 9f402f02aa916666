//! Error text as rvmm shows it: an error and its causes on one line.

use std::error::Error;

/// `err` and its causes, `: `-separated (what the API answers, virt-handler logs and rvmm
/// prints).
pub fn error_chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
