"""Fault tolerance end to end: dead and hung hosts, dq processes killed at
any point, stuck locks, corrupt files, jobs that fail on their own."""
import json
import os
import shutil
import time

from dqtest import ALICE, BOB, configure, job, jobs, log_of, script, submit, wait_state, \
    wait_until

FAST = dict(timeout=2, lost_after=3, watch_interval=1, poll_interval=0.5)


def test_dead_host_jobs_are_lost_requeued_once_and_never_run_twice(cluster, dq):
    configure(dq, ["node1", "node2"], **FAST)
    cluster.set_gpus("node1", 1)
    cluster.set_gpus("node2", 1)
    d, first = script(cluster, ALICE, "a.sh", "sleep 6\n")
    _, long = script(cluster, ALICE, "b.sh", 'echo "run $DQ_JOB_ID on $(hostname)" >> runs\n'
                     "sleep 100\n")
    _, quick = script(cluster, ALICE, "c.sh", "echo quick\n")
    a, r = submit(dq, "node3", ALICE, first)
    assert "node1/0" in r.stdout
    b, r = submit(dq, "node3", ALICE, long, env={"DQ_REQUEUE": "1"})
    assert "node2/0" in r.stdout
    c, r = submit(dq, "node3", ALICE, quick)
    assert "Executing" not in r.stdout
    wait_until(lambda: os.path.exists(os.path.join(d, "runs")), 10)
    killed_at = time.time()
    cluster.kill_node("node2")
    # lost, then (its lease expired) its end recorded and its copy queued
    try:
        jb = wait_until(lambda: (lambda j: j if j["state"] == "lost" and "requeued as" in
                                 (j["reason"] or "") else None)(job(dq, b)), 60, 0.2,
                        f"{b} to be lost and requeued")
    except AssertionError as e:
        raise AssertionError(f"{e}; it is {job(dq, b)}") from None
    assert time.time() - killed_at < 60
    assert "node2" in jb["reason"] and "requeued as" in jb["reason"]
    requeued = jb["reason"].split("requeued as ")[1].split()[0]
    assert jb["requeued_as"] == requeued
    # one copy of b, with b as its restart_of
    assert copies_of(dq, b) == [requeued]
    # the queue goes on on node1: c, then the requeued copy of b
    wait_state(dq, a, "done", timeout=30)
    wait_state(dq, c, "done", timeout=30)
    jd = wait_state(dq, requeued, "running", timeout=30)
    assert jd["restart_of"] == b and jd["host"] == "node1"
    runs_file = os.path.join(d, "runs")
    wait_until(lambda: len(read_lines(runs_file)) >= 2, 10, what="the copy's run line")
    # node2 back: a job placed there after it (passes went on) and still
    # one run of b on node2 and one of its copy on node1
    cluster.start_node("node2")
    _, on2 = script(cluster, ALICE, "d.sh", "echo on2\n")
    later, _ = submit(dq, "node3", ALICE, on2, env={"DQ_HOSTS": "node2"})
    assert wait_state(dq, later, "done", timeout=30)["host"] == "node2"
    assert read_lines(runs_file) == [f"run {b} on node2", f"run {requeued} on node1"]
    assert copies_of(dq, b) == [requeued]
    # the copy is lost too (node1 dies): DQ_REQUEUE=1 means once, so its end
    # is recorded with no copy of its own, and dq-wait b (which follows b's
    # requeues to its last run) ends on the copy, lost
    cluster.kill_node("node1")
    r = dq.run("node3", ALICE, "wait", b, "-t", "30")
    assert r.returncode == 1 and r.stdout.startswith(f"{b} lost (as {requeued}) exit "), \
        (r.returncode, r.stdout, r.stderr, "copies of the copy:", copies_of(dq, requeued))
    jc = job(dq, requeued, host="node3")
    assert jc["state"] == "lost" and "node1" in jc["reason"], jc
    assert jc["requeued_as"] is None and "requeued as" not in jc["reason"], jc
    # further passes (a job placed and done on node2) make no second copy
    again, _ = submit(dq, "node3", ALICE, on2)
    assert wait_state(dq, again, "done", timeout=30, host="node3")["host"] == "node2"
    assert copies_of(dq, b) == [requeued] and copies_of(dq, requeued) == []
    assert sorted(j["id"] for j in jobs(dq, "node3", view="complete")) == \
        sorted([a, b, c, requeued, later, again])
    assert jobs(dq, "node3") == []       # nothing queued or running
    assert read_lines(runs_file) == [f"run {b} on node2", f"run {requeued} on node1"]
    states = {line.split()[0]: line for line in
              dq.run("node3", ALICE, "jobs", "complete").stdout.splitlines()[1:]}
    assert f" lost -> {requeued} " in states[b], states
    assert " lost " in states[requeued] and "->" not in states[requeued], states


def read_lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def copies_of(dq, job_id, host="node3"):
    """IDs of every job, queued, running or ended, that runs job_id again."""
    # active first: a job moves from there to complete, never back
    return sorted({j["id"] for view in (None, "complete") for j in jobs(dq, host, view=view)
                   if j["restart_of"] == job_id})


def test_hung_host_is_skipped_within_the_timeout(cluster, dq):
    configure(dq, ["node1", "node2"], **FAST)
    cluster.stop_sshd("node2")
    try:
        _, path = script(cluster, ALICE, "s.sh", "sleep 3\n")
        t0 = time.monotonic()
        ids = [submit(dq, "node3", ALICE, path)[0] for _ in range(3)]
        assert time.monotonic() - t0 < 3 * (2 + 2)
        t0 = time.monotonic()
        r = dq.run("node3", ALICE, "jobs")
        assert r.returncode == 0 and time.monotonic() - t0 < 1.5
        assert {job(dq, i)["host"] for i in ids} == {"node1"}
    finally:
        cluster.cont_sshd("node2")


def crash(dq, host, user, cmd, *args, point, **kw):
    env = dict(kw.pop("env", {}), DQ_CRASH_AT=point)
    r = dq.run(host, user, cmd, *args, env=env, **kw)
    assert r.returncode in (-9, 137), (r.returncode, r.stderr)
    return r


def crash_submit(dq, path, point):
    """dq-submit of path as ALICE on node1, killed at `point`: the job id it printed."""
    r = crash(dq, "node1", ALICE, "submit", path, point=point, cwd=os.path.dirname(path))
    return r.stdout.split("'")[1]


def test_submit_killed_after_creating_the_job(cluster, dq):
    configure(dq, ["node1"], **FAST)
    _, path = script(cluster, ALICE, "s.sh", "echo ran\n")
    job_id = crash_submit(dq, path, "submit-created")
    assert job(dq, job_id)["state"] == "queued"     # not lost
    dq.run("node1", ALICE, "jobs")                  # starts the owner's scheduler again
    wait_state(dq, job_id, "done", timeout=30)
    assert log_of(dq, job_id) == "ran\n"


def test_scheduler_killed_before_its_ssh_launch(cluster, dq):
    configure(dq, ["node1"], **FAST)
    _, path = script(cluster, ALICE, "s.sh", "echo ran\n")
    job_id = crash_submit(dq, path, "launch-claimed")
    dq.run("node1", ALICE, "jobs")
    wait_state(dq, job_id, "done", timeout=30)
    assert log_of(dq, job_id) == "ran\n"
    with open(os.path.join(dq.root, "state", "placements.json")) as f:
        assert json.load(f)["jobs"] == {}


def test_scheduler_killed_after_its_ssh_launch(cluster, dq):
    configure(dq, ["node1"], **FAST)
    cluster.set_gpus("node1", 1)
    d, path = script(cluster, ALICE, "s.sh", "echo ran >> ran-$DQ_JOB_ID; sleep 2\n")
    job_id = crash_submit(dq, path, "launch-started")
    _, other = script(cluster, ALICE, "t.sh", "true\n")
    second, _ = submit(dq, "node1", ALICE, other)       # must wait: the GPU is taken
    assert job(dq, second)["state"] == "queued"
    wait_state(dq, job_id, "done", timeout=30)
    wait_state(dq, second, "done", timeout=30)
    with open(os.path.join(d, f"ran-{job_id}")) as f:
        assert f.read() == "ran\n"                       # once


def test_kill_interrupted_half_way_is_finished_by_the_next_pass(cluster, dq):
    configure(dq, ["node1"], **FAST)
    cluster.set_gpus("node1", 1)
    _, path = script(cluster, ALICE, "s.sh", "exec fake-cuda --hold 100\n")
    job_id, _ = submit(dq, "node1", ALICE, path)
    wait_until(lambda: cluster.gpu_processes("node1"), 10)
    crash(dq, "node1", ALICE, "kill", job_id, point="kill-recorded")
    assert job(dq, job_id)["state"] == "killed"
    dq.run("node1", ALICE, "schedule", "--once")
    wait_until(lambda: not cluster.gpu_processes("node1"), 15, what="the GPU to be freed")
    assert dq.run("node1", ALICE, "free").stdout == "node1: 0\n"


def test_stuck_lock_times_out_clearly_and_scheduler_recovers(cluster, dq):
    configure(dq, ["node1"], lock_timeout=1, **FAST)
    cluster.set_gpus("node1", 1)
    holder = cluster.hold_gpu("node1", BOB, 0)
    _, path = script(cluster, ALICE, "s.sh", "echo ran\n")
    queued, _ = submit(dq, "node1", ALICE, path)
    lock = os.path.join(dq.root, "state", "lock")
    hold = cluster.popen("node2", BOB, ["python3", "-c",
                         "import fcntl,sys,time; f=open(sys.argv[1],'a'); "
                         "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); "
                         "time.sleep(6)", lock])
    assert hold.stdout.readline().strip() == "held"
    r = dq.run("node1", ALICE, "submit", path, cwd=os.path.dirname(path))
    assert r.returncode == 1 and lock in r.stderr and "waiting for the lock" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Job ID" not in r.stdout
    cluster.run("node1", "root", ["kill", str(holder)])
    hold.wait(timeout=20)
    wait_state(dq, queued, "done", timeout=30)      # the loop got past the stuck lock
    assert len(jobs(dq, view="complete")) == 1


def test_corrupt_files_are_named_and_scheduling_goes_on(cluster, dq):
    configure(dq, ["node1"], **FAST)
    cluster.set_gpus("node1", 1)
    _, late = script(cluster, ALICE, "late.sh", "exec fake-cuda --delay 8 --hold 2\n")
    _, quick = script(cluster, ALICE, "q.sh", "echo q\n")
    done_id, _ = submit(dq, "node1", ALICE, quick)
    wait_state(dq, done_id, "done")
    broken_id, _ = submit(dq, "node1", ALICE, quick)
    wait_state(dq, broken_id, "done")
    spec = os.path.join(dq.root, "jobs", "backend", broken_id, "job.json")
    with open(spec, "w") as f:
        f.write('{"id": "trunc')
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert r.returncode == 0 and done_id in r.stdout and spec in r.stderr
    # the running job has not touched its GPU yet; placements.json is lost
    running, _ = submit(dq, "node1", ALICE, late)
    with open(os.path.join(dq.root, "state", "placements.json"), "w") as f:
        f.write("\0\0\0")
    with open(os.path.join(dq.root, "state", "next_id"), "w") as f:
        f.write("garbage")
    nxt, r = submit(dq, "node1", ALICE, quick)
    # the GPU stays with the running job: its reservation is rebuilt from
    # run.json, and the next pass saves it
    assert "Executing" not in r.stdout

    def placements():
        try:
            with open(os.path.join(dq.root, "state", "placements.json")) as f:
                return list(json.load(f)["jobs"])
        except ValueError:
            return None
    assert wait_until(placements, 10, what="placements.json rebuilt") == [running]
    assert int(nxt.split("-")[0]) == int(running.split("-")[0]) + 1
    wait_state(dq, running, "done", timeout=30)
    wait_state(dq, nxt, "done", timeout=30)


def test_jobs_that_fail_on_their_own(cluster, dq):
    configure(dq, ["node1"], **FAST)
    cluster.set_gpus("node1", 1)
    holder = cluster.hold_gpu("node1", BOB, 0)
    d, sig = script(cluster, ALICE, "sig.sh", "kill -9 $$\n", subdir="f1")
    d2, gone = script(cluster, ALICE, "gone.sh", "true\n", subdir="doomed")
    _, noexec = script(cluster, ALICE, "noexec.sh", "true\n", subdir="f1")
    a, _ = submit(dq, "node1", ALICE, sig)
    b, _ = submit(dq, "node1", ALICE, gone, cwd=d2)
    c, _ = submit(dq, "node1", ALICE, noexec)
    shutil.rmtree(d2)
    os.chmod(noexec, 0o644)
    cluster.run("node1", "root", ["kill", str(holder)])
    ja = wait_state(dq, a, "failed", timeout=30)
    assert ja["signal"] == "SIGKILL" and ja["exit_code"] == 137 and "SIGKILL" in ja["reason"]
    jb = wait_state(dq, b, "failed", timeout=30)
    assert f"working directory {d2} does not exist on node1" == jb["reason"]
    jc = wait_state(dq, c, "failed", timeout=30)
    assert "is not executable" in jc["reason"]
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert all(i in r.stdout for i in (a, b, c)) and "SIGKILL" in r.stdout
    assert "does not exist" in log_of(dq, b)
