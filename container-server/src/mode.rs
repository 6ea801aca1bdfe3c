//! File metadata in the forms the Go server reports: `FileMode.String()` and RFC 3339 times.

use chrono::{DateTime, Local, Offset, TimeZone};

/// Formats a Unix `st_mode` as Go's `os.FileMode.String()` does for a file stat'ed on Linux:
/// type letters from `dalTLDpSugct?` (here `d`, `L`, `D`, `p`, `S`, `u`, `g`, `c`, `t`), or `-`
/// when there are none, then the nine `rwx` permission bits.
pub fn go_mode_string(st_mode: u32) -> String {
    let fmt = st_mode & libc::S_IFMT;
    // Letters in Go's bit order, from the highest bit down.
    let mut letters = String::new();
    if fmt == libc::S_IFDIR {
        letters.push('d');
    }
    if fmt == libc::S_IFLNK {
        letters.push('L');
    }
    if fmt == libc::S_IFBLK || fmt == libc::S_IFCHR {
        letters.push('D');
    }
    if fmt == libc::S_IFIFO {
        letters.push('p');
    }
    if fmt == libc::S_IFSOCK {
        letters.push('S');
    }
    if st_mode & libc::S_ISUID != 0 {
        letters.push('u');
    }
    if st_mode & libc::S_ISGID != 0 {
        letters.push('g');
    }
    if fmt == libc::S_IFCHR {
        letters.push('c');
    }
    if st_mode & libc::S_ISVTX != 0 {
        letters.push('t');
    }
    if letters.is_empty() {
        letters.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, c) in RWX.iter().enumerate() {
        let bit = 1 << (8 - i);
        letters.push(if st_mode & bit != 0 { *c as char } else { '-' });
    }
    letters
}

/// Formats seconds since the epoch as RFC 3339 with seconds precision in the local time zone,
/// `Z` for UTC (Go's `time.RFC3339`).
pub fn rfc3339_local(secs: i64) -> String {
    let Some(t) = Local.timestamp_opt(secs, 0).single() else {
        return String::new();
    };
    format_rfc3339(&t)
}

fn format_rfc3339<Tz: TimeZone>(t: &DateTime<Tz>) -> String
where
    Tz::Offset: std::fmt::Display,
{
    if t.offset().fix().local_minus_utc() == 0 {
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Utc};

    #[test]
    fn mode_strings() {
        let cases = [
            (libc::S_IFREG | 0o644, "-rw-r--r--"),
            (libc::S_IFDIR | 0o755, "drwxr-xr-x"),
            (libc::S_IFLNK | 0o777, "Lrwxrwxrwx"),
            (libc::S_IFIFO | 0o644, "prw-r--r--"),
            (libc::S_IFSOCK | 0o700, "Srwx------"),
            (libc::S_IFCHR | 0o666, "Dcrw-rw-rw-"),
            (libc::S_IFBLK | 0o660, "Drw-rw----"),
            (libc::S_IFREG | libc::S_ISUID | 0o755, "urwxr-xr-x"),
            (libc::S_IFREG | libc::S_ISGID | 0o755, "grwxr-xr-x"),
            (libc::S_IFDIR | libc::S_ISVTX | 0o777, "dtrwxrwxrwx"),
            (libc::S_IFREG, "----------"),
        ];
        for (mode, want) in cases {
            assert_eq!(go_mode_string(mode), want, "{mode:o}");
        }
    }

    #[test]
    fn times() {
        let utc = Utc.timestamp_opt(1_772_661_008, 0).unwrap();
        assert_eq!(format_rfc3339(&utc), "2026-03-04T21:50:08Z");
        let cet = FixedOffset::east_opt(3600).unwrap();
        let t = cet.timestamp_opt(1_772_661_008, 0).unwrap();
        assert_eq!(format_rfc3339(&t), "2026-03-04T22:50:08+01:00");
    }
}
