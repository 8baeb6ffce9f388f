//! What one sync may read: bounds that fit real repositories and stop a hostile or mistaken one
//! (a repository of huge files, a hundred thousand documents, alias bombs spread over many
//! documents) before it costs more than one failed sync.

/// The budgets of one sync; every one can be raised (CLI flags, GitSync fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Bytes of manifest files read from git, each time a file is reached.
    pub max_bytes: u64,
    /// Objects (documents and list items) in the commit.
    pub max_objects: usize,
    /// The objects' size once parsed and aliases expanded (as JSON).
    pub max_expanded_bytes: u64,
}

pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_MAX_OBJECTS: usize = 10_000;

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            max_bytes: DEFAULT_MAX_BYTES,
            max_objects: DEFAULT_MAX_OBJECTS,
            max_expanded_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// `256 MiB`, `12 KiB`, `300 bytes`.
pub fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else if bytes >= 1024 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(DEFAULT_MAX_BYTES), "256 MiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(human_bytes(12 * 1024), "12 KiB");
        assert_eq!(human_bytes(300), "300 bytes");
    }
}
