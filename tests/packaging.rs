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

#[test]
fn every_asset_of_the_debian_package_exists() {
    let manifest: toml::Table = std::fs::read_to_string("Cargo.toml")
        .unwrap()
        .parse()
        .unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().unwrap();
    let mut installed = Vec::new();
    for asset in assets {
        let [source, target, mode] = &asset.as_array().unwrap()[..] else {
            panic!("an asset is [source, target, mode]: {asset}");
        };
        let (source, target) = (source.as_str().unwrap(), target.as_str().unwrap());
        u32::from_str_radix(mode.as_str().unwrap(), 8).unwrap();
        match source.strip_prefix("target/release/") {
            // Built by `cargo deb` itself: one of this package's binaries.
            Some(binary) => assert_eq!(binary, env!("CARGO_PKG_NAME")),
            None => assert!(Path::new(source).is_file(), "no {source}"),
        }
        let name = Path::new(source).file_name().unwrap().to_str().unwrap();
        installed.push(format!("/{target}{name}"));
    }
    for conf in deb["conf-files"].as_array().unwrap() {
        let conf = conf.as_str().unwrap();
        assert!(
            installed.iter().any(|path| path == conf),
            "{conf} is no asset: {installed:?}"
        );
    }
    // The config shipped is valid as it is.
    natsched::config::Config::from_file(Path::new("config/natsched.toml")).unwrap();
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    assert!(Path::new(scripts).is_dir(), "no {scripts}");
    let units = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    assert!(Path::new(units).join("natsched.service").is_file());
}

#[test]
fn the_containerfile_copies_what_exists_and_its_config_is_valid() {
    let containerfile = std::fs::read_to_string("packaging/container/Containerfile").unwrap();
    let mut copied = 0;
    for line in containerfile.lines() {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if rest.contains("--from=") {
            continue; // from the build stage
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        let source = parts[..parts.len() - 1].last().unwrap();
        if *source != "." {
            assert!(
                Path::new(source).exists(),
                "COPY names {source}, which does not exist"
            );
        }
        copied += 1;
    }
    assert!(copied >= 2, "{containerfile}");
    let config = "packaging/container/natsched.toml";
    let config = natsched::config::Config::from_file(Path::new(config)).unwrap();
    assert!(
        config.metrics.is_some(),
        "the image exposes the metrics port"
    );
    assert!(containerfile.contains(&format!("VOLUME {}", config.store.path.display())));
}

#[test]
fn the_kubernetes_example_is_valid_yaml_and_its_parts_fit() {
    use yaml_rust2::{Yaml, YamlLoader};
    let text = std::fs::read_to_string("packaging/kubernetes/sidecar.yaml").unwrap();
    let documents = YamlLoader::load_from_str(&text).unwrap();
    let kind = |doc: &Yaml| doc["kind"].as_str().unwrap_or_default().to_owned();
    let config_map = documents.iter().find(|d| kind(d) == "ConfigMap").unwrap();
    let set = documents.iter().find(|d| kind(d) == "StatefulSet").unwrap();
    let config_name = config_map["metadata"]["name"].as_str().unwrap();
    let toml = config_map["data"]["natsched.toml"].as_str().unwrap();
    let config = natsched::config::Config::from_toml(toml).unwrap();

    let pod = &set["spec"]["template"]["spec"];
    let natsched = pod["containers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("natsched"))
        .unwrap();
    let args: Vec<&str> = natsched["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    // Every mount names a volume of the pod or a claim of the set; the config file is the
    // ConfigMap's key, and the store is where the config says.
    let volumes: Vec<&Yaml> = pod["volumes"].as_vec().unwrap().iter().collect();
    let claims: Vec<&str> = set["spec"]["volumeClaimTemplates"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    let mut mounted_config = false;
    let mut mounted_store = false;
    for mount in natsched["volumeMounts"].as_vec().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let path = mount["mountPath"].as_str().unwrap();
        if let Some(volume) = volumes.iter().find(|v| v["name"].as_str() == Some(name)) {
            assert_eq!(volume["configMap"]["name"].as_str(), Some(config_name));
            assert_eq!(format!("{path}/natsched.toml"), config_path);
            mounted_config = true;
        } else {
            assert!(claims.contains(&name), "mount {name} names no volume");
            assert_eq!(Path::new(path), config.store.path);
            mounted_store = true;
        }
    }
    assert!(mounted_config && mounted_store);
    let port = natsched["ports"][0]["containerPort"].as_i64().unwrap();
    let listen = config.metrics.as_ref().unwrap().listen;
    assert_eq!(listen.port() as i64, port);
}
