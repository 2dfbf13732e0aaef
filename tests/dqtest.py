"""Helpers shared by dq's end-to-end tests (the cluster itself is in cluster.py)."""
import json
import os
import pwd
import re
import socket
import time
import types

ALICE, BOB, DAN = "dqalice", "dqbob", "dqdan"
HOSTS = ["node1", "node2", "node3", "node4"]
# The test cluster's GPUs, node1 to node4: a lab's mix of one node of big
# GPUs, one of mid-size ones and two of old 11 GB cards (names and
# memory.total as nvidia-smi prints them for these cards).
MODELS = [("NVIDIA A100-SXM4-80GB", 81920), ("NVIDIA GeForce RTX 3090", 24576),
          ("NVIDIA GeForce GTX 1080 Ti", 11264), ("NVIDIA GeForce GTX 1080 Ti", 11264)]


def free_port():
    """A TCP port free on 127.0.0.1 now (the nodes share this network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout=30, interval=0.1, what="condition"):
    """Poll cond() until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def configure(dq, hosts, **opts):
    """Rewrite the install's dq.conf: which hosts, plus [dq] options."""
    lines = ["[dq]", "hosts = " + " ".join(hosts), "ssh = " + dq.cluster.ssh_command]
    lines += [f"{k} = {v}" for k, v in opts.items()]
    with open(os.path.join(dq.root, "dq.conf"), "w") as f:
        f.write("\n".join(lines) + "\n")


def script(cluster, user, name, body, subdir="work"):
    """Write an executable /bin/sh job script owned by user; returns (dir, path)."""
    d = cluster.user_dir(user, subdir)
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body.lstrip("\n"))
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o755)
    return d, path


def submit(dq, host, user, path, env=None, cwd=None, check=True):
    """dq-submit as user; returns (job_id, CompletedProcess)."""
    r = dq.run(host, user, "submit", path, env=env, cwd=cwd or os.path.dirname(path))
    if check:
        assert r.returncode == 0, r.stderr
    m = re.search(r"^Job ID: '([0-9]+-[a-z]+)'$", r.stdout, re.M)
    return (m.group(1) if m else None), r


def jobs(dq, host=None, user=ALICE, view=None):
    """dq-jobs [view] --json -a, parsed."""
    args = ([view] if view else []) + ["--json", "-a"]
    r = dq.run(host or dq.cluster.hosts[0], user, "jobs", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def job(dq, job_id, user=ALICE, host=None):
    """The job's dict from dq-jobs, whichever view it is in."""
    for view in (None, "complete"):
        for j in jobs(dq, host, user=user, view=view):
            if j["id"] == job_id:
                return j
    return None


def wait_state(dq, job_id, states, timeout=30, user=ALICE, host=None):
    states = (states,) if isinstance(states, str) else states
    return wait_until(lambda: (lambda j: j if j and j["state"] in states else None)(
        job(dq, job_id, user, host)), timeout, 0.2, f"{job_id} to be {'/'.join(states)}")


def queued_for_a_pass(dq, path, env=None):
    """ALICE's job, submitted on node3 for node1's GPU 0 while a hand-started
    process holds it; then her dq-schedule loop ends and GPU 0 is free: the
    job waits for a pass the test runs itself (one that places it, or
    launches it).  Its ID."""
    cluster = dq.cluster
    hand = cluster.hold_gpu("node1", BOB, 0)
    job_id, _ = submit(dq, "node3", ALICE, path, env=env)
    assert job(dq, job_id, host="node3")["state"] == "queued"
    cluster.run("node3", "root", ["pkill", "-u", ALICE, "-f", "schedule --quiet"])
    wait_until(lambda: cluster.run("node3", "root", ["pgrep", "-u", ALICE, "-f",
                                                     "schedule --quiet"]).returncode == 1,
               10, what="alice's dq-schedule to exit")
    cluster.run("node1", "root", ["kill", str(hand)])
    wait_until(lambda: not cluster.gpu_processes("node1"), 10, what="GPU 0 to be free")
    return job_id


def log_of(dq, job_id):
    path = os.path.join(dq.root, "jobs", "backend", job_id, "log")
    try:
        with open(path, errors="replace") as f:
            return f.read().replace("\r\n", "\n")
    except FileNotFoundError:
        return ""


def refused_at_submit(dq, path, cases):
    """Each (env, needles) of cases: dq-submit refuses it in one line on
    stderr holding every needle, and queues nothing."""
    for env, needles in cases:
        job_id, r = submit(dq, "node1", ALICE, path, env=env, check=False)
        assert r.returncode == 1 and job_id is None, (env, r.stdout, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("dq-submit: error: "), r.stderr
        for n in needles:
            assert n in lines[0], (n, lines[0])


def planner_rules(**kw):
    """The dq.conf settings the planner reads (dq.plan's `rules`), at their
    defaults but for fifo order; kw overrides."""
    c = types.SimpleNamespace(starve_after=600, cpu_slots=4, order="fifo",
                              gpu_limit=lambda user: None, share_margin=(0.02, 0),
                              max_jobs_per_gpu=8, share_foreign=True)
    c.__dict__.update(kw)
    return c


def dq_py():
    """dq.py itself, imported (for its writers and pure functions)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dq
    return dq


def synthetic_history(dq, user, now, recent=()):
    """A week of history of user, written with dq's own writer: a 2-GPU job
    from 22:00 to 03:00 over the night two days ago, and a job at noon on
    each of the 5 days before today and yesterday; plus a done job for each
    (hours ago it started, hours ago it ended, GPUs) in `recent`."""
    night = dq_py().period_start(now - 2 * 86400, "day")
    records = [{"format": 1, "id": f"{900 + i}-{user}", "state": "done", "host": "node9",
                "gpus": 1, "share": 1, "gpu_type": "Old GPU", "submitted": t - 60,
                "started": t, "ended": t + 1800, "logged": t + 1800, "idle_gpu_s": 900}
               for i, t in enumerate(dq_py().period_start(now - k * 86400, "day") + 12 * 3600
                                     for k in range(2, 7))]
    records.append({"format": 1, "id": f"990-{user}", "state": "timeout", "host": "node9",
                    "gpus": 2, "share": 1, "gpu_type": "Old GPU", "submitted": night - 3 * 3600,
                    "started": night - 2 * 3600, "ended": night + 3 * 3600,
                    "logged": night + 3 * 3600})
    for i, (start, end, gpus) in enumerate(recent):
        records.append({"format": 1, "id": f"{950 + i}-{user}", "state": "done",
                        "host": "node9", "gpus": gpus, "share": 1, "gpu_type": "Old GPU",
                        "submitted": now - start * 3600 - 10, "started": now - start * 3600,
                        "ended": now - end * 3600, "logged": now - end * 3600})
    cfg = type("Cfg", (), {"p": lambda self, *parts: os.path.join(dq.root, *parts)})()
    dq_py().write_history(cfg, user, records)
    pw = pwd.getpwnam(user)
    os.chown(dq_py().history_path(cfg, user), pw.pw_uid, pw.pw_gid)
    return night
