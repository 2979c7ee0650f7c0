//! Reading a run's console (the probes' tiers, libtest's results, the failures' panic output)
//! and the table.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::Value;

/// Marker lines the test script prints.
pub const MARK: &str = "@@vm-test";
const PROBES: [&str; 4] = ["syn", "ack", "synack", "accept"];

pub struct Outcome {
    /// `native`, `5.10`, … and the attach mode.
    pub target: String,
    pub mode: String,
    /// From `qtrace probes --json`: the kernel release and each probe's tier.
    pub release: Option<String>,
    pub tiers: BTreeMap<String, String>,
    pub passed: usize,
    /// Test (`binary::name`) and what it printed when it failed.
    pub failed: Vec<(String, String)>,
    /// Why the run itself did not finish (VM timeout, guest crash, no probe report).
    pub problem: Option<String>,
    pub seconds: f64,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.failed.is_empty()
    }
}

/// One binary's libtest output, between its begin and end markers.
#[derive(Default)]
struct Binary<'a> {
    name: &'a str,
    lines: Vec<&'a str>,
    passed: usize,
    failed: Vec<&'a str>,
    pending: Option<&'a str>,
    /// The passed count of libtest's summary line.
    summary: Option<usize>,
}

impl<'a> Binary<'a> {
    fn line(&mut self, line: &'a str) {
        self.lines.push(line);
        // `test result: FAILED. 25 passed; 1 failed; 0 ignored; …`
        if let Some(counts) = line.strip_prefix("test result: ") {
            let passed = counts.split(';').find_map(|c| c.strip_suffix(" passed"));
            self.summary = passed.and_then(|p| p.split_whitespace().last()?.parse().ok());
            return;
        }
        // `test NAME ... RESULT`; output of a test's children may split it over lines.
        let (name, result) = match line
            .strip_prefix("test ")
            .and_then(|r| r.split_once(" ... "))
        {
            Some((name, result)) => (name, result.trim()),
            None => match self.pending {
                Some(name) => (name, line.trim()),
                None => return,
            },
        };
        self.pending = None;
        match result {
            "ok" => self.passed += 1,
            "FAILED" => self.failed.push(name),
            r if r.starts_with("ignored") => {}
            _ => self.pending = Some(name),
        }
    }

    /// The panic output libtest printed for `test`, backtrace frames left out.
    fn excerpt(&self, test: &str) -> String {
        let header = format!("---- {test} stdout ----");
        let Some(at) = self.lines.iter().position(|l| *l == header) else {
            return String::new();
        };
        let frame = |l: &str| {
            let l = l.trim_start();
            l.split_once(": ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
                || l.starts_with("at ")
                || l.eq_ignore_ascii_case("stack backtrace:")
                || l.starts_with("note: Some details are omitted")
        };
        let body: Vec<&str> = self.lines[at + 1..]
            .iter()
            .take_while(|l| !l.starts_with("---- ") && **l != "failures:")
            .filter(|l| !frame(l))
            .copied()
            .collect();
        tail(&body, 40)
    }
}

/// The last `n` non-blank-ended lines of `lines`.
fn tail(lines: &[&str], n: usize) -> String {
    let end = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .map_or(0, |e| e + 1);
    let start = lines[..end]
        .iter()
        .position(|l| !l.trim().is_empty())
        .unwrap_or(0)
        .max(end.saturating_sub(n));
    lines[start..end].join("\n")
}

pub fn parse(target: &str, mode: &str, console: &str, finished: bool) -> Outcome {
    let mut o = Outcome {
        target: target.into(),
        mode: mode.into(),
        release: None,
        tiers: BTreeMap::new(),
        passed: 0,
        failed: Vec::new(),
        problem: None,
        seconds: 0.0,
    };
    let (mut bin, mut done) = (None::<Binary>, false);
    for line in console.lines() {
        // Markers may follow what the firmware printed without a newline.
        let Some(rest) = line.find(MARK).map(|i| line[i + MARK.len()..].trim()) else {
            if let Some(b) = &mut bin {
                b.line(line);
            }
            continue;
        };
        let (what, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match what {
            "probes" => match serde_json::from_str::<Value>(rest) {
                Ok(v) => {
                    o.release = v["kernel"].as_str().map(str::to_string);
                    for p in v["probes"].as_array().into_iter().flatten() {
                        let tier = p["tier"].as_str().unwrap_or("unavailable");
                        o.tiers
                            .insert(p["probe"].as_str().unwrap_or("?").into(), tier.into());
                    }
                }
                Err(_) => o.problem = Some(format!("`qtrace probes` failed: {rest}")),
            },
            "begin" => {
                bin = Some(Binary {
                    name: rest,
                    ..Default::default()
                })
            }
            "end" => {
                let Some(b) = bin.take() else { continue };
                let exit = rest.rsplit("exit=").next().unwrap_or("?");
                o.passed += b.summary.unwrap_or(b.passed);
                let mut failed = b.failed.clone();
                // Names libtest lists under the last `failures:` (lines it may have split).
                if b.summary.is_some() {
                    let list = b
                        .lines
                        .iter()
                        .rposition(|l| *l == "failures:")
                        .map_or(&[][..], |i| &b.lines[i + 1..]);
                    for name in list.iter().filter_map(|l| l.strip_prefix("    ")) {
                        if !name.contains(' ') && !failed.contains(&name) {
                            failed.push(name);
                        }
                    }
                }
                for t in &failed {
                    o.failed.push((format!("{}::{t}", b.name), b.excerpt(t)));
                }
                // Killed (timeout) or crashed: no summary, or no failure to blame.
                if exit != "0" && (failed.is_empty() || b.summary.is_none()) {
                    let during = b
                        .pending
                        .map(|t| format!(", during {t}"))
                        .unwrap_or_default();
                    o.failed.push((
                        format!("{} (exit {exit}{during})", b.name),
                        tail(&b.lines, 25),
                    ));
                }
            }
            "module" => o.problem = Some(format!("module {rest}")),
            "done" => done = true,
            _ => {}
        }
    }
    if !done {
        let lines: Vec<&str> = console.lines().collect();
        let why = if finished {
            "the guest stopped before the tests ended"
        } else {
            "timed out (VM killed)"
        };
        o.problem = Some(why.into());
        o.failed.push((format!("({why})"), tail(&lines, 30)));
    } else if o.release.is_none() && o.problem.is_none() {
        o.problem = Some("no probe report".into());
    }
    o
}

pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = format!("{:<8} {:<28} {:<10}", "TARGET", "KERNEL", "ATTACH");
    for p in PROBES {
        let _ = write!(s, " {p:<11}");
    }
    s += " PASSED FAILED  TIME\n";
    for o in outcomes {
        let _ = write!(
            s,
            "{:<8} {:<28} {:<10}",
            o.target,
            o.release.as_deref().unwrap_or("?"),
            o.mode
        );
        for p in PROBES {
            let _ = write!(s, " {:<11}", o.tiers.get(p).map_or("?", String::as_str));
        }
        let _ = write!(
            s,
            " {:>6} {:>6} {:>4.0}s",
            o.passed,
            o.failed.len(),
            o.seconds
        );
        if let Some(problem) = &o.problem {
            let _ = write!(s, "  {problem}");
        }
        s.push('\n');
    }
    for o in outcomes {
        for (name, excerpt) in &o.failed {
            let kernel = o.release.as_deref().unwrap_or(&o.target);
            let _ = writeln!(s, "\nFAILED [{kernel}, {}] {name}", o.mode);
            for l in excerpt.lines() {
                let _ = writeln!(s, "    {l}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_tiers_results_panics_and_killed_binaries() {
        let console = r#"Booting from ROM..@@vm-test probes {"kernel":"6.1.0-56-cloud-amd64","probes":[{"probe":"syn","tier":"fentry"},{"probe":"accept","tier":null}]}
@@vm-test begin queues

running 3 tests
test a ... ok
test b ... output of a child
FAILED
test c ... ignored

failures:

---- b stdout ----

thread 'b' (7) panicked at qtrace/tests/queues.rs:1:1:
boom
stack backtrace:
   0: __rustc::rust_begin_unwind
note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.


failures:
    b

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.00s

@@vm-test end queues exit=101
@@vm-test begin detach
test d ... 
@@vm-test end detach exit=137
@@vm-test done
"#;
        let o = super::parse("6.1", "best", console, true);
        assert_eq!(o.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(
            (o.tiers["syn"].as_str(), o.tiers["accept"].as_str()),
            ("fentry", "unavailable")
        );
        assert_eq!(o.passed, 1);
        let names: Vec<&str> = o.failed.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["queues::b", "detach (exit 137, during d)"]);
        assert_eq!(
            o.failed[0].1,
            "thread 'b' (7) panicked at qtrace/tests/queues.rs:1:1:\nboom"
        );
        assert!(!o.ok() && o.problem.is_none());
    }
}
