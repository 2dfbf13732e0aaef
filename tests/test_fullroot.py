"""A data root that fills up (issue 17): a quota or a full NFS export, met
while jobs run.  The data root here is on a small tmpfs that every node
sees (Cluster.small, mounted before the nodes start)."""
import glob
import json
import os
import threading
import time

import pytest

from dqtest import ALICE, configure, job, log_of, queued_for_a_pass, script, submit, \
    wait_state, wait_until

FAST = dict(timeout=2, lost_after=4, watch_interval=1, poll_interval=0.5, kill_grace=1)


def json_files_valid(root):
    bad = []
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if not os.path.isfile(path) or os.path.basename(path) == "log":
            continue
        if path.endswith(".json") or "/state/" in path or "/jobs/active/" in path or \
                "/jobs/done/" in path or "/jobs/lost/" in path:
            if os.path.basename(path).endswith(".lock") or "wake-" in path or \
                    os.path.getsize(path) == 0 and "/jobs/active/" not in path:
                continue
            try:
                with open(path) as f:
                    if path.endswith(".history"):     # JSON lines, each whole
                        for line in f:
                            json.loads(line)
                    else:
                        json.load(f)
            except ValueError as e:
                bad.append((path, str(e)))
    return bad


def test_full_data_root_loses_no_end_no_id_and_carries_on(cluster, small_dq):
    dq = small_dq
    configure(dq, ["node1", "node2"], **FAST)
    d, cpu = script(cluster, ALICE, "cpu.sh",
                    "echo before\nsleep 3\nhead -c 100000 /dev/zero | tr '\\0' x\necho\n"
                    "echo after\nsleep 1\n", subdir="full")
    _, gpu = script(cluster, ALICE, "gpu.sh", "sleep 4\necho gpu done\n", subdir="full")
    _, long = script(cluster, ALICE, "long.sh", "sleep 300\n", subdir="full")
    a, _ = submit(dq, "node3", ALICE, cpu, env={"DQ_GPUS": "0"})
    b, _ = submit(dq, "node3", ALICE, gpu)
    c, _ = submit(dq, "node3", ALICE, long)
    for i in (a, b, c):
        wait_state(dq, i, "running", timeout=20)
    wait_until(lambda: "before" in log_of(dq, a), 10, what="the CPU job's first line")
    ids_before = sorted(os.listdir(os.path.join(dq.root, "jobs", "backend")))
    cluster.fill_small()
    full_at = time.time()
    try:
        # submit: one line naming the full data root, nothing queued
        r = dq.run("node3", ALICE, "submit", gpu, cwd=d)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "full" in lines[0] and dq.root in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert sorted(os.listdir(os.path.join(dq.root, "jobs", "backend"))) == ids_before
        # the listings keep working
        r = dq.run("node3", ALICE, "jobs")
        assert r.returncode == 0, r.stderr
        # a kill that cannot record its end says so, in one line
        r = dq.run("node3", ALICE, "kill", c)
        if r.returncode != 0:
            assert "full" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        # both jobs end while the disk is full: no pass calls them lost
        while time.time() - full_at < 8:
            for i in (a, b):
                assert job(dq, i)["state"] in ("running", "done"), job(dq, i)
            time.sleep(0.5)
        assert job(dq, a)["state"] == "running"     # still trying to record its end
    finally:
        cluster.free_small()
    ja = wait_state(dq, a, ("done", "failed", "lost"), timeout=30)
    jb = wait_state(dq, b, ("done", "failed", "lost"), timeout=30)
    assert (ja["state"], ja["exit_code"]) == ("done", 0), ja
    assert (jb["state"], jb["exit_code"]) == ("done", 0), jb
    # The end as it happened: before the disk had room again
    assert ja["ended"] < time.time() and ja["ended"] - ja["started"] < 8
    log = log_of(dq, a)
    assert "before" in log
    assert "bytes of output lost: no space on device" in log, log[-300:]
    # the GPUs were handed over, the queue carries on by itself
    e, r = submit(dq, "node3", ALICE, gpu)
    wait_state(dq, e, "done", timeout=30)
    dq.run("node3", ALICE, "kill", c)
    wait_state(dq, c, "killed", timeout=20)
    assert json_files_valid(dq.root) == []
    ids_after = sorted(os.listdir(os.path.join(dq.root, "jobs", "backend")))
    assert len(set(ids_after)) == len(ids_after) and set(ids_before) <= set(ids_after)
    numbers = [int(i.split("-")[0]) for i in ids_after]
    assert len(numbers) == len(set(numbers))


@pytest.mark.parametrize("point", ["submit", "pass", "handover", "kill"])
def test_every_write_with_the_disk_full_leaves_valid_files(cluster, small_dq, point):
    """Each kind of write tried with the disk full: it fails in one line (or
    waits), every state file stays valid, and once there is room the
    queue carries on by itself."""
    dq = small_dq
    configure(dq, ["node1"], **FAST)
    cluster.set_gpus("node1", 1)
    d, short = script(cluster, ALICE, "s.sh", "sleep 2\n", subdir=f"full-{point}")
    _, long = script(cluster, ALICE, "l.sh", "sleep 300\n", subdir=f"full-{point}")
    first, _ = submit(dq, "node3", ALICE, short if point == "handover" else long)
    wait_state(dq, first, "running", timeout=20)
    queued, _ = submit(dq, "node3", ALICE, short)
    cluster.fill_small()
    try:
        if point == "submit":
            r = dq.run("node3", ALICE, "submit", short, cwd=d)
            assert r.returncode != 0 and "full" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        elif point == "pass":
            time.sleep(3)       # the owner's loop passes meanwhile, and fails to write
            assert job(dq, queued)["state"] == "queued"
        elif point == "kill":
            r = dq.run("node3", ALICE, "kill", first)
            if r.returncode != 0:
                assert "full" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
                    r.stderr
        else:
            time.sleep(4)       # the first job ended: its end and hand-over wait for room
            assert job(dq, first)["state"] == "running"
        assert "Traceback" not in (r.stderr if point in ("submit", "kill") else "")
        assert json_files_valid(dq.root) == []
    finally:
        cluster.free_small()
    if point != "handover":
        dq.run("node3", ALICE, "kill", first)
    assert wait_state(dq, first, ("done", "killed"), timeout=30)["state"] == \
        ("done" if point == "handover" else "killed")
    assert wait_state(dq, queued, ("done", "failed", "lost"), timeout=40)["state"] == "done"
    assert json_files_valid(dq.root) == []


def test_a_launch_that_meets_a_full_disk_waits_for_room(cluster, small_dq):
    """The disk fills between the pass that launched a job and its wrapper's
    first write (run.json): the wrapper says so in one line and waits, its
    session living on, and starts the job once there is room -- never
    counted lost, never run twice."""
    dq = small_dq
    configure(dq, ["node1"], **FAST)
    cluster.set_gpus("node1", 1)
    d, path = script(cluster, ALICE, "once.sh", 'echo ran >> "runs-$DQ_JOB_ID"\n',
                     subdir="full-launch")
    a = queued_for_a_pass(dq, path)
    # her pass claims the job and dies before its ssh launch: a launch in flight
    r = dq.run("node3", ALICE, "schedule", "--once", env={"DQ_CRASH_AT": "launch-claimed"})
    assert r.returncode in (-9, 137), (r.returncode, r.stderr)
    with open(os.path.join(dq.root, "state", "placements.json")) as f:
        assert json.load(f)["jobs"][a]["state"] == "launching"
    run_json = os.path.join(dq.root, "jobs", "backend", a, "run.json")
    cluster.fill_small()
    out = {}
    # ... and the launch's ssh arrives now: what screen runs on node1
    wrapper = threading.Thread(target=lambda: out.update(r=cluster.run(
        "node1", ALICE, ["python3", os.path.join(dq.root, "dq.py"), "_run", a, "node1", "0",
                         "-"], timeout=60)))
    wrapper.start()
    try:
        time.sleep(3)       # passes come and go meanwhile
        assert wrapper.is_alive() and not os.path.exists(run_json)
        assert job(dq, a)["state"] != "lost"
    finally:
        cluster.free_small()
    wrapper.join(60)
    r = out["r"]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"dq: cannot start {a} yet (") and "full" in lines[0] and \
        lines[0].endswith("trying again until there is room"), lines
    assert wait_state(dq, a, ("done", "failed", "lost"), timeout=30)["state"] == "done"
    with open(os.path.join(d, f"runs-{a}")) as f:
        assert f.read() == "ran\n"
    assert json_files_valid(dq.root) == []
