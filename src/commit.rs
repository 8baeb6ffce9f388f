//! What a commit is to the rest of kommit, without git: its identity and the files read from it.
//! The pure modules (`manifest`, `plan`) use these; only `source` makes them.

/// A commit as people know it: what `git log` shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CommitInfo {
    pub sha: String,
    pub author: String,
    pub email: String,
    /// Seconds since the Unix epoch.
    pub time: i64,
    pub subject: String,
}

impl CommitInfo {
    pub fn short_sha(&self) -> &str {
        &self.sha[..self.sha.len().min(7)]
    }

    /// RFC 3339 (UTC) form of the commit time.
    pub fn time_rfc3339(&self) -> String {
        format_rfc3339(self.time)
    }
}

/// One manifest file read from a commit.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path from the repository root, with `/` separators.
    pub path: String,
    pub content: Vec<u8>,
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (days-from-civil, no time crate).
pub fn format_rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The first seven characters of a commit id, whatever the text (a record edited by hand may
/// hold anything).
pub fn short(sha: &str) -> String {
    sha.chars().take(7).collect()
}

/// A full commit id: 40 (SHA-1) or 64 (SHA-256) hex digits.
pub fn is_commit_id(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}
