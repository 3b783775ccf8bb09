//! `sluice admin ...` round trips: the real binary against a real service
//! and Redis, tables by default, JSON with --json, API errors shown with
//! their message and a non-zero exit.

use serde_json::Value;
use sluice_tests::service::TEST_ADMIN_TOKEN;
use sluice_tests::{free_addr, paths::sluice_bin, Redis, Service, ServiceOpts};
use std::process::{Command, Output};

struct Cli {
    url: String,
    token_file: tempfile::NamedTempFile,
}

impl Cli {
    fn new(svc: &Service) -> Cli {
        let token_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token_file.path(), format!("{TEST_ADMIN_TOKEN}\n")).unwrap();
        Cli { url: svc.base_url(), token_file }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(sluice_bin());
        for v in ["SLUICE_ADMIN_URL", "SLUICE_ADMIN_TOKEN", "SLUICE_ADMIN_TOKEN_FILE", "SLUICE_ADMIN_ACTOR"] {
            cmd.env_remove(v);
        }
        cmd.arg("admin")
            .args(["--url", &self.url])
            .arg("--token-file")
            .arg(self.token_file.path())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "sluice admin {args:?} failed: {stderr}{stdout}");
        stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
    }
}

#[test]
fn cli_round_trips_every_admin_action_with_tables_and_json() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), ServiceOpts::default());
    let cli = Cli::new(&svc);

    let out = cli.ok(&["put-tier", "gold", "hour=5000", "day=50000", "--pool", "gold", "--reason", "new plan"]);
    assert!(out.contains("tier gold written"), "{out}");
    let tiers = cli.ok(&["tiers"]);
    let gold = tiers.lines().find(|l| l.trim_start().starts_with("gold")).unwrap_or_else(|| panic!("{tiers}"));
    assert!(gold.contains("5000") && gold.contains("50000"), "{tiers}");
    assert_eq!(cli.json(&["tier", "gold"])["tier"]["reserved_pool"], "gold");

    let v = cli.json(&["set-tier", "acme", "gold", "--actor", "alice"]);
    assert_eq!(v["tier"], "gold");
    let v = cli.json(&["set-limits", "acme", "hour=7000", "cost_weight=2"]);
    assert_eq!(v["limits"]["hour"]["source"], "custom");
    assert_eq!(v["limits"]["cost_weight"]["effective"], 2);
    let v = cli.json(&["grant-override", "acme", "hour=9000", "--for", "2h", "--reason", "launch day"]);
    assert_eq!(v["limits"]["hour"]["effective"], 9000);
    assert_eq!(v["limits"]["hour"]["source"], "override");

    let status = cli.ok(&["status", "acme"]);
    assert!(status.contains("tier gold"), "{status}");
    let hour = status.lines().find(|l| l.trim_start().starts_with("hour")).unwrap();
    for cell in ["9000", "override", "5000", "7000"] {
        assert!(hour.contains(cell), "missing {cell} in {hour:?}\n{status}");
    }

    let v = cli.json(&["revoke-override", "acme", "hour"]);
    assert_eq!(v["limits"]["hour"]["effective"], 7000);
    let v = cli.json(&["set-limits", "acme", "hour=clear"]);
    assert_eq!(v["limits"]["hour"]["source"], "tier");
    let v = cli.json(&["clear-limits", "acme"]);
    assert_eq!(v["limits"]["cost_weight"]["source"], "none");
    let v = cli.json(&["set-mode", "acme", "--shadow", "on", "--pool", "none"]);
    assert_eq!((v["shadow"].as_bool(), v["reserved_pool"].as_str()), (Some(true), Some("gold")), "the tier's pool remains");

    let r = svc.get("/metrics");
    assert_eq!(r.status, 200);
    let check = sluice_tests::http::send_json(svc.addr(), "POST", "/v1/check", &[], &serde_json::json!({"tenant": "acme"})).unwrap();
    assert_eq!(check.status, 200);

    let audit = cli.ok(&["audit", "--tenant", "acme"]);
    for action in ["set_tier", "set_limits", "grant_override", "revoke_override", "clear_limits", "set_mode"] {
        assert!(audit.contains(action), "{action} missing from\n{audit}");
    }
    assert!(audit.contains("alice") && audit.contains("launch day"), "{audit}");
    let v = cli.json(&["audit", "--by", "alice"]);
    assert_eq!(v["count"], 1);
    let v = cli.json(&["audit", "--action", "put_tier"]);
    assert_eq!(v["entries"][0]["reason"], "new plan");

    let csv = cli.ok(&["usage", "--tenant", "acme", "--format", "csv"]);
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("date,tenant,admitted"));
    assert!(lines.next().unwrap().contains(",acme,1,0,"), "{csv}");
    let v = cli.json(&["usage"]);
    assert_eq!(v["rows"][0]["tenant"], "acme");
    assert!(cli.ok(&["usage"]).contains("ADMITTED"));

    let out = cli.ok(&["default-tier", "gold"]);
    assert!(out.lines().any(|l| l.contains("gold") && l.contains("yes")), "{out}");
    cli.ok(&["default-tier", "free"]);
    cli.ok(&["delete-tier", "gold"]);
    assert!(!cli.ok(&["tiers"]).contains("gold"));
}

#[test]
fn cli_errors_show_the_api_message_and_exit_non_zero() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), ServiceOpts::default());
    let cli = Cli::new(&svc);
    let out = cli.run(&["set-tier", "acme", "platinum"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("400 unknown_tier") && err.contains("platinum"), "{err}");
    let out = cli.run(&["delete-tier", "free"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("409 default_tier"));
    let out = cli.run(&["set-limits", "acme", "hour"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=VALUE"));

    // A wrong token is a 403 with the API's message.
    std::fs::write(cli.token_file.path(), "wrong").unwrap();
    let out = cli.run(&["tiers"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("403 forbidden"));
    // A --token flag wins over a token file from the environment (README's setup exports one).
    let out = Command::new(sluice_bin())
        .env_remove("SLUICE_ADMIN_TOKEN")
        .env("SLUICE_ADMIN_TOKEN_FILE", cli.token_file.path())
        .args(["admin", "--url", &svc.base_url(), "--token", TEST_ADMIN_TOKEN, "tiers"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // No token at all, and a service that is not there.
    let out = Command::new(sluice_bin())
        .env_remove("SLUICE_ADMIN_TOKEN")
        .env_remove("SLUICE_ADMIN_TOKEN_FILE")
        .args(["admin", "--url", &svc.base_url(), "tiers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no admin token"));
    let out = Command::new(sluice_bin())
        .args(["admin", "--url", &format!("http://{}", free_addr()), "--token", "x", "tiers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cli_pointed_at_another_http_server_says_so_instead_of_printing_an_empty_table() {
    use std::io::{Read, Write};
    // Answers every request 200 with an empty JSON object.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
        }
    });
    for args in [&["status", "acme"][..], &["tiers"], &["audit"], &["usage"], &["set-tier", "acme", "pro"]] {
        let out = Command::new(sluice_bin())
            .env_remove("SLUICE_ADMIN_TOKEN_FILE")
            .args(["admin", "--url", &format!("http://{addr}"), "--token", "x"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is --url the Sluice quota service"), "{args:?}: {err}");
    }
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(d.as_millis()).unwrap()
}

#[test]
fn cli_overrides_last_seven_days_by_default_or_until_a_time_revoke_all_at_once_and_the_audit_filters_by_time() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), ServiceOpts::default());
    let cli = Cli::new(&svc);
    let before = now_ms() - 1_000;

    let v = cli.json(&["grant-override", "t7", "hour=900"]);
    let until = v["overrides"]["hour"]["until_ms"].as_i64().unwrap_or_else(|| panic!("{v}"));
    let week = 7 * 86_400_000;
    assert!((until - (now_ms() + week)).abs() < 60_000, "the default is 7 days: {v}");
    let two_days = now_ms() + 2 * 86_400_000;
    let v = cli.json(&["grant-override", "t7", "day=9000", "--until", &two_days.to_string()]);
    assert_eq!(v["overrides"]["day"]["until_ms"], two_days, "{v}");
    assert_eq!(v["overrides"]["hour"]["value"], 900, "{v}");

    // No limit named: every override goes.
    let v = cli.json(&["revoke-override", "t7"]);
    let left = v["overrides"].as_object().map_or(0, serde_json::Map::len);
    assert_eq!(left, 0, "{v}");
    assert_eq!(v["limits"]["hour"]["source"], "tier", "{v}");

    let since = cli.json(&["audit", "--tenant", "t7", "--since", &before.to_string()]);
    assert_eq!(since["count"], 3, "two grants and one revoke: {since}");
    let until = cli.json(&["audit", "--tenant", "t7", "--until", &before.to_string()]);
    assert_eq!(until["count"], 0, "nothing before the test: {until}");
    let table = cli.ok(&["audit", "--tenant", "t7", "--since", &before.to_string()]);
    assert!(table.contains("grant_override") && table.contains("revoke_override"), "{table}");
}
