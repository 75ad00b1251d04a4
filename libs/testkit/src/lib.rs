//! The one rule for a test that needs something outside the build (a
//! PostgreSQL or S3 server, a MongoDB URL, a chart render, tcpdump, /proc
//! accounting): where it is not there, the test reports itself skipped,
//! except under CI, where it fails. A missing service never counts as a pass
//! on CI; a test that may not run on CI at all is left out of the run by the
//! test script (see `scripts/test.sh`), never passed.
//!
//! "Under CI" means the `CI` environment variable is set to anything but the
//! empty string, `0` or `false` (in any case): CI systems set `CI=true`, and
//! `CI=`, `CI=0` or `CI=false` is how a person says "not CI".

use std::ffi::OsStr;

/// Whether the tests run under CI (see the crate docs).
pub fn under_ci() -> bool {
    ci_from(std::env::var_os("CI").as_deref())
}

/// Whether a `CI` variable with this value (None: unset) means CI.
pub fn ci_from(value: Option<&OsStr>) -> bool {
    let Some(value) = value else {
        return false;
    };
    let value = value.to_string_lossy();
    let value = value.trim();
    !(value.is_empty() || value == "0" || value.eq_ignore_ascii_case("false"))
}

/// The value of `var`, which gives the test `what` it needs (e.g. "the
/// PostgreSQL admin URL scripts/test.sh starts"). Unset or blank: the test
/// reports itself skipped and gets None; under CI it fails instead.
#[track_caller]
pub fn require_env(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ => {
            skip(&format!("{var} is not set ({what})"));
            None
        }
    }
}

/// Reports the calling test skipped because of `why` (printed as
/// "skipped: {why}" on stderr); under CI, fails the test instead. The caller
/// returns right after.
#[track_caller]
pub fn skip(why: &str) {
    if under_ci() {
        panic!(
            "{why}; under CI (CI={:?}) a test may not skip: the test script must provide it",
            std::env::var_os("CI").unwrap_or_default()
        );
    }
    eprintln!("skipped: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_is_any_value_but_empty_zero_or_false() {
        for (value, ci) in [
            (None, false),
            (Some(""), false),
            (Some("  "), false),
            (Some("0"), false),
            (Some("false"), false),
            (Some("FALSE"), false),
            (Some("true"), true),
            (Some("1"), true),
            (Some("yes"), true),
            (Some("woodpecker"), true),
        ] {
            assert_eq!(ci_from(value.map(OsStr::new)), ci, "CI={value:?}");
        }
    }
}
