"""dq-drain (issue 11): an admin takes hosts out of the pool -- running jobs
finish, no new job is placed there -- and nobody else can, not even by
writing dq's shared files."""
import json
import os
import time

from dqtest import ALICE, BOB, configure, job, jobs, script, submit, wait_state


def test_drain_by_an_admin_and_its_refusal_for_others(cluster, dq):
    configure(dq, ["node1", "node2"], admins=ALICE, poll_interval=0.5)
    cluster.set_gpus("node1", 1)
    cluster.set_gpus("node2", 1)
    _, long = script(cluster, ALICE, "long.sh", "sleep 4\n")
    _, short = script(cluster, ALICE, "short.sh", "sleep 0.5\n")
    running, r = submit(dq, "node1", ALICE, long, env={"DQ_HOSTS": "node1"})
    assert "Executing" in r.stdout, r.stderr

    # bob is no admin: refused, and a drain file he writes is ignored,
    # under his own name or an admin's
    r = dq.run("node1", BOB, "drain", "node1")
    assert r.returncode == 1 and "only admins may drain" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    forged = json.dumps({"format": 1, "hosts": {"node2": {"drained": True, "since": 2e9,
                                                          "reason": "forged"}}})
    for name in (BOB, ALICE):
        cluster.run("node1", BOB, ["sh", "-c", f"echo '{forged}' > {dq.root}/drain/{name}"],
                    check=True)
    r = dq.run("node1", ALICE, "drain")
    assert r.stdout == "No host is drained\n", r.stdout
    assert "ignoring" in r.stderr and "not an admin" in r.stderr
    cluster.run("node1", BOB, ["rm", f"{dq.root}/drain/{ALICE}", f"{dq.root}/drain/{BOB}"],
                check=True)

    r = dq.run("node2", ALICE, "drain", "node1", "-r", "new disk")
    assert (r.returncode, r.stdout) == (0, "Drained node1 (new disk)\n"), r.stderr
    listed = json.loads(dq.run("node1", BOB, "drain", "--json").stdout)
    assert [(d["host"], d["by"], d["reason"]) for d in listed] == [("node1", ALICE, "new disk")]
    r = dq.run("node1", BOB, "drain", "--undo", "node1")
    assert r.returncode == 1 and "only admins" in r.stderr

    # the running job finishes; nothing new starts on node1
    waiting, _ = submit(dq, "node1", ALICE, short, env={"DQ_HOSTS": "node1"})
    other, _ = submit(dq, "node1", ALICE, short)
    assert wait_state(dq, other, "done")["host"] == "node2"
    reasons = {j["id"]: j["reason"] for j in jobs(dq, view="queue")}
    assert reasons == {waiting: "drained"}
    assert wait_state(dq, running, "done", timeout=20)["host"] == "node1"
    r = dq.run("node2", BOB, "free")
    assert "node1: drained (new disk)" in r.stdout.splitlines(), r.stdout
    free = {f["host"]: f for f in json.loads(dq.run("node2", BOB, "free", "--json").stdout)}
    assert free["node1"]["drained"]["by"] == ALICE and free["node2"]["drained"] is None
    assert free["node1"]["free_gpus"] == [{"index": 0, "name": "NVIDIA A100-SXM4-80GB",
                                          "memory_total_mib": 81920}]
    time.sleep(1.5)     # passes every 0.5 s: one would have placed it by now
    assert job(dq, waiting)["state"] == "queued"

    r = dq.run("node2", ALICE, "drain", "--undo", "node1")
    assert (r.returncode, r.stdout) == (0, "Undrained node1\n"), r.stderr
    assert wait_state(dq, waiting, "done", timeout=20)["host"] == "node1"
    assert dq.run("node1", ALICE, "drain").stdout == "No host is drained\n"


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
