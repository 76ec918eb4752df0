//! The Debian package, as an operator installs it on a node: built from the
//! repository by `packaging/build-deb.sh` around this build's binary,
//! installed with `dpkg -i` on this machine (the tests run as root, as CI
//! does), checked in place (the installed binary checks the installed
//! config, the unit passes `systemd-analyze verify`, the service user and its
//! state directory exist, the man page and completions are there), then purged.

mod common;

use common::BIN;
use std::path::Path;
use std::process::{Command, Output};

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(o.status.success(), "{program} {args:?}: {}", text(&o));
    text(&o)
}

#[test]
fn the_debian_package_installs_a_checked_config_a_verified_unit_and_purges_cleanly() {
    let out = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/build-deb.sh");
    let built = ok(script, &[BIN, out.path().to_str().unwrap()]);
    let deb = built.lines().last().unwrap().trim().to_string();
    assert!(deb.ends_with(".deb") && Path::new(&deb).exists(), "{built}");

    let contents = ok("dpkg-deb", &["--contents", &deb]);
    for path in [
        "./usr/bin/expmon",
        "./etc/expmon/expmon.toml",
        "./etc/default/expmon",
        "./lib/systemd/system/expmon.service",
        "./usr/share/man/man1/expmon.1.gz",
        "./usr/share/man/man1/expmon-run.1.gz",
        "./usr/share/bash-completion/completions/expmon",
        "./usr/share/zsh/vendor-completions/_expmon",
        "./usr/share/fish/vendor_completions.d/expmon.fish",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "{path} in the package: {contents}");
    }

    ok("dpkg", &["-i", &deb]);
    let checked = ok("/usr/bin/expmon", &["check-config", "/etc/expmon/expmon.toml"]);
    assert!(checked.contains("/etc/expmon/expmon.toml: ok"), "{checked}");
    let version = ok("/usr/bin/expmon", &["--version"]);
    assert!(version.starts_with(&format!("expmon {} (commit ", env!("CARGO_PKG_VERSION"))), "{version}");
    // The service runs as its own user, with its state under /var/lib/expmon.
    let user = ok("getent", &["passwd", "expmon"]);
    assert!(user.contains(":/var/lib/expmon:"), "{user}");
    let owner = ok("stat", &["-c", "%U", "/var/lib/expmon"]);
    assert_eq!(owner.trim(), "expmon");
    let unit = std::fs::read_to_string("/lib/systemd/system/expmon.service").unwrap();
    for line in
        ["User=expmon", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID", "--checkpoint /var/lib/expmon/"]
    {
        assert!(unit.contains(line), "{line} in the unit");
    }
    let verified = run("systemd-analyze", &["verify", "/lib/systemd/system/expmon.service"]);
    assert!(verified.status.success(), "systemd-analyze verify: {}", text(&verified));
    let man = ok("sh", &["-c", "gzip -dc /usr/share/man/man1/expmon.1.gz"]);
    assert!(man.contains(".TH expmon 1") && man.contains("check\\-config"), "{man}");
    let run_page = ok("sh", &["-c", "gzip -dc /usr/share/man/man1/expmon-run.1.gz"]);
    assert!(run_page.contains("checkpoint\\-interval"), "{run_page}");
    let bash = std::fs::read_to_string("/usr/share/bash-completion/completions/expmon").unwrap();
    assert!(bash.contains("--checkpoint-interval") && bash.contains("--metrics-addr"), "bash completion");

    ok("dpkg", &["--purge", "expmon"]);
    assert!(!Path::new("/usr/bin/expmon").exists(), "the binary is gone");
    assert!(!Path::new("/var/lib/expmon").exists(), "the state is gone on purge");
    assert!(!run("getent", &["passwd", "expmon"]).status.success(), "the user is gone on purge");
}
