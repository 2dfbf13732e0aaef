"""Plumbing for dq's benchmark suite (bench/run): clusters, timing inside a
node as a test user, synthesized job files, statistics, the results table.

Everything here is stdlib-only and reuses the simulated cluster of
tests/cluster.py (Linux namespaces with real sshd, screen and Unix users).
"""
import hashlib
import json
import math
import os
import pwd
import shutil
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, os.path.join(REPO, "tests"))

from cluster import (BASE_PARENT, BASE_PREFIX, Cluster, DQInstall, _GlobalLock,  # noqa: E402
                     install_dq, unavailable_reason)
from dqtest import ALICE, BOB, configure as write_conf, script, wait_until  # noqa: E402

PY = "/usr/bin/python3"         # the test users' python3 (the shims in root's PATH are slow)


# Statistics ###################################################################

def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(values):
    return percentile(values, 50)


def fmt_s(x, digits=3):
    if x is None or x != x:
        return "n/a"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1000:.{max(0, digits - 2)}f} ms" if x < 0.01 else f"{x:.{digits}f} s"


# Results ######################################################################

class Row:
    """One line of the results table.  status: PASS, MISS, INFO or ERROR."""

    def __init__(self, target, what, goal, measured, status, note=""):
        self.target, self.what, self.goal = target, what, goal
        self.measured, self.status, self.note = measured, status, note


def check(ok):
    return "PASS" if ok else "MISS"


def table_lines(rows):
    headers = ["#", "Target", "Goal", "Measured", "Result"]
    cells = [[str(r.target), r.what, r.goal, r.measured, r.status] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for c in cells:
        out.append("| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |")
    return out


def notes_lines(rows):
    out = []
    for r in rows:
        if r.note:
            out.append(f"- [{r.target}] {r.what}: {r.note}")
    return out


# The machine #################################################################

def machine_info():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    pyver = subprocess.run([PY, "--version"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "diff", "--quiet", "HEAD", "--", "dq.py"]).returncode
    return {
        "nproc": os.cpu_count(), "cpu": model, "mem": f"{mem_gib:.0f} GiB",
        "kernel": os.uname().release, "python": pyver, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "dq": f"{git}{' + uncommitted dq.py changes' if dirty else ''}",
    }


# Running things inside a node, as a user, timed there ########################

# Runs inside the node as the test user: runs each command in turn and
# reports its wall time, exit status and peak RSS (from wait4, so it covers
# the command and the children it waited for).  Timing inside the node keeps
# nsenter/setpriv out of the figures.
HARNESS = r'''
import json, os, subprocess, sys, tempfile, threading, time
spec = json.loads(sys.argv[1])
res = []
for item in spec:
    env = dict(os.environ)
    env.update(item.get("env") or {})
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sink = None
    if item.get("sink"):
        sink = subprocess.Popen(item["sink"], shell=True, stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL)
    t0 = time.time()
    c0 = time.perf_counter()
    p = subprocess.Popen(item["argv"], stdin=subprocess.DEVNULL,
                         stdout=sink.stdin if sink else out, stderr=err,
                         cwd=item.get("cwd"), env=env)
    if sink:
        sink.stdin.close()
    timer = None
    if item.get("timeout"):
        timer = threading.Timer(item["timeout"], p.kill)
        timer.start()
    _, status, ru = os.wait4(p.pid, 0)
    t_cmd = time.perf_counter() - c0
    if timer:
        timer.cancel()
    if sink:
        sink.wait()
    wall = time.perf_counter() - c0
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    res.append({"t0": t0, "t1": t0 + wall, "wall": wall, "wall_cmd": t_cmd,
                "rc": p.returncode, "maxrss_kb": ru.ru_maxrss,
                "cpu": ru.ru_utime + ru.ru_stime,
                "out": out.read(item.get("keep", 4000)).decode(errors="replace"),
                "err": err.read(4000).decode(errors="replace")})
    if item.get("sleep"):
        time.sleep(item["sleep"])
print(json.dumps(res))
'''


class Timed:
    def __init__(self, d):
        self.__dict__.update(d)


def run_timed(cluster, host, user, items, timeout=600):
    """items: [{argv, env?, cwd?, sink?, keep?, sleep?, timeout?}] run one
    after the other as `user` on `host`; returns [Timed].  sink: a shell
    command the output is piped into; timeout: kill the command after that
    many seconds (rc -9).  Timed.cpu: user+system CPU of the command and the
    children it waited for (e.g. dq's ssh clients)."""
    r = cluster.run(host, user, [PY, "-c", HARNESS, json.dumps(items)], timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"timing harness failed on {host} as {user}: {r.stderr[-2000:]}")
    return [Timed(d) for d in json.loads(r.stdout)]


def failed(what, t):
    """The error for a command that failed: its last stderr line first (the
    results table shows the first line), then the rest of what it said."""
    lines = [ln for ln in t.err.splitlines() if ln.strip()]
    return RuntimeError(f"{what} failed (exit {t.rc}): {lines[-1] if lines else 'no message'}"
                        + ("\n" + "\n".join(lines[-30:]) if lines else ""))


def times(cluster, host, user, argv, n, **kw):
    """Run argv n times; [Timed].  Fails if any run fails."""
    res = run_timed(cluster, host, user, [dict(kw, argv=argv)] * n)
    for t in res:
        if t.rc != 0:
            raise failed(os.path.basename(argv[0]), t)
    return res


# dq installs ##################################################################

SOURCE = None       # a snapshot of dq.py, install.sh, links/ (see snapshot_source)


def snapshot_source(dest, dq_py=None):
    """Copy what install.sh needs (dq.py, links/, extras/) to `dest`, so that every install of one run
    has the same dq.py even while somebody edits the working tree.  dq_py:
    another dq.py to measure instead of the repository's."""
    global SOURCE
    os.makedirs(dest)
    shutil.copy2(dq_py or os.path.join(REPO, "dq.py"), os.path.join(dest, "dq.py"))
    shutil.copy2(os.path.join(REPO, "install.sh"), os.path.join(dest, "install.sh"))
    shutil.copytree(os.path.join(REPO, "links"), os.path.join(dest, "links"), symlinks=True)
    shutil.copytree(os.path.join(REPO, "extras"), os.path.join(dest, "extras"))
    SOURCE = dest
    with open(os.path.join(dest, "dq.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


_DQ_MODULE = None


def dq_module():
    """The snapshot's dq.py as a module, for its pure functions (job_needs,
    need_shape, queue_name): to check that what a benchmark writes by hand
    is what this dq would have written."""
    global _DQ_MODULE
    if _DQ_MODULE is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("dq_snapshot",
                                                      os.path.join(SOURCE, "dq.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _DQ_MODULE = mod
    return _DQ_MODULE


def new_install(cluster, name, hosts=None, **opts):
    """A fresh dq data root on the cluster with dq.conf [dq] hosts + opts."""
    root = install_dq(cluster, os.path.join(cluster.base, "dq", name), repo=SOURCE)
    dq = DQInstall(cluster, root)
    write_conf(dq, hosts or cluster.hosts, **opts)
    return dq


def write_script(cluster, user, name, body, subdir="bench"):
    """An executable job script owned by user (tests/dqtest.py's script)."""
    return script(cluster, user, name, body, subdir=subdir)


def hold_all(cluster, hosts, gpus, user=BOB):
    """Occupy every GPU with a hand-started process; {host: [pid]}."""
    held = {}
    for h in hosts:
        held[h] = [cluster.hold_gpu(h, user, g) for g in range(gpus)]
    return held


def release(cluster, held):
    for h, pids in held.items():
        cluster.run(h, "root", ["kill"] + [str(p) for p in pids], check=True, timeout=20)


def job_id_of(text):
    for line in text.splitlines():
        if line.startswith("Job ID: '"):
            return line.split("'")[1]
    return None


# Synthesized jobs ############################################################

def _write(path, data, uid, gid, text=None):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, (text if text is not None else json.dumps(data, indent=1, sort_keys=True)
                      + "\n").encode())
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _queue_name(queues, user, uid, gid, n, gpus, need, submitted):
    """A queued GPU job's name in its owner's queue directory
    (jobs/queue/<user>/<number>_<gpus>_<shape>_<priority>_<top>_<submitted>,
    as dq's queue_name() makes it; the directory the user's own, as dq
    makes it)."""
    d = os.path.join(queues, user)
    if not os.path.isdir(d):
        os.mkdir(d, 0o755)
        os.chown(d, uid, gid)
        os.chmod(d, 0o755)
    _write(os.path.join(d, queue_file_name(n, gpus, need, submitted)), None, uid, gid, text="")


def queue_file_name(n, gpus, need, submitted):
    """The name _queue_name gives job number n (dq's need_shape and
    queue_name, for a job neither held, waiting nor prioritised)."""
    shape = hashlib.sha1(json.dumps(need, sort_keys=True).encode()).hexdigest()[:12] \
        if need else "-"
    return f"{n}_{gpus}_{shape}_0_0_{math.ceil(submitted)}"


def synth_jobs(dq, first, count, users, state, script="/bin/true", cwd="/", t0=None,
               log=False, step=1.0, env=None, need=None, shape=None):
    """Write `count` jobs numbered from `first` straight into the data root,
    as dq would have left them, owned by their users (round robin).
    state: 'queued' (job.json + active entry) or 'done' (job.json, run.json,
    end.json, and an empty log if `log`).  Bumps state/next_id and the
    completed-job counters dq keeps.  env/need: the jobs' DQ_* variables
    and the constraints dq derives from them (its jobs/active entry).
    shape: for a mixed queue, a function of the job number returning a dict
    with any of user, gpus, env, need: that job's, instead of the above.
    Returns the ids."""
    root = dq.root
    backend = os.path.join(root, "jobs", "backend")
    active = os.path.join(root, "jobs", "active")
    queues = os.path.join(root, "jobs", "queue")     # dq's per-user queues, where it keeps them
    pws = {}

    def pw_of(name):
        if name not in pws:
            pws[name] = pwd.getpwnam(name)
        return pws[name]
    t0 = t0 or time.time() - count * step - 3600
    ids = []
    for i in range(count):
        n = first + i
        kind = shape(n) if shape else {}
        pw = pw_of(kind.get("user") or users[i % len(users)])
        uid, gid, user = pw.pw_uid, pw.pw_gid, pw.pw_name
        gpus, jenv, jneed = kind.get("gpus", 1), kind.get("env", env), kind.get("need", need)
        job_id = f"{n}-{user}"
        d = os.path.join(backend, job_id)
        os.mkdir(d)
        os.chown(d, uid, gid)
        sub = t0 + i * step
        _write(os.path.join(d, "job.json"), {
            "format": 1, "id": job_id, "user": user, "script": script, "cwd": cwd,
            "env": jenv or {}, "gpus": gpus, "submitted": sub, "submit_host": "node1",
            "restart_of": None, "requeues": 0}, uid, gid)
        if state == "queued":
            entry = {"format": 1, "gpus": gpus, "submitted": sub}
            _write(os.path.join(active, job_id), dict(entry, need=jneed) if jneed else entry,
                   uid, gid)
            if os.path.isdir(queues):
                _queue_name(queues, user, uid, gid, n, gpus, jneed, sub)
        else:
            host, gpu = f"node{1 + n % 4}", n % 4
            _write(os.path.join(d, "run.json"), {
                "format": 1, "host": host, "gpus": [gpu], "pid": 1000 + n % 30000,
                "pgid": 1000 + n % 30000, "started": sub + 1, "session": f"dq-{job_id}"},
                uid, gid)
            _write(os.path.join(d, "end.json"), {
                "format": 1, "state": "done", "reason": None, "exit_code": 0, "signal": None,
                "ended": sub + 2, "host": host}, uid, gid)
            if log:
                _write(os.path.join(d, "log"), None, uid, gid, text="")
        ids.append(job_id)
    if state == "done":     # dq's per-user completed counters (jobs/done/<user>), if kept
        for pw in [pw_of(u) for u in users]:
            path = os.path.join(root, "jobs", "done", pw.pw_name)
            old = read_json(path)
            if isinstance(old, dict) and isinstance(old.get("done"), int):
                theirs = [i for i in ids if i.endswith("-" + pw.pw_name)]
                new = dict(old, done=old["done"] + len(theirs))
                if "recent" in old:     # dq's last ended jobs, newest first (completion)
                    new["recent"] = (theirs[::-1] + old["recent"])[:30]
                _write(path, new, pw.pw_uid, pw.pw_gid)
    _write(os.path.join(root, "state", "next_id"), {"format": 1, "next": first + count},
           0, 0)
    os.chmod(os.path.join(root, "state", "next_id"), 0o666)
    return ids


def ensure_users(names):
    """Unix users that only own synthesized job files (nobody logs in as
    them): created once if missing, without a home, with a locked password
    and nologin as their shell, and left in place (harmless; the next run
    finds them).  Under the simulated cluster's global lock, which
    serialises its own user setup."""
    missing = []
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            missing.append(name)
    if not missing:
        return 0
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    with _GlobalLock():
        for name in missing:
            try:
                pwd.getpwnam(name)
                continue
            except KeyError:
                pass
            r = subprocess.run(["useradd", "--no-create-home", "--shell", shell, "--comment",
                                "dq bench/run, owns synthesized queued jobs", name],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"useradd {name} failed: {r.stderr.strip()}")
    return len(missing)


def next_id(dq):
    try:
        with open(os.path.join(dq.root, "state", "next_id")) as f:
            return json.load(f)["next"]
    except FileNotFoundError:
        return 1


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def job_files(dq, job_id):
    d = os.path.join(dq.root, "jobs", "backend", job_id)
    return (read_json(os.path.join(d, "job.json"), {}), read_json(os.path.join(d, "run.json"), {}),
            read_json(os.path.join(d, "end.json"), {}), os.path.join(d, "log"))


def wait_for(cond, timeout, interval=0.2, what="condition"):
    """tests/dqtest.py's wait_until, failing with RuntimeError (a benchmark
    that cannot finish is an error of the suite, not a failed assertion)."""
    try:
        return wait_until(cond, timeout, interval, what)
    except AssertionError as e:
        raise RuntimeError(str(e)) from None


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)
