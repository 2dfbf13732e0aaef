"""dq-kill and dq-restart end to end."""
import json
import os

from dqtest import ALICE, BOB, configure, job, jobs, log_of, script, submit, wait_state, \
    wait_until

# A job that leaves processes behind in every way it can: a background
# child, one that ignores SIGHUP and SIGTERM, one in its own session.
SPREADER = r'''
sleep 1000 &
( trap '' HUP TERM; exec sleep 1001 ) &
setsid sh -c 'trap "" HUP; exec fake-cuda --hold 1002' &
echo started
wait
'''


def job_procs(cluster, host, user):
    r = cluster.run(host, "root", ["ps", "-u", user, "-o", "pid=,args="])
    return [ln.strip() for ln in r.stdout.splitlines()
            if "sleep 10" in ln or "sleep 100" in ln or "fake-cuda" in ln or "SCREEN" in ln]


def test_kill_running_job_kills_every_process_and_frees_the_gpu(cluster, dq):
    configure(dq, ["node1"], kill_grace=2)
    cluster.set_gpus("node1", 1)
    _, path = script(cluster, ALICE, "spread.sh", SPREADER)
    job_id, r = submit(dq, "node2", ALICE, path)
    assert "on node1/0" in r.stdout
    wait_until(lambda: "started" in log_of(dq, job_id), 10, what="the job to start")
    wait_until(lambda: cluster.gpu_processes("node1"), 10, what="the GPU to be used")
    assert len(job_procs(cluster, "node1", ALICE)) >= 4
    r = dq.run("node2", ALICE, "kill", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Killing {job_id} on node1 ...")
    assert job_procs(cluster, "node1", ALICE) == []
    assert cluster.gpu_processes("node1") == []
    j = job(dq, job_id)
    assert j["state"] == "killed" and j["ended"]
    assert dq.run("node3", ALICE, "free").stdout == "node1: 0\n"
    screens = cluster.run("node1", ALICE, ["screen", "-ls"]).stdout
    assert f"dq-{job_id}" not in screens


def test_kill_queued_job_removes_it(cluster, dq):
    configure(dq, ["node1"])
    cluster.set_gpus("node1", 1)
    cluster.hold_gpu("node1", BOB, 0)
    _, path = script(cluster, ALICE, "never.sh", "touch ran-$DQ_JOB_ID\n")
    a, _ = submit(dq, "node1", ALICE, path)
    b, _ = submit(dq, "node1", ALICE, path)
    r = dq.run("node1", ALICE, "kill", a)
    assert r.returncode == 0 and f"Removing {a} from the queue" in r.stdout
    assert [j["id"] for j in jobs(dq, view="queue")] == [b]
    assert job(dq, a)["state"] == "killed"
    r = dq.run("node1", ALICE, "kill", a)
    assert r.returncode != 0 and "not active" in r.stderr


def test_kill_refuses_other_users_jobs_and_bad_ids(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "s.sh", "sleep 20\n")
    a, _ = submit(dq, "node1", ALICE, path)
    wait_state(dq, a, "running")
    for arg, needle in ((a, "belongs to dqalice"), ("999", "no job 999"),
                        ("12;rm -rf /", "not a job ID"), ("abc", "not a job ID")):
        r = dq.run("node1", BOB, "kill", arg)
        assert r.returncode == 1 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert job(dq, a)["state"] == "running"
    r = dq.run("node1", BOB, "restart", a)
    assert r.returncode == 1 and "belongs to dqalice" in r.stderr


def test_restart_reruns_with_same_script_cwd_and_env(cluster, dq):
    configure(dq, ["node1"])
    d, path = script(cluster, ALICE, "r.sh", 'echo "$DQ_X $(pwd) $DQ_JOB_ID"\n',
                     subdir="restart dir")
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_X": "v1"}, cwd=d)
    wait_state(dq, a, "done")
    r = dq.run("node1", ALICE, "restart", a, cwd="/")
    assert r.returncode == 0, r.stderr
    b = r.stdout.split("'")[1]
    assert b != a and int(b.split("-")[0]) > int(a.split("-")[0])
    assert f"Executing '{b}' on node1/" in r.stdout
    wait_state(dq, b, "done")
    assert log_of(dq, b) == f"v1 {d} {b}\n"
    jb = job(dq, b)
    assert jb["restart_of"] == a and jb["env"] == {"DQ_X": "v1"}


def test_restart_refuses_an_active_job(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "s.sh", "sleep 20\n")
    a, _ = submit(dq, "node1", ALICE, path)
    r = dq.run("node1", ALICE, "restart", a)
    assert r.returncode == 1 and "only a finished job" in r.stderr


def test_lost_job_when_its_session_vanishes(cluster, dq):
    """The wrapper dies without recording an end (SIGKILL): the next pass
    marks the job lost, frees its GPU and kills what the job left running."""
    configure(dq, ["node1"])
    cluster.set_gpus("node1", 1)
    _, path = script(cluster, ALICE, "s.sh",
                     "setsid sh -c 'exec sleep 1003' >/dev/null 2>&1 </dev/null &\nsleep 100\n")
    _, other = script(cluster, ALICE, "t.sh", "sleep 5\n")
    a, _ = submit(dq, "node1", ALICE, path)
    j = wait_state(dq, a, "running")
    with open(os.path.join(dq.root, "jobs", "backend", a, "run.json")) as f:
        run = json.load(f)
    wait_until(lambda: [p for p in job_procs(cluster, "node1", ALICE) if "sleep 1003" in p],
               10, what="the job's background process")
    cluster.run("node1", ALICE, ["kill", "-KILL", str(run["pid"])])     # the wrapper
    wait_until(lambda: not [p for p in job_procs(cluster, "node1", ALICE) if "SCREEN" in p],
               10, what="the session to end")
    b, r = submit(dq, "node1", ALICE, other)
    j = wait_state(dq, a, "lost", timeout=20)
    assert "screen session" in j["reason"]
    assert wait_state(dq, b, ("running", "done"), timeout=20)["gpus"] == [0]
    # what the lost job left running is killed, so nothing of it runs on
    wait_until(lambda: not [p for p in job_procs(cluster, "node1", ALICE)
                            if "sleep 1003" in p], 15,
               what="the lost job's leftovers to be killed")
