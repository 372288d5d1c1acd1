//! `sitegate check`: the security self-check (SPEC, "Security self-check").
//!
//! [`gather`] reads the system (files, `/proc/net`, `nft`, the store, the
//! control socket) into plain facts and does nothing else; [`decide`] turns
//! facts into [`Line`]s and is pure, so every verdict is unit-tested without a
//! system; [`procnet`] parses `/proc/net/{tcp,udp}{,6}`.
//!
//! Output: one line per verdict, `PASS|WARN|FAIL <check>: <detail>`, then a
//! summary line. A FAIL names the file, key, port or peer at fault. A WARN is an
//! optional protection left off and does not fail the run. Anything that cannot
//! be gathered is a FAIL (fail closed), never a silent PASS.

pub(crate) mod decide;
mod gather;
pub(crate) mod procnet;

use std::fmt;
use std::path::Path;

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One output line: a verdict of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub status: Status,
    /// The check's stable name, e.g. `file-permissions`.
    pub check: &'static str,
    /// One line of text (newlines from tool output are folded into `; `).
    pub detail: String,
}

impl Line {
    pub(crate) fn new(status: Status, check: &'static str, detail: impl Into<String>) -> Line {
        let detail: String = detail.into();
        let detail = detail
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Line {
            status,
            check,
            detail,
        }
    }
    pub(crate) fn pass(check: &'static str, detail: impl Into<String>) -> Line {
        Line::new(Status::Pass, check, detail)
    }
    pub(crate) fn warn(check: &'static str, detail: impl Into<String>) -> Line {
        Line::new(Status::Warn, check, detail)
    }
    pub(crate) fn fail(check: &'static str, detail: impl Into<String>) -> Line {
        Line::new(Status::Fail, check, detail)
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_str(),
            self.check,
            self.detail
        )
    }
}

/// Every line of one run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    /// How many lines have `status`.
    pub fn count(&self, status: Status) -> usize {
        self.lines.iter().filter(|l| l.status == status).count()
    }

    /// The text printed: each line, then `summary: N pass, N warn, N fail`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            out.push_str(&l.to_string());
            out.push('\n');
        }
        out.push_str(&format!(
            "summary: {} pass, {} warn, {} fail\n",
            self.count(Status::Pass),
            self.count(Status::Warn),
            self.count(Status::Fail)
        ));
        out
    }
}

/// Runs every check against the config at `config` and the system as it is now.
/// Never needs the daemon: checks that ask it say so when it does not run.
pub fn run(config: &Path) -> Report {
    gather::run(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines read `STATUS check: detail` on one line; the summary counts each status.
    #[test]
    fn rendering() {
        let r = Report {
            lines: vec![
                Line::pass("a", "fine"),
                Line::warn("b", "optional\n  thing off\n"),
                Line::fail("c", "bad"),
                Line::pass("d", "fine too"),
            ],
        };
        assert_eq!(
            r.render(),
            "PASS a: fine\nWARN b: optional; thing off\nFAIL c: bad\nPASS d: fine too\nsummary: 2 pass, 1 warn, 1 fail\n"
        );
        assert_eq!(r.count(Status::Fail), 1);
    }
}
