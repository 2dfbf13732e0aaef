"""Cluster views end to end: dq-users and dq-on-all."""
import json
import re
import time

from dqtest import ALICE, BOB, configure, script, submit, wait_until


def test_users_lists_hand_started_and_dq_processes(cluster, dq):
    configure(dq, ["node1", "node2"])
    pid = cluster.hold_gpu("node1", BOB, 2, memory_mb=1234)
    _, path = script(cluster, ALICE, "g.sh", "exec fake-cuda --hold 30 --mem 777\n")
    job_id, r = submit(dq, "node3", ALICE, path)
    host, gpu = re.search(r"on (node[12])/([0-9])", r.stdout).groups()
    wait_until(lambda: any(p[2] == ALICE for p in cluster.gpu_processes(host)), 10)
    r = dq.run("node4", ALICE, "users")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["Host", "GPU", "Mem", "Booked", "User", "Process", "PID",
                                "Status", "Job"]
    assert re.search(rf"^node1:\s+2\s+1234-MB\s+-\s+{BOB}\s+fake-cuda\s+{pid}\s+S\s+"
                     rf"\(sleeping\)\s*$", r.stdout, re.M), r.stdout
    assert re.search(rf"^{host}:\s+{gpu}\s+777-MB\s+-\s+{ALICE}\s+fake-cuda\s+\d+\s+S\s+"
                     rf"\(sleeping\)\s+{job_id}$", r.stdout, re.M), r.stdout
    data = json.loads(dq.run("node4", ALICE, "users", "--json").stdout)
    assert {(d["host"], d["gpu"], d["user"], d["job"]) for d in data} == \
        {("node1", 2, BOB, None), (host, int(gpu), ALICE, job_id)}


def test_on_all_prefixes_lines_and_passes_arguments(cluster, dq):
    r = dq.run("node1", ALICE, "on-all", "date", "+%Y-%m-%d")
    assert r.returncode == 0, r.stderr
    today = time.strftime("%Y-%m-%d")
    assert sorted(r.stdout.splitlines()) == sorted(f"{h}: {today}" for h in cluster.hosts)
    r = dq.run("node1", ALICE, "on-all", "printf", "%s|", "a b", "$(hostname)", "it's")
    assert sorted(r.stdout.splitlines()) == \
        sorted(f"{h}: a b|$(hostname)|it's|" for h in cluster.hosts)
    r = dq.run("node1", ALICE, "on-all", 'echo "$(hostname) x"; seq 3 | wc -l')
    assert sorted(r.stdout.splitlines()) == sorted(
        [f"{h}: {h} x" for h in cluster.hosts] + [f"{h}: 3" for h in cluster.hosts])


def test_on_all_reports_failures_and_hung_hosts(cluster, dq):
    configure(dq, cluster.hosts, timeout=3)
    cluster.stop_sshd("node3")
    try:
        t0 = time.monotonic()
        r = dq.run("node1", ALICE, "on-all", "hostname", timeout=30)
        took = time.monotonic() - t0
    finally:
        cluster.cont_sshd("node3")
    assert took < 3 + 3, took
    assert r.returncode != 0
    assert sorted(r.stdout.splitlines()) == ["node1: node1", "node2: node2", "node4: node4"]
    assert "node3 (no answer within 3s)" in r.stderr
    r = dq.run("node1", ALICE, "on-all", "test $(hostname) != node2")
    assert r.returncode != 0 and "node2 (exit 1)" in r.stderr
    r = dq.run("node1", ALICE, "on-all")
    assert r.returncode != 0 and "no command" in r.stderr


def test_users_and_free_skip_a_hung_host(cluster, dq):
    configure(dq, cluster.hosts, timeout=3)
    cluster.hold_gpu("node1", BOB, 0)
    cluster.stop_sshd("node2")
    try:
        t0 = time.monotonic()
        r = dq.run("node1", ALICE, "users", timeout=30)
        took = time.monotonic() - t0
        f = dq.run("node1", ALICE, "free", timeout=30)
    finally:
        cluster.cont_sshd("node2")
    assert took < 6 and r.returncode == 0
    assert re.search(rf"^node1:\s+0\s+\S+\s+-\s+{BOB}\s+fake-cuda", r.stdout, re.M)
    assert "node2: unreachable" in r.stderr
    assert "node2" not in f.stdout and "node2: unreachable" in f.stderr
    assert f.stdout.startswith("node1: 3 2 1; shared: 0 (77.4G free)\n")
