"""Run once, lose nothing (issue 17): hosts whose sshd hangs while their
jobs run, and a shared directory that goes away under a running job.

Every job here writes a timestamped line (job ID, host, time) to a trace
file in its working directory every 0.2 s, so a test can tell, as a user
reading the files would, which copies ran where and whether two ever ran
at the same time.
"""
import json
import os
import time
import urllib.request

import pytest

import dqtest
from dqtest import ALICE, BOB, configure, jobs, queued_for_a_pass, script, submit, wait_until

# lost_after 4: a wrapper TERMs its job after 2 s without a lease renewal,
# KILLs it by 3 s; passes may count the job lost at 4 s.
LEASE = dict(timeout=2, lost_after=4, watch_interval=1, poll_interval=0.5, kill_grace=1)

TRACE = r'''
end=$(( $(date +%s) + ${DQ_T:-8} ))
while [ "$(date +%s)" -lt "$end" ]; do
    echo "$DQ_JOB_ID $(hostname) $(date +%s.%N)" >> trace
    sleep 0.2
done
'''


def read_trace(d):
    """{job_id: (set of hosts, first time, last time)} from the trace file."""
    out = {}
    path = os.path.join(d, "trace")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) != 3:
                continue        # a line torn by a kill
            job_id, host, t = fields[0], fields[1], float(fields[2])
            hosts, first, last = out.get(job_id, (set(), t, t))
            hosts.add(host)
            out[job_id] = (hosts, min(first, t), max(last, t))
    return out


def assert_never_two_at_once(trace):
    spans = sorted((first, last, job_id) for job_id, (_, first, last) in trace.items())
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        assert a1 < b0, f"{a} ({a0:.2f}-{a1:.2f}) and {b} ({b0:.2f}-{b1:.2f}) ran at once"


def web_state(port):
    """dq-web's /api/state, or {} while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def copies_of(dq, job_id):
    return [j for view in (None, "complete") for j in jobs(dq, "node3", view=view)
            if j.get("restart_of") == job_id]


# dq's commands run on node3 here: node1 or node2 may be the host cut off
def job(dq, job_id):
    return dqtest.job(dq, job_id, host="node3")


def wait_state(dq, job_id, states, timeout=30):
    return dqtest.wait_state(dq, job_id, states, timeout, host="node3")


# A GPU and a CPU-only job, each way of DQ_REQUEUE once (the two choices
# are independent: all four pairs cost the suite 24 s more and test nothing
# the two do not)
@pytest.mark.parametrize("gpus,requeue", [(1, "1"), (0, "")], ids=["gpu-requeue",
                                                                 "cpu-no-requeue"])
def test_hung_sshd_a_beating_job_runs_on_and_its_real_end_is_kept(cluster, dq, gpus, requeue):
    configure(dq, ["node1", "node2"], **LEASE)
    d, path = script(cluster, ALICE, "t.sh", TRACE, subdir=f"hung-{gpus}-{requeue or 0}")
    env = {"DQ_GPUS": str(gpus), "DQ_T": "9"}
    if requeue:
        env["DQ_REQUEUE"] = requeue
    a, _ = submit(dq, "node3", ALICE, path, env=env)
    host = wait_state(dq, a, "running", timeout=20)["host"]
    other = "node2" if host == "node1" else "node1"
    wait_until(lambda: a in read_trace(d), 10, what="the job's first line")
    port = dqtest.free_port()
    web = dq.popen("node3", ALICE, "web", "--port", port)
    cluster.stop_sshd(host)
    stopped_at = time.time()
    try:
        # Past lost_after: still running, shown as such, and no copy
        seen_note = seen_on_web = False
        while time.time() - stopped_at < 6:
            j = job(dq, a)
            assert j["state"] == "running", j
            seen_note = seen_note or "not answering" in (j.get("reason") or "")
            seen_on_web = seen_on_web or any(
                r["id"] == a and "not answering" in (r.get("reason") or "")
                for r in web_state(port).get("running", []))
            time.sleep(0.5)
        assert seen_note, "dq-jobs never said the host is not answering"
        assert seen_on_web, "dq-web never said the host is not answering"
        assert not copies_of(dq, a)
        # It ends during the outage: its real end is recorded, not 'lost'
        j = wait_state(dq, a, ("done", "failed", "lost"), timeout=15)
        assert (j["state"], j["exit_code"]) == ("done", 0), j
        assert time.time() - stopped_at < 15
    finally:
        cluster.cont_sshd(host)
        web.terminate()
        web.wait(10)
    time.sleep(3)       # the passes see the host again: still nothing re-run
    assert job(dq, a)["state"] == "done"
    assert not copies_of(dq, a)
    trace = read_trace(d)
    assert list(trace) == [a] and trace[a][0] == {host}, trace
    assert other != host


def test_no_job_goes_to_a_host_whose_last_poll_failed(cluster, dq):
    """A job ending on a silent host hands its GPU over locally; that must
    not place the next job there, where nobody can start it."""
    configure(dq, ["node1", "node2"], **LEASE)
    cluster.set_gpus("node1", 1)
    cluster.set_gpus("node2", 1)
    d, path = script(cluster, ALICE, "t.sh", TRACE, subdir="silent-handover")
    a, r = submit(dq, "node3", ALICE, path, env={"DQ_T": "6"})
    b, r = submit(dq, "node3", ALICE, path, env={"DQ_T": "30"})
    ja, jb = wait_state(dq, a, "running"), wait_state(dq, b, "running")
    assert {ja["host"], jb["host"]} == {"node1", "node2"}
    silent = ja["host"]
    c, _ = submit(dq, "node3", ALICE, path, env={"DQ_T": "2"})
    cluster.stop_sshd(silent)
    try:
        wait_state(dq, a, "done", timeout=20)      # ended on the silent host
        time.sleep(3)
        jc = job(dq, c)
        assert jc["state"] == "queued" and not jc["host"], jc
    finally:
        cluster.cont_sshd(silent)
        back = time.time()
    jc = wait_state(dq, c, ("running", "done"), timeout=20)
    assert jc["host"] == silent
    trace = read_trace(d)
    assert trace[c][1] > back - 0.5, "the job started before its host answered again"


# A CPU-only job here, a GPU job in the next test: fencing is the wrapper's
# either way, and where the copy goes is the planner's for both kinds.
@pytest.mark.parametrize("gpus", [0], ids=["cpu"])
def test_a_job_cut_off_from_the_data_root_is_stopped_before_its_copy_starts(cluster, dq,
                                                                            gpus):
    """node1 loses the shared directory (read-only in its mount namespace
    only) and, for good measure, its sshd hangs: the wrapper cannot renew
    the lease and stops its job; the requeued copy starts elsewhere, after
    the first run has stopped, never on the silent host."""
    configure(dq, ["node1", "node2"], **LEASE)
    d, path = script(cluster, ALICE, "t.sh", TRACE, subdir=f"fenced-{gpus}")
    a, _ = submit(dq, "node3", ALICE, path,
                  env={"DQ_GPUS": str(gpus), "DQ_T": "60", "DQ_REQUEUE": "1",
                       "DQ_HOSTS": "node1"})
    wait_state(dq, a, "running", timeout=20)
    wait_until(lambda: a in read_trace(d), 10, what="the job's first line")
    # The copy keeps DQ_HOSTS=node1: it must wait until node1 answers again.
    cut = time.time()
    cluster.readonly_dir("node1", dq.root)
    cluster.stop_sshd("node1")
    try:
        lost = wait_state(dq, a, "lost", timeout=30)
        assert "requeued as" in lost["reason"], lost
        copy = lost["reason"].split("requeued as ")[1].split()[0].rstrip(";)")
        # Stopped by its wrapper within the fencing time (KILL by 3 s)
        last_line = read_trace(d)[a][2]
        assert last_line - cut < 3 + 1, f"the first run went on {last_line - cut:.1f}s"
        assert time.time() - cut >= 4
        jc = job(dq, copy)
        assert jc["state"] == "queued", jc      # DQ_HOSTS=node1: it waits for node1
        time.sleep(2)
        assert job(dq, copy)["state"] == "queued"
    finally:
        cluster.cont_sshd("node1")
        cluster.writable_dir("node1", dq.root)
    jc = wait_state(dq, copy, "running", timeout=30)
    wait_until(lambda: copy in read_trace(d), 10, what="the copy's first line")
    dq.run("node3", ALICE, "kill", copy)
    trace = read_trace(d)
    assert set(trace) == {a, copy}
    assert_never_two_at_once(trace)


@pytest.mark.parametrize("gpus", [1], ids=["gpu"])
def test_a_fenced_jobs_copy_goes_to_a_host_that_answers(cluster, dq, gpus):
    configure(dq, ["node1", "node2"], **LEASE)
    cluster.set_gpus("node2", 1)
    d, path = script(cluster, ALICE, "t.sh", TRACE, subdir=f"elsewhere-{gpus}")
    a, _ = submit(dq, "node3", ALICE, path,
                  env={"DQ_GPUS": str(gpus), "DQ_T": "60", "DQ_REQUEUE": "1"})
    host = wait_state(dq, a, "running", timeout=20)["host"]
    other = "node2" if host == "node1" else "node1"
    wait_until(lambda: a in read_trace(d), 10, what="the job's first line")
    cluster.readonly_dir(host, dq.root)
    cluster.stop_sshd(host)
    try:
        lost = wait_state(dq, a, "lost", timeout=30)
        copy = lost["reason"].split("requeued as ")[1].split()[0].rstrip(";)")
        jc = wait_state(dq, copy, "running", timeout=30)
        assert jc["host"] == other, jc
        wait_until(lambda: copy in read_trace(d), 10, what="the copy's first line")
    finally:
        cluster.cont_sshd(host)
        cluster.writable_dir(host, dq.root)
    time.sleep(2)
    dq.run("node3", ALICE, "kill", copy)
    trace = read_trace(d)
    assert trace[a][0] == {host} and trace[copy][0] == {other}, trace
    assert_never_two_at_once(trace)


def test_a_launch_that_comes_through_late_does_not_start_the_job(cluster, dq):
    """The ssh of a launch to a hung host may deliver its command long after
    dq gave up on it and queued the job again: the wrapper it starts finds
    the job no longer placed there and does not run it."""
    configure(dq, ["node1"], **LEASE)
    cluster.set_gpus("node1", 1)
    d, path = script(cluster, ALICE, "t.sh", TRACE, subdir="late-launch")
    a, _ = submit(dq, "node3", ALICE, path, env={"DQ_T": "30"})
    wait_state(dq, a, "running")
    b, _ = submit(dq, "node3", ALICE, path, env={"DQ_T": "2"})     # queued: no GPU free
    # what a late launch of b on node1 GPU 0 would run in its screen session
    r = cluster.run("node1", ALICE, ["python3", os.path.join(dq.root, "dq.py"), "_run", b,
                                     "node1", "0"], timeout=30)
    assert r.returncode == 0 and "no longer placed here" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(dq.root, "jobs", "backend", b, "run.json"))
    assert job(dq, b)["state"] == "queued"
    assert b not in read_trace(d)
    dq.run("node3", ALICE, "kill", a)
    assert wait_state(dq, b, "done", timeout=30)["host"] == "node1"


def test_a_launch_long_after_its_placing_finds_the_gpu_taken_and_waits(cluster, dq):
    """Another user's pass placed alice's job; her loop launches it only
    when it comes round, and meanwhile bob took the GPU by hand.  The job's
    wrapper looks before the job starts: the job goes back to the queue,
    its log says why, and it runs once the GPU is free -- never beside the
    hand-started process."""
    configure(dq, ["node1"], **LEASE)
    cluster.set_gpus("node1", 1)
    d, path = script(cluster, ALICE, "t.sh", TRACE, subdir="taken")
    a = queued_for_a_pass(dq, path, env={"DQ_T": "2"})
    r = dq.run("node3", BOB, "schedule", "--once")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(dq.root, "state", "placements.json")) as f:
        placed = json.load(f)["jobs"][a]
    assert (placed["host"], placed["gpus"], placed["state"]) == ("node1", [0], "assigned")
    taken_at = time.time()
    second = cluster.hold_gpu("node1", BOB, 0, seconds=4)
    wait_until(lambda: time.time() > placed["polled"] + 1.5, 5, what="its poll to age")
    r = dq.run("node3", ALICE, "schedule", "--once")
    assert r.returncode == 0, r.stderr
    said = f"dq: {a}: not started on node1: GPU 0 (PID {second}), taken since dq placed it; " \
           f"back to the queue"
    wait_until(lambda: said in dqtest.log_of(dq, a), 15,
               what="the wrapper to send the job back")
    assert job(dq, a)["state"] == "queued"
    assert a not in read_trace(d)
    assert wait_state(dq, a, "done", timeout=40)["host"] == "node1"
    assert read_trace(d)[a][1] >= taken_at + 4, "the job started beside the hand process"
