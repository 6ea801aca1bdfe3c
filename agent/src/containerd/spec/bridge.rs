//! The bot's server as the host provides it: the agent's `server_binary` bound read-only at
//! [`BRIDGE_PATH`] and run as the bot's process (PID 1), and a host directory bound at
//! [`RUN_DIR`] for the server's socket (WIRE-BRIDGE.md section 4).
//!
//! The image's own copy (`/opt/mcp`, copied to `/app/mcp` by its entrypoint) is never run:
//! a bot could rewrite that copy and keep its own server across restarts.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, MountBuilder, Spec};

use super::spec_err;
use crate::error::AgentError;

/// Where the server binary appears in a bot.
pub const BRIDGE_PATH: &str = "/opt/memoh/bridge";
/// The server's runtime directory in a bot (its socket `bridge.sock`, the token).
pub const RUN_DIR: &str = "/run/memoh";

/// The host side of the two mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerMounts {
    /// The server binary on the host.
    pub binary: PathBuf,
    /// The bot's run directory on the host.
    pub run_dir: PathBuf,
}

/// The bot's process arguments: [`BRIDGE_PATH`] followed by what the image's entrypoint
/// would have passed to its server (the arguments after the program; after a `tini ... --`
/// init, after the program it starts: the server reaps itself). Unchanged when they already
/// start with [`BRIDGE_PATH`].
pub fn server_args(args: &[String]) -> Vec<String> {
    if args.first().map(String::as_str) == Some(BRIDGE_PATH) {
        return args.to_vec();
    }
    let is_tini = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("tini"));
    let rest = match args.iter().position(|a| a == "--") {
        Some(i) if is_tini => args.get(i + 2..).unwrap_or_default(),
        _ => args.get(1..).unwrap_or_default(),
    };
    std::iter::once(BRIDGE_PATH.to_string())
        .chain(rest.iter().cloned())
        .collect()
}

fn bind(dest: &str, source: &Path, options: &[&str]) -> Result<Mount, AgentError> {
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(spec_err)
}

/// Puts the server on `spec`: the process runs [`BRIDGE_PATH`] ([`server_args`]), the binary
/// is bound read-only (`nosuid`, `nodev`) there, and `m.run_dir` read-write (`nosuid`,
/// `nodev`, `noexec`) at [`RUN_DIR`], after `/run` and before anything under it. Mounts of
/// those two paths a record already has are replaced. Returns whether the spec changed.
pub fn apply_server(spec: &mut Spec, m: &ServerMounts) -> Result<bool, AgentError> {
    if !m.binary.is_absolute() || !m.run_dir.is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "server mounts need absolute paths ({}, {})",
            m.binary.display(),
            m.run_dir.display()
        )));
    }
    let before = spec.clone();
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| AgentError::InvalidArgument("oci spec: no process".into()))?;
    let args = server_args(process.args().as_deref().unwrap_or_default());
    process.set_args(Some(args));
    let bridge = bind(
        BRIDGE_PATH,
        &m.binary,
        &["bind", "rprivate", "ro", "nosuid", "nodev"],
    )?;
    let run = bind(
        RUN_DIR,
        &m.run_dir,
        &["bind", "rprivate", "rw", "nosuid", "nodev", "noexec"],
    )?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|x| {
        x.destination() != Path::new(BRIDGE_PATH) && x.destination() != Path::new(RUN_DIR)
    });
    let under_run = mounts
        .iter()
        .position(|x| x.destination().starts_with(RUN_DIR))
        .or_else(|| {
            mounts
                .iter()
                .position(|x| x.destination() == Path::new("/run"))
                .map(|i| i + 1)
        })
        .unwrap_or(mounts.len());
    mounts.insert(under_run, run);
    mounts.push(bridge);
    spec.set_mounts(Some(mounts));
    Ok(*spec != before)
}

/// Whether `path` is a regular file with an execute bit (symlinks followed); the reason
/// otherwise. Blocking.
pub fn check_server_binary(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        _ => e.to_string(),
    })?;
    if !md.is_file() {
        return Err("is not a regular file".into());
    }
    if md.permissions().mode() & 0o111 == 0 {
        return Err("is not executable".into());
    }
    Ok(())
}

/// The program interpreter (`PT_INTERP`: the dynamic loader) the ELF executable at `path`
/// names; `None` for a statically linked one. A dynamically linked server runs only in images
/// that hold that loader and its libraries at the host's paths; in any other image the start
/// fails with "exec /opt/memoh/bridge: no such file or directory". Blocking.
pub fn elf_interpreter(path: &Path) -> Result<Option<String>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    f.read_exact(&mut head)
        .map_err(|_| "is not an ELF executable (too short)".to_string())?;
    if head[..4] != *b"\x7fELF" {
        return Err("is not an ELF executable".into());
    }
    let wide = match head[4] {
        1 => false,
        2 => true,
        c => return Err(format!("has an unknown ELF class {c}")),
    };
    let little = match head[5] {
        1 => true,
        2 => false,
        e => return Err(format!("has an unknown ELF byte order {e}")),
    };
    let num = |b: &[u8]| -> u64 {
        let mut v = 0u64;
        for (i, byte) in b.iter().enumerate() {
            let shift = if little { i } else { b.len() - 1 - i };
            v |= u64::from(*byte) << (8 * shift);
        }
        v
    };
    // e_phoff, e_phentsize, e_phnum; then p_type, p_offset, p_filesz within an entry.
    let (phoff, phentsize, phnum) = if wide {
        (
            num(&head[0x20..0x28]),
            num(&head[0x36..0x38]),
            num(&head[0x38..0x3a]),
        )
    } else {
        (
            num(&head[0x1c..0x20]),
            num(&head[0x2a..0x2c]),
            num(&head[0x2c..0x2e]),
        )
    };
    let (off_at, size_at, width) = if wide { (8, 0x20, 8) } else { (4, 0x10, 4) };
    if phentsize < (size_at + width) as u64 || phnum > 4096 {
        return Err("has malformed ELF program headers".into());
    }
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut table))
        .map_err(|_| "has truncated ELF program headers".to_string())?;
    for entry in table.chunks_exact(phentsize as usize) {
        const PT_INTERP: u64 = 3;
        if num(&entry[..4]) != PT_INTERP {
            continue;
        }
        let offset = num(&entry[off_at..off_at + width]);
        let size = num(&entry[size_at..size_at + width]).min(4096) as usize;
        let mut name = vec![0u8; size];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut name))
            .map_err(|_| "has a truncated ELF interpreter name".to_string())?;
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        return Ok(Some(String::from_utf8_lossy(&name[..end]).into_owned()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::{build_spec, tests::image, SpecOptions};
    use super::*;

    fn mounts() -> ServerMounts {
        ServerMounts {
            binary: "/usr/local/lib/memoh/container-server".into(),
            run_dir: "/var/lib/memoh-agent/run/default/b1".into(),
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_are_the_bridge_and_what_the_entrypoint_passed() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["/entrypoint.sh"], &[BRIDGE_PATH]),
            (
                &["/entrypoint.sh", "--listen", ":9090"],
                &[BRIDGE_PATH, "--listen", ":9090"],
            ),
            (&["/app/mcp", "--x"], &[BRIDGE_PATH, "--x"]),
            (
                &["/usr/bin/tini", "-g", "--", "/opt/memoh/bridge"],
                &[BRIDGE_PATH],
            ),
            (
                &["tini", "--", "/entrypoint.sh", "--y"],
                &[BRIDGE_PATH, "--y"],
            ),
            (&[BRIDGE_PATH, "--z"], &[BRIDGE_PATH, "--z"]),
            (&[], &[BRIDGE_PATH]),
        ];
        for (from, to) in cases {
            assert_eq!(server_args(&strings(from)), strings(to), "{from:?}");
        }
    }

    #[test]
    fn the_spec_runs_the_host_binary_read_only_with_a_writable_run_dir() {
        let mut opts = SpecOptions::new("mcp-b1", "b1");
        opts.extra_mounts.push(super::super::BindMount {
            source: "/var/lib/memoh-agent/bots/b1/token".into(),
            destination: "/run/memoh/token".into(),
            readonly: true,
        });
        opts.server = Some(mounts());
        let spec = build_spec(&image(), &opts).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &strings(&[BRIDGE_PATH, "serve", "--x"])
        );
        let ms = spec.mounts().as_ref().unwrap();
        let at = |d: &str| {
            ms.iter()
                .position(|m| m.destination() == Path::new(d))
                .unwrap_or_else(|| panic!("no mount at {d}"))
        };
        let bridge = &ms[at(BRIDGE_PATH)];
        assert_eq!(bridge.typ().as_deref(), Some("bind"));
        assert_eq!(
            bridge.source().as_deref(),
            Some(Path::new("/usr/local/lib/memoh/container-server"))
        );
        assert_eq!(
            bridge.options().as_ref().unwrap(),
            &strings(&["bind", "rprivate", "ro", "nosuid", "nodev"])
        );
        let run = &ms[at(RUN_DIR)];
        assert_eq!(
            run.options().as_ref().unwrap(),
            &strings(&["bind", "rprivate", "rw", "nosuid", "nodev", "noexec"])
        );
        // /run first, then /run/memoh, then what lies in it.
        assert!(at("/run") < at(RUN_DIR) && at(RUN_DIR) < at("/run/memoh/token"));
        // Applying it again changes nothing; another binary path is taken over.
        let mut again = spec.clone();
        assert!(!apply_server(&mut again, &mounts()).unwrap());
        let mut other = mounts();
        other.binary = "/opt/other/server".into();
        assert!(apply_server(&mut again, &other).unwrap());
        let n = again
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|m| m.destination() == Path::new(BRIDGE_PATH))
            .count();
        assert_eq!(n, 1);
        let mut rel = mounts();
        rel.binary = "server".into();
        assert!(apply_server(&mut again, &rel).is_err());
    }

    #[test]
    fn only_an_executable_file_is_a_server_binary() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s");
        assert_eq!(check_server_binary(&f), Err("does not exist".into()));
        assert_eq!(
            check_server_binary(d.path()),
            Err("is not a regular file".into())
        );
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(check_server_binary(&f), Err("is not executable".into()));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_server_binary(&f), Ok(()));
    }

    /// The loader `readelf -l` names for `path`, `None` when it names none.
    fn readelf_interpreter(path: &Path) -> Option<String> {
        let out = std::process::Command::new("readelf")
            .arg("-lW")
            .arg(path)
            .output()
            .expect("readelf (binutils)");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("program interpreter:"))?;
        let name = line
            .split("interpreter:")
            .nth(1)?
            .trim()
            .trim_end_matches(']');
        Some(name.trim().to_string())
    }

    #[test]
    fn the_interpreter_is_what_readelf_reads() {
        // This test's own executable is dynamic here; the busybox of the test image and any
        // static program on the host have no interpreter.
        let mut seen = (false, false);
        let candidates = [
            std::env::current_exe().unwrap(),
            "/bin/busybox".into(),
            "/usr/bin/busybox".into(),
            "/bin/sh".into(),
            "/sbin/ldconfig".into(),
            "/usr/bin/ls".into(),
        ];
        for p in candidates.iter().filter(|p| p.is_file()) {
            let ours = elf_interpreter(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(ours, readelf_interpreter(p), "{}", p.display());
            match ours {
                Some(_) => seen.0 = true,
                None => seen.1 = true,
            }
        }
        assert!(seen.0, "no dynamic program among {candidates:?}");
        assert!(seen.1, "no static program among {candidates:?}");
    }

    #[test]
    fn what_is_not_an_elf_executable_is_said() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s");
        std::fs::write(&f, "#!/bin/sh\nexec true\n".repeat(8)).unwrap();
        assert_eq!(elf_interpreter(&f), Err("is not an ELF executable".into()));
        std::fs::write(&f, b"\x7fELF").unwrap();
        assert!(elf_interpreter(&f).unwrap_err().contains("too short"));
        // A real header whose program headers were cut off.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        std::fs::write(&f, &exe[..80]).unwrap();
        assert!(elf_interpreter(&f).unwrap_err().contains("truncated"));
    }
}
