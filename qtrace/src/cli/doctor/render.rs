//! Doctor's text form, rendered from the typed [`Report`] (`--json` writes the same report).

use std::net::SocketAddr;

use super::{limits::Backlog, Probes, Report};

pub fn human(r: &Report) -> String {
    let mut s = String::new();
    let k = &r.kernel;
    s += &format!(
        "kernel {}  BTF {}\n",
        k.release,
        match &k.btf_error {
            Some(why) => format!("NO: {why}"),
            None => "yes".into(),
        }
    );
    s += &format!(
        "SYN queue full rule: {}\n",
        k.synq_full_rule
            .map_or("not measured (needs root)", |r| r.name())
    );
    match &r.probes {
        Probes::Attached(ps) => {
            for p in ps {
                let tier = p.tier.map_or("unavailable".to_string(), |t| t.to_string());
                s += &format!("probe {:<7} {tier}", p.probe);
                if p.tier.is_none() {
                    s += &format!("  ({})", p.fallbacks.join("; "));
                }
                s.push('\n');
            }
        }
        Probes::Failed { error } => s += &format!("probes: cannot attach: {error}\n"),
    }
    for n in &r.namespaces {
        s += &format!("\nnetns {}\n", n.netns);
        for (k, v) in &n.sysctls {
            s += &format!("  {:<32} {v}\n", k.replace('/', "."));
        }
    }
    s += "\nLISTENER                                  ACCEPT Q (len/limit, backlog)     SYN Q (len/limit)\n";
    for l in &r.listeners {
        let at = SocketAddr::new(l.addr, l.port);
        let owner = l.owner.as_ref().map_or(String::new(), |o| format!(" {o}"));
        let a = &l.accept_queue;
        let backlog = match a.backlog {
            Backlog::Exactly(n) => format!("backlog {n}"),
            Backlog::AtLeast(n) => format!("backlog >= {n}, capped by somaxconn"),
        };
        let q = &l.syn_queue;
        let syn_limit = q.limit.map_or("cookies".into(), |v| v.to_string());
        s += &format!(
            "{:<41} {:>5}/{:<5} {backlog:<24} {}/{}\n",
            format!("{at}{owner}"),
            a.len,
            a.limit,
            q.len,
            syn_limit
        );
    }
    if let Some(c) = &r.clients {
        s += &client_side(c);
    }
    if !r.advice.is_empty() {
        s += "\nADVICE\n";
        // Grouped by workload, in the order each first needs advice: what one team owns
        // reads as one block.
        let mut order: Vec<&str> = Vec::new();
        for a in &r.advice {
            if !order.contains(&a.workload.as_str()) {
                order.push(&a.workload);
            }
        }
        for w in order {
            let title = if w.is_empty() { "(owner unknown)" } else { w };
            s += &format!("{title}\n");
            for a in r.advice.iter().filter(|a| a.workload == w) {
                s += &format!("  - {}: {}\n", a.listener, a.advice);
            }
        }
    }
    s
}

/// Each namespace's connections, and its destinations closest to port exhaustion.
fn client_side(c: &crate::api::ClientSide) -> String {
    let n_a = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
    let mut s =
        "\nCLIENT SIDE (netns: TIME_WAIT/limit, CLOSE_WAIT, local ports usable)\n".to_string();
    for n in &c.census {
        s += &format!(
            "netns {}: {}/{}, {}, {}\n",
            n.netns,
            n.time_wait,
            n_a(n.time_wait_limit),
            n.close_wait,
            n_a(n.ports_available)
        );
        for u in n.ephemeral.iter().take(3) {
            let dest = SocketAddr::new(u.addr, u.port);
            s += &format!("  {} -> {dest}: {} ports in use\n", u.saddr, u.in_use);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_is_grouped_by_workload_in_order_of_first_need() {
        let advice = |listener: &str, workload: &str| serde_json::json!({ "listener": listener, "advice": "raise the backlog", "workload": workload });
        let report: Report = serde_json::from_value(serde_json::json!({
            "kernel": { "release": "6.12", "btf": true, "btf_file": "/sys/kernel/btf/vmlinux",
                        "btf_error": null, "synq_full_rule": null },
            "probes": [], "daemon": true, "namespaces": [], "namespaces_unreadable": 0,
            "listeners": [],
            "advice": [
                advice("api[7] on 0.0.0.0:8080", "shop/checkout-7d9f/api"),
                advice("nginx[9] on 0.0.0.0:80", "nginx.service"),
                advice("api[7] on 0.0.0.0:8443", "shop/checkout-7d9f/api"),
                advice("[::]:22", ""),
            ],
        }))
        .unwrap();
        let text = human(&report);
        let advice = &text[text.find("ADVICE\n").unwrap()..];
        assert_eq!(
            advice,
            "ADVICE\nshop/checkout-7d9f/api\n  - api[7] on 0.0.0.0:8080: raise the backlog\n  \
             - api[7] on 0.0.0.0:8443: raise the backlog\nnginx.service\n  - nginx[9] on \
             0.0.0.0:80: raise the backlog\n(owner unknown)\n  - [::]:22: raise the backlog\n"
        );
    }
}
