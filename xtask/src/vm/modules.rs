//! The kernel modules the tests need where Debian builds them as modules, with their
//! dependencies, decompressed for busybox's `insmod`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context, Result};

use super::kernels::filter;

/// nftables (the tests' `inet` table dropping pure ACKs: payload, cmp, bitwise, anonymous
/// sets are all in nf_tables itself), veth pairs, and sock_diag for TCP (queue gauges).
const WANTED: [&str; 3] = ["nf_tables", "veth", "tcp_diag"];

/// Writes `<name>.ko` for every module to load into `out`; returns them in load order.
pub fn resolve(tree: &Path, out: &Path) -> Result<Vec<String>> {
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out)?;
    let builtin: BTreeSet<String> = fs::read_to_string(tree.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|l| name_of(Path::new(l)))
        .collect();
    let mut files = BTreeMap::new();
    index(&tree.join("kernel"), &mut files)?;
    let mut order = Vec::new();
    for m in WANTED {
        visit(m, &files, &builtin, out, &mut order)?;
    }
    Ok(order)
}

/// Depth first: dependencies before the module that needs them.
fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    out: &Path,
    order: &mut Vec<String>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if builtin.contains(&name) || order.contains(&name) {
        return Ok(());
    }
    let file = files
        .get(&name)
        .with_context(|| format!("module {name} is neither built in nor in the package"))?;
    let ko = out.join(format!("{name}.ko"));
    let tool = match file.extension().and_then(|e| e.to_str()) {
        Some("xz") => Some("xz"),
        Some("zst") => Some("zstd"),
        Some("gz") => Some("gzip"),
        _ => None,
    };
    match tool {
        Some(tool) => fs::write(
            &ko,
            filter(Command::new(tool).arg("-dc"), &fs::read(file)?)?,
        )?,
        None => drop(fs::copy(file, &ko)?),
    }
    let deps = Command::new("modinfo")
        .args(["-F", "depends"])
        .arg(&ko)
        .output()?;
    ensure!(
        deps.status.success(),
        "modinfo {}: {}",
        ko.display(),
        String::from_utf8_lossy(&deps.stderr)
    );
    for dep in String::from_utf8_lossy(&deps.stdout)
        .trim()
        .split(',')
        .filter(|d| !d.is_empty())
    {
        visit(dep, files, builtin, out, order)?;
    }
    order.push(name);
    Ok(())
}

fn index(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            index(&p, files)?;
        } else {
            files.insert(name_of(&p), p);
        }
    }
    Ok(())
}

/// `.../nf_tables.ko.xz` → `nf_tables` (module names use `_` where files may use `-`).
fn name_of(path: &Path) -> String {
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    file.split(".ko")
        .next()
        .unwrap_or_default()
        .replace('-', "_")
}
