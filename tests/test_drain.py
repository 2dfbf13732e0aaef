"""dq-drain (issue 11): an admin takes hosts out of the pool -- running jobs
finish, no new job is placed there -- and nobody else can, not even by
writing dq's shared files."""
import json
import os

from dqtest import ALICE, BOB, configure, job, jobs, script, submit, wait_state, wait_until


def two_hosts(cluster, dq):
    """node1 and node2, one GPU each; alice is an admin, bob is not."""
    configure(dq, ["node1", "node2"], admins=ALICE, poll_interval=0.5)
    cluster.set_gpus("node1", 1)
    cluster.set_gpus("node2", 1)


def drained_hosts(dq, user=BOB):
    r = dq.run("node1", user, "drain", "--json")
    assert r.returncode == 0, r.stderr
    return [(d["host"], d["by"], d["reason"]) for d in json.loads(r.stdout)]


def free_gpus(dq, host):
    """The host's GPUs dq-free lists as unused (drained or not)."""
    free = {f["host"]: f for f in json.loads(dq.run("node2", BOB, "free", "--json").stdout)}
    return [g["index"] for g in free[host]["free_gpus"]]


def queue_reasons(dq):
    return {j["id"]: j["reason"] for j in jobs(dq, view="queue")}


def test_only_admins_may_drain_or_undo(cluster, dq):
    two_hosts(cluster, dq)
    r = dq.run("node1", BOB, "drain", "node1")
    assert r.returncode == 1 and "only admins may drain" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert drained_hosts(dq) == []
    assert dq.run("node2", ALICE, "drain", "node1").returncode == 0
    r = dq.run("node1", BOB, "drain", "--undo", "node1")
    assert r.returncode == 1 and "only admins" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert drained_hosts(dq) == [("node1", ALICE, "")]


def test_a_drain_file_written_by_a_non_admin_is_ignored(cluster, dq):
    # bob writes a drain of node2 into dq's shared drain directory, under
    # his own name and under an admin's: neither counts, and jobs still go
    # to node2
    two_hosts(cluster, dq)
    forged = json.dumps({"format": 1, "hosts": {"node2": {"drained": True, "since": 2e9,
                                                          "reason": "forged"}}})
    for name in (BOB, ALICE):
        cluster.run("node1", BOB, ["sh", "-c", f"echo '{forged}' > {dq.root}/drain/{name}"],
                    check=True)
    r = dq.run("node1", ALICE, "drain")
    assert r.stdout == "No host is drained\n", r.stdout
    assert "ignoring" in r.stderr and "not an admin" in r.stderr, r.stderr
    assert drained_hosts(dq) == []
    _, path = script(cluster, ALICE, "s.sh", "true\n")
    on2, _ = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node2"})
    assert wait_state(dq, on2, "done", timeout=20)["host"] == "node2"


def test_an_admins_drain_and_its_reason_are_shown_to_everybody(cluster, dq):
    two_hosts(cluster, dq)
    r = dq.run("node2", ALICE, "drain", "node1", "-r", "new disk")
    assert (r.returncode, r.stdout) == (0, "Drained node1 (new disk)\n"), r.stderr
    assert drained_hosts(dq, BOB) == [("node1", ALICE, "new disk")]
    rows = dq.run("node1", BOB, "drain").stdout.splitlines()[2:]     # under the headings
    assert len(rows) == 1 and rows[0].split()[0] == "node1" and rows[0].split()[3] == ALICE \
        and rows[0].endswith(" new disk"), rows
    r = dq.run("node2", BOB, "free")
    assert r.stdout.splitlines() == ["node1: drained (new disk)", "node2: 0"], r.stdout
    free = {f["host"]: f for f in json.loads(dq.run("node2", BOB, "free", "--json").stdout)}
    assert free["node1"]["drained"]["by"] == ALICE and free["node2"]["drained"] is None
    # drained is not busy: its GPU is listed as unused
    assert free["node1"]["free_gpus"] == [{"index": 0, "name": "NVIDIA A100-SXM4-80GB",
                                          "memory_total_mib": 81920, "free_mem_mib": 80281}]


def test_no_new_job_is_placed_on_a_drained_host(cluster, dq):
    # node1's GPU is free but drained: alice's job that may only use node1
    # waits (reason 'drained'); her later job, free to go anywhere, is
    # placed on node2 by a pass that took hers in order and passed over it
    two_hosts(cluster, dq)
    assert dq.run("node2", ALICE, "drain", "node1").returncode == 0
    _, path = script(cluster, ALICE, "s.sh", "sleep 0.5\n")
    waiting, r = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node1"})
    assert "Executing" not in r.stdout, r.stdout
    other, _ = submit(dq, "node1", ALICE, path)
    assert wait_state(dq, other, "done", timeout=20)["host"] == "node2"
    assert job(dq, waiting)["state"] == "queued" and job(dq, waiting)["host"] is None
    assert queue_reasons(dq) == {waiting: "drained"}
    assert free_gpus(dq, "node1") == [0]


def test_a_job_running_on_a_drained_host_finishes_and_its_gpu_is_not_reused(cluster, dq):
    two_hosts(cluster, dq)
    _, long = script(cluster, ALICE, "long.sh", "sleep 3\n")
    _, short = script(cluster, ALICE, "short.sh", "sleep 0.5\n")
    running, r = submit(dq, "node1", ALICE, long, env={"DQ_HOSTS": "node1"})
    assert "Executing" in r.stdout, r.stderr
    assert dq.run("node2", ALICE, "drain", "node1").returncode == 0
    waiting, _ = submit(dq, "node1", ALICE, short, env={"DQ_HOSTS": "node1"})
    # it finishes as it would have, on node1
    j = wait_state(dq, running, ("done", "failed", "killed", "lost"), timeout=20)
    assert (j["state"], j["exit_code"], j["host"]) == ("done", 0, "node1"), j
    # its end freed the GPU (the pass at its end has decided), or gave it out
    wait_until(lambda: free_gpus(dq, "node1") == [0] or job(dq, waiting)["host"],
               timeout=20, what="node1's GPU freed or given out")
    jw = job(dq, waiting)
    assert jw["state"] == "queued" and jw["host"] is None, jw
    assert queue_reasons(dq) == {waiting: "drained"}
    assert free_gpus(dq, "node1") == [0]


def test_undrain_lets_the_waiting_job_start(cluster, dq):
    two_hosts(cluster, dq)
    assert dq.run("node2", ALICE, "drain", "node1", "-r", "new disk").returncode == 0
    _, path = script(cluster, ALICE, "s.sh", "true\n")
    waiting, _ = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node1"})
    assert queue_reasons(dq) == {waiting: "drained"}
    r = dq.run("node2", ALICE, "drain", "--undo", "node1")
    assert (r.returncode, r.stdout) == (0, "Undrained node1\n"), r.stderr
    # (her loop finds it at its next pass: within watch_interval, 10 s)
    assert wait_state(dq, waiting, "done", timeout=30)["host"] == "node1"
    assert dq.run("node1", ALICE, "drain").stdout == "No host is drained\n"
    assert drained_hosts(dq) == []


def test_the_owner_of_dq_conf_is_an_admin_unless_others_may_replace_it(cluster, dq):
    # dq.conf belongs to root here (the test installs it), who is thus an
    # admin with no 'admins' line; bob is not
    configure(dq, ["node1"])
    r = dq.run("node1", BOB, "drain", "node1")
    assert r.returncode == 1 and "only admins" in r.stderr
    configure(dq, ["node1"], admins=f"{ALICE} {BOB}")
    conf = os.path.join(dq.root, "dq.conf")
    os.chmod(dq.root, 0o777)        # anyone could replace dq.conf: nobody is trusted
    try:
        r = dq.run("node1", ALICE, "drain", "node1")
        assert r.returncode == 1 and "writable by others" in r.stderr \
            and f"chmod go-w {dq.root}" in r.stderr, r.stderr
    finally:
        os.chmod(dq.root, 0o755)
    os.chmod(conf, 0o666)           # anyone could add themselves to 'admins'
    try:
        r = dq.run("node1", ALICE, "drain", "node1")
        assert r.returncode == 1 and "'admins' in" in r.stderr and "ignored" in r.stderr
    finally:
        os.chmod(conf, 0o644)
    r = dq.run("node1", ALICE, "drain", "nosuchhost")
    assert r.returncode == 1 and "not a host of this cluster" in r.stderr
    r = dq.run("node1", BOB, "drain", "node1")
    assert (r.returncode, r.stdout) == (0, "Drained node1\n"), r.stderr
