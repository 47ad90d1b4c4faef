//! Secured NATS: credentials in the server URL (daemon and command-line client), a token, and
//! TLS with client certificates made here with the openssl CLI. Real nats-servers.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use natsched::config::{Secret, TlsConfig};

/// Runs the natsched binary's client with `args` (off the runtime, which runs the daemon);
/// returns (success, stdout + stderr).
async fn cli(args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let run = move || {
        Command::new(env!("CARGO_BIN_EXE_natsched"))
            .args(args)
            .env_remove("NATS_URL")
            .output()
            .unwrap()
    };
    let out = tokio::task::spawn_blocking(run).await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Schedules through `client` and waits for the delivery.
async fn round_trip(client: &async_nats::Client) {
    let mut sub = subscribe(client, "secured.x").await;
    schedule(client, "secured.x", &[("Sched-Delay", "0")]).await;
    next(&mut sub).await;
}

#[tokio::test]
async fn user_and_password_in_the_url_work_for_the_daemon_and_the_client() {
    let server = NatsServer::start_with_config(
        "authorization { users = [ { user: natsched, password: \"p@ss:w/rd\" } ] }",
    );
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    let port = server.port;
    let url = format!("nats://natsched:p%40ss%3Aw%2Frd@127.0.0.1:{port}");
    config.nats.url = url.clone();
    let daemon = Daemon::start(config).await;
    let client =
        async_nats::ConnectOptions::with_user_and_password("natsched".into(), "p@ss:w/rd".into())
            .connect(server.url.as_str())
            .await
            .unwrap();
    round_trip(&client).await;

    let (ok, out) = cli(&["stats", "--server", &url]).await;
    assert!(ok, "{out}");
    assert!(out.contains("pending"), "{out}");
    // A wrong password is refused by the server, and never shown.
    let wrong = format!("nats://natsched:n0t-it@127.0.0.1:{port}");
    let (ok, out) = cli(&["stats", "--server", &wrong]).await;
    assert!(!ok, "{out}");
    assert!(!out.contains("n0t-it"), "the password shows: {out}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_token_in_the_config_or_in_the_url_works() {
    let server = NatsServer::start_with_config("authorization { token: \"s3cr3t-t0ken\" }");
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.nats.token = Some(Secret::new("s3cr3t-t0ken"));
    let daemon = Daemon::start(config.clone()).await;
    let client = async_nats::ConnectOptions::with_token("s3cr3t-t0ken".into())
        .connect(server.url.as_str())
        .await
        .unwrap();
    round_trip(&client).await;
    daemon.stop().await;

    config.nats.token = None;
    config.nats.url = format!("nats://s3cr3t-t0ken@127.0.0.1:{}", server.port);
    let daemon = Daemon::start(config.clone()).await;
    round_trip(&client).await;
    let (ok, out) = cli(&["stats", "--server", &config.nats.url]).await;
    assert!(ok, "{out}");
    daemon.stop().await;
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=natsched test CA",
    ]);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

#[tokio::test]
async fn tls_with_a_client_certificate_works() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let path = |name: &str| certs.path().join(name);
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    ));
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.nats.tls = Some(TlsConfig {
        ca_file: Some(path("ca.pem")),
        cert_file: Some(path("client.pem")),
        key_file: Some(path("client.key")),
        required: true,
    });
    let daemon = Daemon::start(config).await;
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(path("ca.pem"))
        .add_client_certificate(path("client.pem"), path("client.key"))
        .require_tls(true)
        .connect(server.url.as_str())
        .await
        .unwrap();
    round_trip(&client).await;
    // Without a client certificate the server refuses the connection.
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .add_root_certificates(path("ca.pem"))
            .require_tls(true)
            .connect(server.url.as_str()),
    )
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "connected without a certificate"
    );
    daemon.stop().await;
}
