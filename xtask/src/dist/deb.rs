//! The Debian package, laid out by hand as debhelper would and built with `dpkg-deb`:
//! /usr/bin/qtrace, the unit in /lib/systemd/system (enabled and started on install like any
//! Debian service, stopped on removal), /etc/qtrace/qtrace.toml as a conffile, the sysusers file
//! (applied on install), completions, gzipped man pages, copyright, changelog, examples.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use super::{copy, VERSION};
use crate::run;

const MAINTAINER: &str = "The qtrace developers <qtrace@example.org>";

pub fn build(binary: &Path, generated: &Path, out: &Path, epoch: u64) -> Result<PathBuf> {
    let root = out.join("stage/deb");
    let doc = root.join("usr/share/doc/qtrace");
    copy(binary, &root.join("usr/bin/qtrace"), 0o755)?;
    let unit = fs::read_to_string("deploy/systemd/qtrace.service")?
        .replace("/usr/local/bin/qtrace", "/usr/bin/qtrace")
        .replace(
            "by `cargo xtask install` (see deploy/README.md)",
            "by the qtrace package",
        )
        .replace(
            "[Unit]\n",
            "[Unit]\nDocumentation=man:qtrace-run(1) file:///usr/share/doc/qtrace/README.md\n",
        );
    write(&root.join("lib/systemd/system/qtrace.service"), &unit)?;
    copy(
        Path::new("deploy/systemd/qtrace.sysusers.conf"),
        &root.join("usr/lib/sysusers.d/qtrace.conf"),
        0o644,
    )?;
    copy(
        Path::new("deploy/qtrace.toml"),
        &root.join("etc/qtrace/qtrace.toml"),
        0o644,
    )?;
    for (file, dir) in [
        (
            "qtrace.bash",
            "usr/share/bash-completion/completions/qtrace",
        ),
        ("_qtrace", "usr/share/zsh/vendor-completions/_qtrace"),
        (
            "qtrace.fish",
            "usr/share/fish/vendor_completions.d/qtrace.fish",
        ),
    ] {
        copy(&generated.join(file), &root.join(dir), 0o644)?;
    }
    let man1 = root.join("usr/share/man/man1");
    fs::create_dir_all(&man1)?;
    for page in fs::read_dir(generated.join("man"))? {
        let page = page?.path();
        copy(&page, &man1.join(page.file_name().unwrap()), 0o644)?;
    }
    for (from, to) in [
        ("deploy/systemd/dedicated-user.conf", "dedicated-user.conf"),
        ("deploy/systemd/other-netns.conf", "other-netns.conf"),
        ("deploy/prometheus/prometheus.yml", "prometheus.yml"),
        ("deploy/prometheus/alerts.yml", "alerts.yml"),
        ("deploy/grafana/qtrace.json", "grafana-qtrace.json"),
    ] {
        copy(Path::new(from), &doc.join("examples").join(to), 0o644)?;
    }
    copy(Path::new("README.md"), &doc.join("README.md"), 0o644)?;
    write(&doc.join("copyright"), &copyright()?)?;
    write(
        &root.join("usr/share/lintian/overrides/qtrace"),
        LINTIAN_OVERRIDES,
    )?;
    write(&doc.join("changelog"), &changelog(epoch)?)?;
    // Policy 12.3: changelogs and man pages compressed with gzip -9n.
    run(Command::new("sh")
        .arg("-c")
        .arg("gzip -9n usr/share/doc/qtrace/changelog usr/share/man/man1/*.1")
        .current_dir(&root))?;

    let debian = root.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    write(&debian.join("conffiles"), "/etc/qtrace/qtrace.toml\n")?;
    for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        write(&debian.join(name), text)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(debian.join(name), fs::Permissions::from_mode(0o755))?;
    }
    let md5 = Command::new("sh")
        .arg("-c")
        .arg("find usr lib etc -type f ! -path 'etc/*' | sort | xargs md5sum")
        .current_dir(&root)
        .output()?;
    anyhow::ensure!(md5.status.success(), "md5sum failed");
    fs::write(debian.join("md5sums"), md5.stdout)?;
    let du = Command::new("du")
        .args(["-sk", "--exclude=DEBIAN"])
        .arg(&root)
        .output()?;
    let size = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .to_string();
    write(&debian.join("control"), &control(&size))?;
    run(Command::new("chmod")
        .args(["-R", "u=rwX,go=rX"])
        .arg(root.join("usr")))?;
    let deb = out.join(format!("qtrace_{VERSION}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .stdout(std::process::Stdio::null()))?;
    Ok(deb)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(path, text)?;
    Ok(())
}

fn control(installed_kib: &str) -> String {
    format!(
        "Package: qtrace
Version: {VERSION}
Architecture: amd64
Maintainer: {MAINTAINER}
Installed-Size: {installed_kib}
Section: net
Priority: optional
Description: eBPF tracer of TCP listen-queue drops per listening socket
 qtrace counts, per listening socket (network namespace, address, port) and
 exactly, the handshakes the kernel drops because a SYN queue or an accept
 queue is full, SYN-ACK retransmits, syncookies, overflow resets and accept
 queue waits, from eBPF programs attached at the best tier the running kernel
 offers (fentry, kprobes or tracepoints).
 .
 The qtrace service exports them as Prometheus metrics on port 9860, with the
 owning process of each listener; qtrace events, top and doctor show them
 live. It needs a kernel with BTF (CONFIG_DEBUG_INFO_BTF).
"
    )
}

/// A machine-readable copyright file (DEP-5), licences quoted from the repository.
fn copyright() -> Result<String> {
    let mit = fs::read_to_string("LICENSE-MIT")?;
    let mut s = String::from(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: qtrace
Upstream-Contact: The qtrace developers <qtrace@example.org>

Files: *
Copyright: 2026 The qtrace developers
License: MIT or Apache-2.0
Comment: The kernel programs embedded in /usr/bin/qtrace are licensed MIT or
 GPL-2.0-only (on Debian systems see /usr/share/common-licenses/GPL-2). The
 binary is linked statically with the Rust crates listed by its Cargo.lock
 (MIT, Apache-2.0 and compatible licences), musl (MIT) and mimalloc (MIT).

License: MIT
",
    );
    for line in mit.lines().skip_while(|l| !l.starts_with("Permission")) {
        let _ = writeln!(s, " {}", if line.trim().is_empty() { "." } else { line });
    }
    s += "
License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the \"License\"); you may not
 use this file except in compliance with the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can
 be found in /usr/share/common-licenses/Apache-2.0.
";
    Ok(s)
}

fn changelog(epoch: u64) -> Result<String> {
    let date = Command::new("date")
        .args(["-u", "-R", "-d"])
        .arg(format!("@{epoch}"))
        .output()?;
    Ok(format!(
        "qtrace ({VERSION}) unstable; urgency=medium

  * Release {VERSION}, built by `cargo xtask dist`.

 -- {MAINTAINER}  {}
",
        String::from_utf8(date.stdout)?.trim()
    ))
}

/// Two, each for what Debian's tools misread in a static Rust binary: a static-pie executable
/// (ET_DYN, no interpreter, for address-space layout randomisation) looks to lintian like a
/// shared library; and the YAML parser of `--web.config.file` (serde_yaml_ng on unsafe-libyaml,
/// a Rust translation of libyaml compiled into the binary like every other crate) carries
/// libyaml's strings, which lintian takes for an embedded copy of the C library.
const LINTIAN_OVERRIDES: &str = "\
# /usr/bin/qtrace is a static-pie executable (x86_64-unknown-linux-musl): position-independent
# for ASLR, with no program interpreter and no shared libraries to depend on.
qtrace: shared-library-lacks-prerequisites [usr/bin/qtrace]
# The web config's YAML parser is unsafe-libyaml, a Rust translation of libyaml built into the
# static binary as all its Rust dependencies are; there is no C libyaml to link instead.
qtrace: embedded-library libyaml [usr/bin/qtrace]
";

// The maintainer scripts debhelper (dh_installsysusers, dh_installsystemd) would write.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	# The system user of the dedicated-user drop-in (/usr/share/doc/qtrace/examples).
	if command -v systemd-sysusers >/dev/null 2>&1; then
		systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} qtrace.conf
	fi
	# Enabled on first installation; on upgrades, new symlinks if the unit changed.
	if deb-systemd-helper --quiet was-enabled 'qtrace.service'; then
		deb-systemd-helper enable 'qtrace.service' >/dev/null || true
	else
		deb-systemd-helper update-state 'qtrace.service' >/dev/null || true
	fi
	if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			_dh_action=restart
		else
			_dh_action=start
		fi
		deb-systemd-invoke $_dh_action 'qtrace.service' >/dev/null || true
	fi
fi
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ "$1" = remove ] && [ -d /run/systemd/system ] ; then
	deb-systemd-invoke stop 'qtrace.service' >/dev/null || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ] ; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = "purge" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper purge 'qtrace.service' >/dev/null || true
	fi
fi
"#;
