//! The systemd unit (`packaging/natsched.service`): systemd's own checks accept it, and its
//! sandbox rates "OK" (exposure 2.0 or lower) in `systemd-analyze security`. The tool is
//! part of Debian's `systemd` package, which `.ci/run` installs; elsewhere the test says it
//! was skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

fn systemd_analyze() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("systemd-analyze"))
        .find(|tool| tool.is_file())
}

/// The unit as installed, but running the binary cargo built (`verify` checks that the
/// command exists).
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string("packaging/natsched.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/natsched run"), "{unit}");
    let copy = dir.join("natsched.service");
    let built = env!("CARGO_BIN_EXE_natsched");
    std::fs::write(&copy, unit.replace("/usr/bin/natsched", built)).unwrap();
    copy
}

#[test]
fn the_unit_passes_systemd_s_checks_and_its_sandbox_rates_ok() {
    let Some(tool) = systemd_analyze() else {
        eprintln!("systemd-analyze is not installed: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let verify = Command::new(&tool)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {said}");
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warns: {said}"
    );

    let security = Command::new(&tool)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|line| line.split("natsched.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {report}"));
    assert!(
        exposure <= 2.0,
        "exposure {exposure} (goal 2.0 or lower):\n{report}"
    );
}
