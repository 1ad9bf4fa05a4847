//! Small files a deployment keeps: secrets written owner-only, ids kept across restarts.

use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Write `text` to a new file `path` readable by its owner only (mode 0600), replacing what was
/// there; the file never exists with wider permissions.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The first line of a file holding a secret or an id, trimmed; refused when empty.
pub fn read_line(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(!line.is_empty(), "{} is empty", path.display());
    Ok(line)
}

/// Create `dir` (and the parents it lacks) readable by its owner only. A directory that is
/// already there keeps its permissions (it may be `/tmp` or the working directory); the
/// secrets in it are written 0600 ([`write_private`]).
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// A random secret: 32 bytes as hex.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The contents of `path` when it exists, else `make()` written there first (0600).
pub fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    if path.exists() {
        return read_line(path);
    }
    let v = make();
    write_private(path, &format!("{v}\n"))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_file_is_owner_only_and_read_back_trimmed() {
        let dir = std::env::temp_dir().join(format!("stratus-files-{}", std::process::id()));
        private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        // One that is there keeps its permissions.
        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o755);
        let p = dir.join("secret");
        let first = read_or_create(&p, random_secret).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(read_or_create(&p, || "other".into()).unwrap(), first);
        assert_eq!(mode(&p), 0o600);
        std::fs::write(&p, "\n").unwrap();
        assert!(read_line(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
