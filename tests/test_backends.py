"""The core of dq on both back ends (issue 22): the same commands, as a
user runs them, against dq's own ssh scheduling and against a real Slurm
(slurmctld and a slurmd inside each simulated node, tests/slurmcluster.py).
One parametrized fixture, `engine`, gives each test a dq install on one back
end; the tests assert what a user sees, whichever runs the jobs."""
import json
import os
import re
import shlex
import sys
import time
import types

import pytest

from conftest import Engine, ready_slurm
from dqtest import ALICE, BOB, HOSTS, configure, job, jobs, log_of, script, submit, \
    wait_state, wait_until
from test_notify import ends, inbox  # noqa: F401 -- fixtures
from test_shell import terminal  # noqa: F401 -- a fixture

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dq as dqpy  # noqa: E402


def test_a_job_runs_with_its_env_cwd_and_gpu(engine):
    dq, c = engine.dq, engine.cluster
    d, path = script(c, ALICE, "env.sh", 'echo "host=$(hostname) cwd=$(pwd) '
                     'cuda=$CUDA_VISIBLE_DEVICES lr=$DQ_LR id=$DQ_JOB_ID"\n'
                     'nvidia-smi -L | head -1\n')
    job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_LR": "0.1", "DQ_GPUS": "2"})
    assert job_id, r.stderr
    j = wait_state(dq, job_id, "done", timeout=40)
    out = log_of(dq, job_id)
    m = re.search(r"host=(\S+) cwd=(\S+) cuda=(\S*) lr=(\S*) id=(\S+)", out)
    assert m, out
    host, cwd, cuda, lr, jid = m.groups()
    assert (cwd, lr, jid) == (d, "0.1", job_id), out
    assert host == j["host"] and len(cuda.split(",")) == 2, (out, j)
    assert sorted(j["gpus"]) == sorted(int(g) for g in cuda.split(",")), (out, j)
    assert "GPU " in out, out
    if engine.name == "slurm":      # it went through Slurm, as a Slurm job
        with open(os.path.join(dq.root, "jobs", "backend", job_id, "slurm.json")) as f:
            assert re.fullmatch(r"[0-9]+", json.load(f)["id"])


def slurm_id(engine, job_id):
    with open(os.path.join(engine.dq.root, "jobs", "backend", job_id, "slurm.json")) as f:
        return json.load(f)["id"]


def spans(dq, ids, user=ALICE):
    """{job: (host, gpus, started, ended)} of ended jobs, from dq-jobs."""
    done = {j["id"]: j for j in jobs(dq, user=user, view="complete")}
    return {i: (done[i]["host"], done[i]["gpus"], done[i]["started"], done[i]["ended"])
            for i in ids}


def test_the_queue_fills_every_gpu_and_never_one_twice(engine):
    """20 one-GPU jobs of two users on 16 GPUs: all run, no GPU ever holds
    two at once, and the four that wait have a reason."""
    dq, c = engine.dq, engine.cluster
    ids = []
    for user in (ALICE, BOB):       # ten jobs each, as one sweep: all queued at once
        d, path = script(c, user, "hold.sh", "exec fake-cuda --hold 4 --mem 1000\n")
        r = dq.run("node1", user, "submit", "--grid", "DQ_I=" + ",".join(map(str, range(10))),
                   path, cwd=d)
        assert r.returncode == 0, r.stderr
        ids += [(i, user) for i in re.findall(r"^Job ID: '([0-9]+-[a-z]+)'$", r.stdout, re.M)]
    assert len(ids) == 20

    def sixteen_running():
        active = jobs(dq)
        running = [j for j in active if j["state"] == "running"]
        return active if len(running) == 16 else None
    active = wait_until(sixteen_running, 30, 0.3, "16 running")
    queued = [j for j in active if j["state"] == "queued"]
    assert len(queued) == 4 and all(j["reason"] for j in queued), queued
    if engine.name == "slurm":
        assert all("(Slurm: " in j["reason"] for j in queued), queued
    for job_id, user in ids:
        wait_state(dq, job_id, "done", timeout=60, user=user)
    got = {}
    for user in (ALICE, BOB):
        got.update(spans(dq, [i for i, u in ids if u == user], user))
    by_gpu = {}
    for job_id, (host, gpus, start, end) in got.items():
        assert len(gpus) == 1, (job_id, gpus)
        by_gpu.setdefault((host, gpus[0]), []).append((start, end, job_id))
    assert len(by_gpu) == 16, sorted(by_gpu)
    for gpu, runs in by_gpu.items():
        runs.sort()
        for (s1, e1, a), (s2, e2, b) in zip(runs, runs[1:]):
            assert s2 >= e1 - 0.05, (gpu, a, b, e1, s2)


def test_kill_a_running_and_a_queued_job(engine):
    dq, c = engine.dq, engine.cluster
    engine.configure(["node2"])
    _, path = script(c, ALICE, "long.sh", "exec fake-cuda --hold 120 --mem 1000\n")
    env = {"DQ_GPUS": "4", "DQ_HOSTS": "node2"}
    running, _ = submit(dq, "node1", ALICE, path, env=env)
    wait_state(dq, running, "running", timeout=30)
    queued, _ = submit(dq, "node1", ALICE, path, env=env)
    wait_until(lambda: [j for j in jobs(dq, view="queue") if j["id"] == queued], 10)
    r = dq.run("node1", ALICE, "kill", queued)
    assert r.returncode == 0 and "Removing" in r.stdout, r.stdout + r.stderr
    r = dq.run("node1", ALICE, "kill", running)
    assert r.returncode == 0 and "Killing" in r.stdout, r.stdout + r.stderr
    for j in (queued, running):
        assert wait_state(dq, j, "killed", timeout=20)["state"] == "killed"
    # nothing of it is left on the GPUs, and nothing else started there
    wait_until(lambda: not c.gpu_processes("node2"), 20, 0.2, "node2's GPUs to empty")
    time.sleep(1)
    assert not c.gpu_processes("node2")
    assert job(dq, queued)["started"] is None
    if engine.name == "slurm":
        wait_until(lambda: not engine.slurm.squeue_ids(), 20, 0.2, "Slurm's queue to empty")
    # a killed job cannot be killed again
    r = dq.run("node1", ALICE, "kill", running)
    assert r.returncode == 1 and "not active" in r.stderr


def test_restart_tail_and_attach(engine):
    dq, c = engine.dq, engine.cluster
    _, path = script(c, ALICE, "count.sh",
                     'for i in 1 2 3; do echo "tick $i"; done; sleep "${DQ_NAP:-0}"\n')
    first, _ = submit(dq, "node1", ALICE, path)
    wait_state(dq, first, "done", timeout=30)
    r = dq.run("node1", ALICE, "tail", first)
    assert r.returncode == 0 and r.stdout.split() == ["tick", "1", "tick", "2", "tick", "3"], \
        r.stdout
    r = dq.run("node1", ALICE, "restart", first)
    assert r.returncode == 0, r.stderr
    again = re.search(r"'([0-9]+-[a-z]+)'", r.stdout).group(1)
    assert again != first
    wait_state(dq, again, "done", timeout=30)
    assert "tick 3" in log_of(dq, again)
    # a running job's screen session, on its host, where dq-attach finds it
    nap, _ = submit(dq, "node1", ALICE, path, env={"DQ_NAP": "60"})
    j = wait_state(dq, nap, "running", timeout=30)
    wait_until(lambda: f"dq-{nap}" in c.run(j["host"], ALICE, "screen -ls").stdout, 10, 0.2,
               "its screen session")
    r = dq.run("node1", BOB, "attach", nap)
    assert r.returncode == 1 and "belongs to" in r.stderr
    dq.run("node1", ALICE, "kill", nap)
    r = dq.run("node1", ALICE, "attach", nap)
    assert r.returncode == 1 and "not running" in r.stderr


def test_a_sweep(engine):
    dq, c = engine.dq, engine.cluster
    _, path = script(c, ALICE, "lr.sh", 'echo "lr=$DQ_LR i=$DQ_SWEEP_INDEX"\n')
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_LR=0.1,0.01,0.001", path,
               cwd=os.path.dirname(path))
    assert r.returncode == 0, r.stderr
    ids = re.findall(r"^Job ID: '([0-9]+-[a-z]+)'$", r.stdout, re.M)
    assert len(ids) == 3
    for i, (job_id, lr) in enumerate(zip(ids, ("0.1", "0.01", "0.001"))):
        wait_state(dq, job_id, "done", timeout=30)
        assert f"lr={lr} i={i}" in log_of(dq, job_id)
    if engine.name == "slurm":      # one job array
        sids = [slurm_id(engine, j) for j in ids]
        assert [s.split("_")[1] for s in sids] == ["0", "1", "2"], sids
        assert len({s.split("_")[0] for s in sids}) == 1, sids


def test_after_and_its_cancel(engine):
    dq, c = engine.dq, engine.cluster
    _, ok = script(c, ALICE, "ok.sh", "sleep 2; date +%s.%N\n")
    _, bad = script(c, ALICE, "bad.sh", "sleep 1; exit 3\n")
    _, after = script(c, ALICE, "after.sh", "date +%s.%N\n")
    a, _ = submit(dq, "node1", ALICE, ok)
    b, _ = submit(dq, "node1", ALICE, after, env={"DQ_AFTER": a})
    f, _ = submit(dq, "node1", ALICE, bad)
    g, _ = submit(dq, "node1", ALICE, after, env={"DQ_AFTER": f})
    try:
        wait_state(dq, b, "done", timeout=40)
    except AssertionError:      # what Slurm and dq say of both
        raise AssertionError((job(dq, a), job(dq, b), engine.slurm and engine.slurm.squeue(
            "%i %T %r %E"), engine.slurm and engine.slurm.logs()[-3000:])) from None
    assert float(log_of(dq, b).split()[0]) >= float(log_of(dq, a).split()[0])
    wait_state(dq, f, "failed", timeout=30)
    try:
        j = wait_state(dq, g, "cancelled", timeout=40)
    except AssertionError:
        if engine.slurm:
            print(engine.slurm.squeue("%i %T %r"), job(dq, g))
            print(dq.run("node1", ALICE, "jobs", "--json", "-a").stdout)
        raise
    assert f in j["reason"] and j["started"] is None, j


# A job that says when it is warned (DQ_SIGNAL) and when it gets TERM
WARNED = r'''
trap 'echo "warned $(date +%s.%N)"' USR1
trap 'echo "term $(date +%s.%N)"; exit 7' TERM
echo start
while :; do sleep 0.1; done
'''


def test_kill_with_grace_then_mail_and_hook(engine, inbox, ends):
    """dq-kill --grace: the job's warning now, TERM when the grace runs out
    (the wrapper's, on either back end); then its mail and the owner's
    on-end hook, as at any end."""
    dq, c = engine.dq, engine.cluster
    engine.configure(smtp=f"127.0.0.1:{inbox.port}", mail_domain="example.org", kill_grace=1)
    _, path = script(c, ALICE, "warned.sh", WARNED)
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SIGNAL": "USR1@1m", "DQ_MAIL": "1"})
    j = wait_state(dq, job_id, "running", timeout=30)
    wait_until(lambda: "start" in log_of(dq, job_id), 10, 0.2, "the job to start")
    t0 = time.time()
    r = dq.run("node1", ALICE, "kill", "--grace", "3s", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Stopping {job_id} on {j['host']}: SIGUSR1 now, SIGTERM in 3s\n"
    wait_until(lambda: "warned" in log_of(dq, job_id), 5, 0.1, "the warning")
    j = wait_state(dq, job_id, "killed", timeout=20)
    times = dict(line.split() for line in log_of(dq, job_id).splitlines()
                 if line.startswith(("warned ", "term ")))
    assert float(times["warned"]) - t0 < 1.5, times
    assert 2.5 < float(times["term"]) - float(times["warned"]) < 5, times
    assert j["reason"] == f"dq-kill --grace 3s by {ALICE} (exit status 7)", j
    mail = inbox.wait(1)[0]
    assert mail["to"] == [f"{ALICE}@example.org"]
    assert mail["subject"].startswith(f"dq: {job_id} killed"), mail["subject"]
    ends.wait([job_id])
    if engine.name == "slurm":
        wait_until(lambda: not engine.slurm.squeue_ids(), 20, 0.2, "Slurm's queue to empty")


def test_a_time_limit(engine):
    dq, c = engine.dq, engine.cluster
    _, path = script(c, ALICE, "slow.sh", "exec sleep 100\n")
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_TIME": "3s"})
    j = wait_state(dq, job_id, ("timeout", "failed", "killed"), timeout=40)
    assert j["state"] == "timeout" and "time limit 3s" in j["reason"], j
    assert j["ended"] - j["started"] < 3 + 5 + 2, j      # kill_grace 5 s at most


def test_listings(engine):
    dq, c = engine.dq, engine.cluster
    engine.configure(["node3"])
    _, path = script(c, ALICE, "hold.sh", "exec fake-cuda --hold 60 --mem 1000\n")
    env = {"DQ_GPUS": "4", "DQ_HOSTS": "node3", "DQ_DESC": "big one"}
    running, _ = submit(dq, "node1", ALICE, path, env=env)
    wait_state(dq, running, "running", timeout=30)
    queued, _ = submit(dq, "node1", ALICE, path, env=env)
    r = dq.run("node1", ALICE, "jobs", "summary", "--json")
    assert json.loads(r.stdout)["active"] == 1 and json.loads(r.stdout)["queued"] == 1
    [q] = wait_until(lambda: [j for j in jobs(dq, view="queue")
                              if (j["reason"] or "").startswith("GPUs busy")], 20, 0.3,
                     "its reason")
    assert q["id"] == queued and q["desc"] == "big one", q
    r = dq.run("node1", ALICE, "jobs")
    assert r.returncode == 0 and running in r.stdout and "node3" in r.stdout, r.stdout
    r = dq.run("node1", ALICE, "jobs", "queue")
    assert queued in r.stdout and "GPUs busy" in r.stdout, r.stdout
    for j in (queued, running):
        dq.run("node1", ALICE, "kill", j)
    r = dq.run("node1", ALICE, "jobs", "complete", "--json")
    assert {j["id"] for j in json.loads(r.stdout)} >= {queued, running}


# ---------------------------------------------------------------- Slurm only

@pytest.fixture
def on_slurm(request, cluster, dq):
    e = Engine("slurm", dq, ready_slurm(request))
    e.configure()
    return e


def test_what_slurm_cannot_honour_is_refused(on_slurm):
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, ALICE, "x.sh", "true\n")
    for env, needles in (({"DQ_GPU_MEM": "40G"}, ["DQ_GPU_MEM", "DQ_GPU_TYPE"]),
                         ({"DQ_MEM": "8G", "DQ_HOSTS": "node1"},
                          ["sbatch", "node configuration"]),
                         ({"DQ_PRIORITY": "5"}, ["DQ_PRIORITY", "dq-top"]),
                         ({"DQ_HOSTS": "gpu9"}, ["DQ_HOSTS=gpu9", "node1"]),
                         ({"DQ_GPU_TYPE": "A100"}, ["DQ_GPU_TYPE=A100", "gres types"]),
                         ({"DQ_GPUS": "8"}, ["sbatch", "node configuration"])):
        r = dq.run("node1", ALICE, "submit", path, env=env, cwd=os.path.dirname(path))
        assert r.returncode == 1 and "Traceback" not in r.stderr, (env, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), (env, lines)
    assert jobs(dq) == [] and not on_slurm.slurm.squeue_ids()


def test_hosts_hold_and_release_through_slurm(on_slurm):
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, ALICE, "h.sh", "hostname\n")
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node2,node4", "DQ_GPUS": "4"})
    b, _ = submit(dq, "node1", ALICE, path, env={"DQ_EXCLUDE": "node[1-3]"})
    for j in (a, b):
        wait_state(dq, j, "done", timeout=30)
    assert job(dq, a)["host"] in ("node2", "node4") and job(dq, b)["host"] == "node4"
    held, _ = submit(dq, "node1", ALICE, path, env={"DQ_AFTER": a})
    r = dq.run("node1", ALICE, "hold", held)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: [j for j in jobs(dq, view="queue") if "held" in (j["reason"] or "")],
               10, 0.3, "held in Slurm's words")
    time.sleep(2)
    assert job(dq, held)["state"] == "queued"
    assert dq.run("node1", ALICE, "release", held).returncode == 0
    wait_state(dq, held, "done", timeout=30)


def test_a_job_slurm_cancels_is_recorded(on_slurm):
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, ALICE, "long.sh", "exec sleep 100\n")
    first, _ = submit(dq, "node1", ALICE, path)
    q, _ = submit(dq, "node1", ALICE, path, env={"DQ_AFTER": first})
    wait_state(dq, first, "running", timeout=20)
    r = on_slurm.slurm.root_run(["scancel", slurm_id(on_slurm, q)])     # an admin's
    assert r.returncode == 0, r.stderr
    j = wait_state(dq, q, "cancelled", timeout=20)
    assert "Slurm" in j["reason"], j
    dq.run("node1", ALICE, "kill", first)


def test_free_and_drain_through_slurm(on_slurm, cluster):
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, ALICE, "hold.sh", "exec fake-cuda --hold 60 --mem 1000\n")
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node2", "DQ_GPUS": "3"})
    j = wait_state(dq, a, "running", timeout=20)
    r = dq.run("node1", BOB, "free", "--json")
    assert r.returncode == 0, r.stderr
    free = {h["host"]: h for h in json.loads(r.stdout)}
    assert sorted(free) == HOSTS
    assert free["node1"]["free"] == [0, 1, 2, 3] and free["node2"]["gpus"] == 4
    assert free["node2"]["free"] == [g for g in range(4) if g not in j["gpus"]], (free, j)
    # only Slurm's operators may drain: a user gets Slurm's refusal in one line
    r = dq.run("node1", ALICE, "drain", "node3", "-r", "fan")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "scontrol" in r.stderr and "operators" in r.stderr, r.stderr
    # root is one: the node drains in Slurm, with the reason, and dq says so
    r = on_slurm.cluster.run("node1", "root", [dq.path("drain"), "node3", "-r", "new fan"])
    assert r.returncode == 0, r.stderr
    r = dq.run("node1", ALICE, "drain", "--json")
    assert [(d["host"], d["reason"]) for d in json.loads(r.stdout)] == [("node3", "new fan")]
    assert "node3: drained (new fan)" in dq.run("node1", ALICE, "free").stdout
    _, quick = script(c, ALICE, "q.sh", "hostname\n")
    b, _ = submit(dq, "node1", ALICE, quick, env={"DQ_HOSTS": "node3"})
    time.sleep(2)
    assert job(dq, b)["state"] == "queued"
    r = on_slurm.cluster.run("node1", "root", [dq.path("drain"), "--undo", "node3"])
    assert r.returncode == 0, r.stderr
    assert wait_state(dq, b, "done", timeout=30)["host"] == "node3"
    dq.run("node1", ALICE, "kill", a)


def test_web_users_and_doctor_see_the_slurm_cluster(on_slurm):
    import urllib.request
    from dqtest import free_port
    dq, c = on_slurm.dq, on_slurm.cluster
    # no hosts line: dq's views ssh to Slurm's nodes
    configure(dq, [], backend="slurm", slurm_conf=on_slurm.slurm.conf)
    _, path = script(c, ALICE, "hold.sh", "exec fake-cuda --hold 60 --mem 2000\n")
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node2", "DQ_GPUS": "4"})
    b, _ = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node2"})
    j = wait_state(dq, a, "running", timeout=20)
    wait_until(lambda: len(c.gpu_processes("node2")) == 4, 20, 0.2, "its 4 processes")
    r = dq.run("node1", BOB, "users", "--json")
    assert r.returncode == 0, r.stderr
    rows = [x for x in json.loads(r.stdout) if x["pid"]]
    assert {(x["host"], x["gpu"], x["job"]) for x in rows} == \
        {("node2", g, a) for g in j["gpus"]}, rows
    port = free_port()
    p = dq.popen("node1", ALICE, "web", "--port", port)
    try:
        def state():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state",
                                            timeout=30) as resp:
                    return json.loads(resp.read())
            except OSError:
                return None
        s = wait_until(lambda: (lambda x: x if x and x["queue"] else None)(state()), 20, 0.5,
                       "dq-web to answer, with the queued job")
        hosts = {h["host"]: h for h in s["hosts"]}
        assert sorted(hosts) == HOSTS
        assert [g["job"] for g in hosts["node2"]["gpus"]] == [a] * 4
        assert s["free_gpus"] == 12 and s["total_gpus"] == 16, s["free_gpus"]
        assert [j["id"] for j in s["running"]] == [a]
        [q] = s["queue"]
        assert q["id"] == b and "(Slurm: " in q["reason"], q
    finally:
        os.killpg(p.pid, 15)
        p.wait(10)
    dq.run("node1", ALICE, "kill", a, b)
    r = dq.run("node1", ALICE, "doctor", "--json", timeout=120)
    checks = {(x["host"], x["check"]): x for x in json.loads(r.stdout)}
    for name in ("slurm", "munge", "probe job"):
        assert checks[("slurm", name)]["level"] == "ok", checks[("slurm", name)]
    assert "read the data root and ran dq" in checks[("slurm", "probe job")]["found"]
    assert r.returncode == 0, [x for x in checks.values() if x["level"] == "FAIL"]


def test_a_shell_on_slurm(on_slurm, terminal):
    from test_shell import shows, type_line
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, BOB, "hold.sh", "exec fake-cuda --hold 120 --mem 1000\n")
    busy, _ = submit(dq, "node1", BOB, path, env={"DQ_HOSTS": "node2", "DQ_GPUS": "4"})
    wait_state(dq, busy, "running", timeout=20, user=BOB)
    cwd = c.user_dir(ALICE, "project")
    # --now: no GPU now, in Slurm's words; nothing stays queued
    r = dq.run("node1", ALICE, "shell", "--now", "true", cwd=cwd, env={"DQ_HOSTS": "node2"})
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "now: GPUs busy (Slurm: Resources); without --now it waits" in r.stderr, r.stderr
    assert [j["state"] for j in jobs(dq, view="complete")] == ["cancelled"]
    # a shell that waits, then runs on node2's GPU
    terminal("node1", ALICE, [dq.path("shell")], cwd, env={"DQ_HOSTS": "node2"})
    shows("in the queue: GPUs busy (Slurm: Resources)")
    [j] = [j for j in jobs(dq) if j["user"] == ALICE]
    dq.run("node1", BOB, "kill", busy)
    wait_state(dq, j["id"], "running", timeout=20)
    time.sleep(1)       # (screen takes over the terminal)
    type_line('echo "on=$(hostname) gpu=$CUDA_VISIBLE_DEVICES in=$(pwd) id=$DQ_JOB_ID"')
    shows(f"in={cwd} id={j['id']}")
    assert re.search(r"on=node2 gpu=[0-3] ", screen_of_terminal()), screen_of_terminal()
    type_line("exit")
    assert wait_state(dq, j["id"], "done", timeout=20)["exit_code"] == 0


def screen_of_terminal():
    from test_shell import screen_text
    return screen_text()


def test_after_follows_a_job_that_runs_again(engine):
    """DQ_AFTER on a job that DQ_RESUME runs again: the dependent waits for
    the last run (on Slurm: its dependency moves to the new Slurm job)."""
    dq, c = engine.dq, engine.cluster
    d, path = script(c, ALICE, "ckpt.sh", '[ -e ckpt ] && exit 0; touch ckpt; sleep 1; exit 75\n',
                     subdir="ckpt-" + engine.name)
    _, after = script(c, ALICE, "after.sh", "date +%s.%N\n")
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_RESUME": "2"})
    b, _ = submit(dq, "node1", ALICE, after, env={"DQ_AFTER": a})
    j = wait_state(dq, b, ("done", "cancelled"), timeout=60)
    assert j["state"] == "done", j
    first = job(dq, a)
    assert first["state"] == "resumed" and first["requeued_as"], first
    second = wait_state(dq, first["requeued_as"], "done", timeout=30)
    assert j["started"] >= second["ended"], (j, second)


def test_the_quick_start(engine):
    """The README's first job (a CPU-only hello), then one on a GPU."""
    dq, c = engine.dq, engine.cluster
    d, path = script(c, ALICE, "hello.sh",
                     'echo hello from $(hostname) on GPU ${CUDA_VISIBLE_DEVICES:-none}\n')
    job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_GPUS": "0"})
    j = wait_state(dq, job_id, "done", timeout=20)
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert re.search(rf"^{job_id}\s+{j['host']}\s+-\s+done\s+0\s", r.stdout, re.M), r.stdout
    r = dq.run("node1", ALICE, "logs", job_id.split("-")[0])
    assert r.stdout.strip() == f"hello from {j['host']} on GPU none", r.stdout
    gpu, _ = submit(dq, "node1", ALICE, path)
    g = wait_state(dq, gpu, "done", timeout=20)
    assert log_of(dq, gpu).strip() == f"hello from {g['host']} on GPU {g['gpus'][0]}"


def test_a_node_that_dies_on_slurm(on_slurm):
    """A node dies under a running job: Slurm finds it down, and the job's
    owner's dq (dq-jobs here) records it lost and, with DQ_REQUEUE, runs it
    again elsewhere, once."""
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, ALICE, "long.sh", 'echo "on $(hostname)"; exec sleep 1000\n')
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_REQUEUE": "1", "DQ_EXCLUDE": "node1"})
    j = wait_state(dq, a, "running", timeout=20)
    c.kill_node(j["host"])
    lost = wait_state(dq, a, "lost", timeout=90)      # (dq-jobs keeps its owner's books)
    assert lost["state"] == "lost" and lost["requeued_as"] and "Slurm" in lost["reason"], lost
    again = wait_state(dq, lost["requeued_as"], "running", timeout=30)
    assert again["host"] not in (j["host"], "node1"), again
    dq.run("node1", ALICE, "kill", again["id"])


def test_gpu_memory_bookings_become_shards(on_slurm):
    """DQ_MEM on Slurm: --gres=shard:K, one shard per GiB (the test cluster
    gives node4's four 11 GB GPUs 11 shards each): two 4G jobs run there
    at once, each with CUDA_VISIBLE_DEVICES and its GPU in dq-jobs; a
    cluster without shards refuses DQ_MEM in one line."""
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, ALICE, "mem.sh", 'echo "gpu=$CUDA_VISIBLE_DEVICES"; '
                     'exec fake-cuda --hold 30 --mem 3000\n')
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_MEM": "4G"})
    b, _ = submit(dq, "node1", ALICE, path, env={"DQ_MEM": "4G"})
    ja = wait_state(dq, a, "running", timeout=20)
    jb = wait_state(dq, b, "running", timeout=20)
    assert ja["host"] == jb["host"] == "node4", (ja, jb)
    assert len(ja["gpus"]) == 1 and len(jb["gpus"]) == 1, (ja, jb)
    for j in (a, b):
        wait_until(lambda: "gpu=" in log_of(dq, j), 10, 0.2, f"{j}'s first line")
        assert re.search(r"^gpu=[0-3]$", log_of(dq, j), re.M), log_of(dq, j)
    r = on_slurm.slurm.root_run(["squeue", "-h", "-o", "%i %b"])
    assert "shard:4" in r.stdout, r.stdout
    for j in (a, b):
        dq.run("node1", ALICE, "kill", j)
    cfg = types.SimpleNamespace(slurm_partition=None, slurm_account=None, slurm_args=[])
    unshared = {"node1": dqpy.SlurmNode("node1", "idle", "gpu:4", "(null)")}
    with pytest.raises(dqpy.Failure, match="no GPU shards"):
        dqpy.slurm_options(cfg, {"env": {"DQ_MEM": "8G"}, "gpus": 1, "script": "/x.sh"},
                           lambda: unshared)


def test_top_through_slurm(on_slurm):
    """dq-top on Slurm is scontrol top (SchedulerParameters=enable_user_top):
    the job moved to the front starts first when the node frees up."""
    dq, c = on_slurm.dq, on_slurm.cluster
    _, path = script(c, ALICE, "t.sh", "sleep 1\n")
    _, block = script(c, ALICE, "block.sh", "exec sleep 100\n")
    env = {"DQ_HOSTS": "node1", "DQ_GPUS": "4"}
    blocker, _ = submit(dq, "node1", ALICE, block, env=env)
    wait_state(dq, blocker, "running", timeout=20)
    a, _ = submit(dq, "node1", ALICE, path, env=env)
    b, _ = submit(dq, "node1", ALICE, path, env=env)
    last, _ = submit(dq, "node1", ALICE, path, env=env)
    r = dq.run("node1", ALICE, "top", last)
    assert r.returncode == 0 and r.stdout == f"Moved {last} to the front of your jobs\n", \
        r.stdout + r.stderr
    dq.run("node1", ALICE, "kill", blocker)
    ends = {i: wait_state(dq, i, "done", timeout=40) for i in (last, a, b)}
    assert ends[last]["started"] < ends[a]["started"] < ends[b]["started"], ends


def test_a_job_sbatched_while_squeue_answers_is_not_taken_for_dropped(on_slurm):
    """The owner's books (dq-jobs, dq-wait, the background dq-schedule) ask
    squeue which of their jobs Slurm still has.  A dq-submit whose sbatch
    answers while that squeue runs must not read as a job Slurm dropped
    (`cancelled`, or `lost` once it runs): its Slurm ID appeared after
    squeue looked.
    Here a slow sbatch and a slow squeue make the overlap certain."""
    from cluster import USER_PATH
    dq, c = on_slurm.dq, on_slurm.cluster
    fake = c.user_dir(ALICE, "slow-slurm")
    for name, body in (("sbatch", "sleep 2; exec /usr/bin/sbatch \"$@\""),
                       ("squeue", "out=$(/usr/bin/squeue \"$@\") || exit; sleep 6; "
                                  "printf '%s\\n' \"$out\"")):
        c.run("node1", ALICE, f"printf '#!/bin/sh\\n%s\\n' {shlex.quote(body)} > {name}; "
                              f"chmod +x {name}", cwd=fake, check=True)
    env = {"PATH": f"{fake}:{USER_PATH}"}
    # (running past that squeue's answer: its end cannot come first)
    _, path = script(c, ALICE, "ok.sh", "echo ran; sleep 8\n")
    submitting = dq.popen("node1", ALICE, "submit", path, env=env, cwd=os.path.dirname(path))
    # dq-submit has written the job, and its sbatch answers while the
    # squeue of this dq-jobs takes its time
    wait_until(lambda: os.path.exists(os.path.join(dq.root, "jobs", "active", "1-" + ALICE)),
               10, 0.05, "dq-submit to write the job")
    r = dq.run("node1", ALICE, "jobs", "--json", env=env)
    out, err = submitting.communicate(timeout=30)
    assert r.returncode == 0 and submitting.returncode == 0, (r.stderr, err)
    job_id = re.search(r"'([0-9]+-[a-z]+)'", out).group(1)
    j = wait_state(dq, job_id, ("done", "cancelled", "failed", "lost"), timeout=40)
    assert j["state"] == "done" and log_of(dq, job_id) == "ran\n", j
