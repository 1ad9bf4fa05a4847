//! Path globs for event subscriptions: `/vm/*/change`, `/host/**`, `/vm/state/ch*`.

/// Match `path` against `pattern`. Both are `/`-separated; in the pattern, `**` as a whole
/// segment matches any number of segments (zero included) and `*` inside a segment matches any
/// run of characters within that segment.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let t: Vec<&str> = path.split('/').collect();
    segments(&p, &t)
}

fn segments(p: &[&str], t: &[&str]) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some(&"**") => (0..=t.len()).any(|i| segments(&p[1..], &t[i..])),
        Some(seg) => !t.is_empty() && segment(seg, t[0]) && segments(&p[1..], &t[1..]),
    }
}

fn segment(p: &str, t: &str) -> bool {
    match p.split_once('*') {
        None => p == t,
        Some((head, rest)) => {
            if !t.starts_with(head) {
                return false;
            }
            let t = &t[head.len()..];
            (0..=t.len())
                .filter(|i| t.is_char_boundary(*i))
                .any(|i| segment(rest, &t[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_segments_and_deep_paths() {
        assert!(glob_match("/vm/state/change", "/vm/state/change"));
        assert!(!glob_match("/vm/state/change", "/vm/state/changed"));
        assert!(glob_match("/vm/*/change", "/vm/state/change"));
        assert!(!glob_match("/vm/*/change", "/vm/a/b/change"));
        assert!(glob_match("/vm/**", "/vm/state/change"));
        assert!(glob_match("/vm/**", "/vm"));
        assert!(glob_match("/**/change", "/host/status/change"));
        assert!(glob_match("/**", "/anything/at/all"));
        assert!(glob_match("/vm/state/ch*", "/vm/state/change"));
        assert!(glob_match("/vm/*e/*", "/vm/state/x"));
        assert!(!glob_match("/host/**", "/vm/state/change"));
        assert!(!glob_match("/vm/*", "/vm/state/change"));
    }
}
