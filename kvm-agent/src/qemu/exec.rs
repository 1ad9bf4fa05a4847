//! Running the host's tools (`ip`, `qemu-img`) and watching processes by PID.

use std::path::Path;
use std::time::Duration;
use stratus_agent_protocol::AgentError;

/// How long one tool run may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Run `argv` (program first) to its end; its standard output, or an error naming it and its
/// standard error.
pub async fn run(argv: &[String]) -> Result<String, AgentError> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| AgentError::failed("an empty command"))?;
    let what = argv.join(" ");
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TOOL_TIMEOUT, child)
        .await
        .map_err(|_| AgentError::failed(format!("{what}: no end after {TOOL_TIMEOUT:?}")))?
        .map_err(|e| AgentError::failed(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(AgentError::failed(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Build an argv from string-likes.
pub fn argv<I, S>(parts: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    parts.into_iter().map(Into::into).collect()
}

/// Whether process `pid` runs (exists and is not a zombie) and its command line contains
/// `marker` (so a PID reused by another program is not taken for ours).
pub fn alive_with(pid: u32, marker: &str) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // `pid (comm) S ...`: the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(marker))
        .unwrap_or(false)
}

/// The PID written in `pidfile`, if any.
pub fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Send `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a PID and a signal number has no memory effects.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Wait until `pid` no longer runs, `within` at most; whether it ended.
pub async fn wait_gone(pid: u32, marker: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while alive_with(pid, marker) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Free and total bytes of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = s.f_frsize as u64;
    Ok((s.f_bavail as u64 * unit, s.f_blocks as u64 * unit))
}
