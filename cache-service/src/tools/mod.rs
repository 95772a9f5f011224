//! The operator tools behind `regmirror`'s subcommands. They share the registry model
//! (`registry_rules`) and the upstream client with the cache, not its server or storage.

pub mod client_config;
pub mod doctor;
pub mod render;
pub mod warm;

/// ` CODE: message` of the first OCI error in a registry's answer body, or nothing: what the
/// tools append to an HTTP status in their reports.
fn oci_error_suffix(body: &str) -> String {
    registry_rules::oci_error::parse_first(body.as_bytes())
        .map(|e| format!(" {e}"))
        .unwrap_or_default()
}

/// Who may read a file a tool writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readers {
    /// Anyone (0644): configs another user's process reads (Envoy, a client).
    All,
    /// The owner only (0600): the file holds a login.
    Owner,
}

/// Writes `content` to `path` so that a reader finds the old file or the new one, never a
/// part: a temporary file in the same directory, created exclusively under a dot name (which
/// Envoy's path source never reads), synced, then renamed over `path`.
fn write_atomically(
    path: &std::path::Path,
    content: &str,
    readers: Readers,
) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    // Created 0600: nobody reads the login while it is being written.
    let mut tmp = tempfile::Builder::new()
        .prefix(".regmirror-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(content.as_bytes())?;
    tmp.as_file().sync_all()?;
    if readers == Readers::All {
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_tool_replaces_a_file_whole_and_keeps_a_login_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.io/hosts.toml");
        write_atomically(&path, "old", Readers::All).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o644);
        write_atomically(&path, "new, with a login", Readers::Owner).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new, with a login");
        assert_eq!(mode(&path), 0o600);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["hosts.toml"], "no temporary file left");
        // A directory in the way: an error, and the file there stays as it was.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("hosts.toml/x")).unwrap();
        assert!(write_atomically(&blocked.join("hosts.toml"), "x", Readers::All).is_err());
        assert_eq!(std::fs::read_dir(&blocked).unwrap().count(), 1);
    }
}
