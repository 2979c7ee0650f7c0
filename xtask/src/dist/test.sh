#!/bin/bash
# The dist test inside its guest (Debian trixie, systemd as PID 1), run from /dist, the second
# disk: qtrace's package installed and used as an administrator would, then its image under
# Podman. Every check prints `@@QTRACE dist ok WHAT` or `@@QTRACE dist FAIL WHAT: WHY` on the
# console; `@@QTRACE dist done` ends it (`cargo xtask dist-test` reads them).
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
D=/dist
say() { echo "@@QTRACE dist $*"; }
ok() { say "ok $*"; }
fail() { say "FAIL $*"; }
# check WHAT CMD...: CMD's success is WHAT's result; its output follows a failure.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$what"
    else
        fail "$what: $(echo "$out" | tail -5 | tr '\n' ' ')"
        return 1
    fi
}
# need WHAT CMD...: a check the rest depends on; its failure ends the test.
need() {
    check "$@" || { say "done (stopped at: $1)"; exit 1; }
}
# until_ok SECONDS CMD...: retry CMD every 2 s.
until_ok() {
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -ge $end ] && return 1
        sleep 2
    done
}
metrics() { curl -fsS "http://127.0.0.1:${1:-9860}/metrics"; }
# drops PORT [NETNS] [METRICS-PORT]: the listener's qtrace_listen_drops_total lines.
drops() { metrics "${3:-9860}" | grep '^qtrace_listen_drops_total{' | grep "port=\"$1\"" | grep "netns=\"${2:-}" ; }
nonzero() { awk '$NF > 0 { found = 1 } END { exit !found }'; }
ack_drops() { drops 8080 | grep 'reason="accept_queue_full_ack"' | nonzero; }
prom() { curl -fsS "http://127.0.0.1:9090/api/v1/$1"; }
alert() { prom alerts | jq -e --arg s "$1" '[.data.alerts[] | select(.labels.alertname == "QtraceListenDrops" and .labels.port == "8080" and .state == $s)] | length > 0' >/dev/null; }
no_bpf() { ! bpftool prog show | grep -q ' name qt_' && ! bpftool map show | grep -q ' name qt_'; }

say "begin $(uname -r), $(systemctl --version | head -1), cgroup $(stat -fc %T /sys/fs/cgroup)"

# --- The package under systemd ---------------------------------------------------------------
need "apt install ./qtrace_*.deb" apt-get install -y -q $D/qtrace_*.deb
check "installing started the service" until_ok 60 systemctl is-active -q qtrace
need "systemctl enable --now qtrace" systemctl enable --now qtrace
need "qtrace serves /metrics" until_ok 90 metrics
check "qtrace_build_info in the scrape" sh -c 'curl -fsS http://127.0.0.1:9860/metrics | grep ^qtrace_build_info'
# Workload names on cgroup v2 under a real systemd: the service's own listener is its unit's.
info() { metrics "${2:-9860}" | grep '^qtrace_listener_info{' | grep -- "$1"; }
check "the service's listener is named by its systemd unit" until_ok 30 info 'port="9860".*unit="qtrace.service"'
say "info $(info 'port="9860"')"

install -m 0644 $D/prometheus.yml /etc/prometheus/prometheus.yml
install -m 0644 $D/alerts.yml /etc/prometheus/alerts.yml
check "promtool check config (deploy/prometheus)" promtool check config /etc/prometheus/prometheus.yml
systemctl restart prometheus
need "Prometheus ready" until_ok 120 curl -fsS http://127.0.0.1:9090/-/ready
check "Prometheus scrapes qtrace" until_ok 90 sh -c "curl -fsS http://127.0.0.1:9090/api/v1/targets | jq -e '.data.activeTargets[] | select(.labels.job == \"qtrace\" and .health == \"up\")'"

# A listener with backlog 4 that never accepts, clients in their own namespace over veth whose
# packets netem delays by 300 ms: a burst of handshakes all pass the SYN check while the
# accept queue is still empty, and the final ACKs that find it full are dropped (the SYN-ACK
# retransmits bring more of them); later bursts keep its SYNs dropped, a burst every 10 s.
$D/listener 8080 4 > /dev/null &
LISTENER=$!
ip netns add qtcli
ip link add qtv0 type veth peer name qtv1 netns qtcli
ip addr add 10.213.0.1/24 dev qtv0 && ip link set qtv0 up
ip -n qtcli addr add 10.213.0.2/24 dev qtv1 && ip -n qtcli link set qtv1 up && ip -n qtcli link set lo up
check "netem delay on the clients' link" ip netns exec qtcli tc qdisc add dev qtv1 root netem delay 300ms
connect() { timeout 60 bash -c 'exec 3<>/dev/tcp/10.213.0.1/8080; sleep 60' 2>/dev/null; }
export -f connect
ip netns exec qtcli bash -c 'for i in $(seq 12); do connect & done; wait' &
(
    while :; do
        sleep 10
        ip netns exec qtcli bash -c 'for i in 1 2 3 4; do connect & done; wait' &
    done
) &
CLIENTS=$!
check "the scrape shows final-ACK drops at the listener" until_ok 90 ack_drops
say "info $(drops 8080 | tr '\n' ' ')"
check "Prometheus has them" until_ok 60 sh -c "curl -fsS 'http://127.0.0.1:9090/api/v1/query?query=qtrace_listen_drops_total%7Bport%3D%228080%22%7D' | jq -e '.data.result | length > 0'"
check "QtraceListenDrops pending" until_ok 120 alert pending
ALERT_PENDING=$SECONDS

# --- The image under Podman, while the alert's `for: 5m` runs -------------------------------
# The DaemonSet's container: its added capabilities (all others dropped), read-only root,
# the host's network and PID namespaces, its mounts; only the port differs (:9861), as the
# service above holds :9860.
check "podman load qtrace image" podman load -i $D/qtrace-oci.tar
check "podman load listener image" podman load -i $D/listener-oci.tar
CAPS=$(sed -n 's/^ *add: \[\(.*\)\]/\1/p' $D/daemonset.yaml | tr -d ' ')
say "info DaemonSet capabilities: $CAPS"
mkdir -p /run/qtrace-pod
check "podman run qtrace:0.1.0 (DaemonSet securityContext)" podman run -d --name qtrace-ds \
    --network host --pid host --read-only --user 0:0 --cap-drop ALL --cap-add "$CAPS" \
    --security-opt no-new-privileges --memory 256m \
    -v /sys/kernel/btf:/sys/kernel/btf:ro -v /sys/kernel/tracing:/sys/kernel/tracing:ro \
    -v /sys/fs/cgroup:/sys/fs/cgroup:ro -v /run/qtrace-pod:/run/qtrace \
    qtrace:0.1.0 run --web.listen-address=:9861 --events-socket=/run/qtrace/events.sock
check "the container serves /metrics" until_ok 90 metrics 9861
say "info container's probes: $(metrics 9861 | grep '^qtrace_probe_info' | tr '\n' ' ')"
podman logs qtrace-ds 2>&1 | sed 's/^/@@QTRACE dist info container: /'
check "podman run the listener beside it (own network namespace)" podman run -d --name listener \
    --network none qtrace-test-listener:latest 8080 1
LPID=$(podman inspect -f '{{.State.Pid}}' listener)
NETNS=$(stat -L -c %i /proc/$LPID/ns/net)
for i in 1 2 3 4 5 6; do
    nsenter -t "$LPID" -n timeout 20 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080; sleep 15' 2>/dev/null &
done
container_drops() { drops 8080 "$NETNS" 9861 | nonzero; }
check "the container's qtrace sees the listener's drops in the other container (netns $NETNS)" until_ok 60 container_drops
say "info $(drops 8080 "$NETNS" 9861 | tr '\n' ' ')"
# The service has no CAP_SYS_ADMIN to enter the container's namespace: the listener's owner, and
# with it the container's name (Podman's storage, cgroup v2 under libpod_parent), come from
# /proc/<pid>/net/tcp; the namespace is named after the container holding it.
LID=$(podman inspect -f '{{.Id}}' listener)
named() { info "netns=\"$NETNS\".*port=\"8080\".*container_id=\"podman://$LID\",container=\"listener\".*netns_name=\"listener\""; }
check "the service names the Podman container and its network namespace" until_ok 30 named
say "info $(info "netns=\"$NETNS\"")"
check "podman rm" podman rm -f -t 2 qtrace-ds listener

# --- Back to the service ---------------------------------------------------------------------
check "QtraceListenDrops firing (for: 5m)" until_ok $((ALERT_PENDING + 400 - SECONDS)) alert firing
say "info $(prom alerts | jq -c '.data.alerts[] | select(.labels.alertname == "QtraceListenDrops") | {state, labels, activeAt}' | tr '\n' ' ')"
check "systemctl reload qtrace" systemctl reload qtrace
check "reload logged" until_ok 20 sh -c 'journalctl -u qtrace -o cat | grep -q "reloaded the config file"'
check "still serving after reload" sh -c 'systemctl is-active -q qtrace && curl -fsS http://127.0.0.1:9860/metrics > /dev/null'
kill $CLIENTS $LISTENER 2>/dev/null
check "systemctl stop qtrace" systemctl stop qtrace
check "no qtrace BPF program or map left (bpftool)" no_bpf
for p in syn ack synack accept; do
    n=$(journalctl -u qtrace -o cat | grep -c "probe $p:")
    if [ "$n" = 1 ]; then ok "journal: one line for probe $p"; else fail "journal: $n lines for probe $p"; fi
done
journalctl -u qtrace -o cat | grep 'probe ' | sed 's/^/@@QTRACE dist info journal: /'

# --- Removal -----------------------------------------------------------------------------------
check "dpkg --remove qtrace" dpkg --remove qtrace
check "remove keeps the conffile, removes the binary" sh -c '[ -f /etc/qtrace/qtrace.toml ] && [ ! -e /usr/bin/qtrace ]'
check "dpkg --purge qtrace" dpkg --purge qtrace
left=""
for f in /usr/bin/qtrace /lib/systemd/system/qtrace.service /usr/lib/systemd/system/qtrace.service \
    /etc/qtrace /usr/lib/sysusers.d/qtrace.conf /usr/share/man/man1/qtrace.1.gz /usr/share/doc/qtrace \
    /usr/share/bash-completion/completions/qtrace /etc/systemd/system/multi-user.target.wants/qtrace.service \
    /var/lib/systemd/deb-systemd-helper-enabled/qtrace.service.dsh-also; do
    [ -e "$f" ] || [ -L "$f" ] && left="$left $f"
done
if [ -z "$left" ]; then ok "purge removed every file"; else fail "purge left$left"; fi
check "dpkg knows no qtrace" sh -c '! dpkg -s qtrace > /dev/null 2>&1'
# Policy 9.2.2: a package does not remove the system user it created.
check "the system user qtrace stays" getent passwd qtrace
say "done"
