"""No traceback for any input (issue 10, part 2): every command, the
internal ones too, against bad arguments, bad dq.conf values and garbage in
every state file and index entry.  Each case asserts no traceback; one
clear stderr line naming what is wrong (`dq-cmd: error: ...` for a refusal,
`dq-cmd: warning: ...` for a corrupt file dq goes on without); the exit
status; and that nothing was changed (a refusal) or lost (other jobs still
listed and still scheduled).

No test cluster: each test has a fresh data root of its own (DQ_ROOT) whose
cluster is this machine alone (no dq.conf: no ssh).  Stubs come first on
PATH: an nvidia-smi with 4 idle GPUs, and a screen that only records what
it was asked to start, so no job ever runs.  A process whose command line
looks like the screen session of the seeded running job keeps that job
alive for the passes.  The test process holds every seeded user's
sched/<user>.lock, so no dq-schedule loop starts (one that is spawned
finds the lock taken and exits at once).
"""
import fcntl
import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import ensure_user  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ME = pwd.getpwuid(os.getuid()).pw_name
IS_ROOT = os.getuid() == 0
OTHER = "dqcarol"           # a plain user (not the cluster's dqalice/dqbob)
GROUP = "dqbadinput"        # a group OTHER is not in
HOST = os.uname().nodename.split(".")[0]
PATH = "/usr/local/bin:/usr/bin:/bin"
root_only = pytest.mark.skipif(not IS_ROOT, reason="needs root (other users' files)")

J_DONE, J_RUN, J_GPU, J_CPU = (f"{n}-{ME}" for n in (841, 842, 843, 844))
J_OTHER = f"845-{OTHER}"    # another user's finished job (as root only)
NEXT = 846                  # one past the highest seeded job

SMI = """#!/bin/sh
# stub nvidia-smi: 4 idle GPUs
case "$*" in
*--query-gpu*) for i in 0 1 2 3; do echo "$i, GPU-0000000$i-1111-2222-3333-4444, 0, 81559, NVIDIA H100 80GB HBM3"; done ;;
*--query-compute-apps*) ;;
*) echo "stub nvidia-smi" ;;
esac
"""
SCREEN = """#!/bin/sh
# stub screen: records what it was asked to do, starts nothing
echo "$*" >> "${BADINPUT_SCREEN_LOG:-/dev/null}"
"""

_held_locks = []        # fds of sched/<user>.lock files, kept until the module ends


# ------------------------------------------------------------------ setup

@pytest.fixture(scope="module")
def base():
    """An install of dq, the stubs, a work directory with scripts, and a
    template data root with the seeded jobs."""
    d = tempfile.mkdtemp(prefix="dq-badinput-", dir="/tmp")
    os.chmod(d, 0o755)      # OTHER runs dq from here too
    session = None
    try:
        install = os.path.join(d, "install")
        subprocess.run([os.path.join(REPO, "install.sh"), install], check=True,
                       capture_output=True, env=dict(os.environ, PATH=PATH))
        fakebin = os.path.join(d, "fakebin")
        os.mkdir(fakebin)
        for name, text in (("nvidia-smi", SMI), ("screen", SCREEN)):
            with open(os.path.join(fakebin, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(fakebin, name), 0o755)
        work = os.path.join(d, "work")
        os.mkdir(work)
        os.chmod(work, 0o777)
        for name, mode in (("ok.sh", 0o755), ("noexec.sh", 0o644)):
            with open(os.path.join(work, name), "w") as f:
                f.write("#!/bin/sh\necho ok\n")
            os.chmod(os.path.join(work, name), mode)
        if IS_ROOT:
            try:
                pwd.getpwnam(OTHER)
            except KeyError:    # (the cluster suite may be changing it right now)
                ensure_user(OTHER)
        # The seeded running job's screen session, as `ps` shows one; it
        # goes when this test process does.
        session = subprocess.Popen(
            ["SCREEN", "-c", "import os,time;[time.sleep(0.5) for _ in iter(lambda: "
             "os.getppid() == %d, False)]" % os.getpid(), "-dmS", f"dq-{J_RUN}"],
            executable=sys.executable,
            env={"PATH": PATH})
        b = {"dir": d, "install": install, "fakebin": fakebin, "work": work}
        b["template"] = make_template(b)
        yield b
    finally:
        if session is not None:
            session.kill()
            session.wait()
        time.sleep(0.2)     # loops spawned by the last commands find the locks held
        for fd in _held_locks:
            os.close(fd)
        _held_locks.clear()
        shutil.rmtree(d, ignore_errors=True)


def write(path, data, owner=None, mode=0o644):
    """Write a file: bytes or str as they are, anything else as JSON."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not isinstance(data, (bytes, str)):
        data = json.dumps(data)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def spec(b, job_id, gpus=1):
    n, user = job_id.split("-", 1)
    env = {"DQ_DESC": f"seed {n}"}
    if gpus != 1:
        env["DQ_GPUS"] = str(gpus)
    return {"format": 1, "id": job_id, "user": user, "script": os.path.join(b["work"], "ok.sh"),
            "cwd": b["work"], "env": env, "gpus": gpus, "submitted": time.time() - 100,
            "submit_host": HOST, "restart_of": None, "requeues": 0}


def run_json():
    # pgid 0: a kill of the job (dq-kill, a lost job's tidying) looks for
    # processes by DQ_JOB_ID alone, and finds none.
    return {"format": 1, "host": HOST, "gpus": [0], "pid": 0, "pgid": 0,
            "started": time.time() - 60}


def end_json():
    return {"format": 1, "state": "done", "reason": None, "exit_code": 0, "signal": None,
            "ended": time.time() - 30, "host": HOST}


def seed_job(root, b, job_id, gpus=1, run=None, end=None, queued=False, owner=None):
    d = os.path.join(root, "jobs", "backend", job_id)
    os.makedirs(d)
    write(os.path.join(d, "job.json"), spec(b, job_id, gpus), owner)
    if run:
        write(os.path.join(d, "run.json"), run, owner)
        write(os.path.join(d, "log"), "line 1\nline 2\nline 3\n", owner)
    if end:
        write(os.path.join(d, "end.json"), end, owner)
    if queued:
        write(os.path.join(root, "jobs", "active", job_id),
              {"format": 1, "gpus": gpus, "submitted": time.time() - 100}, owner)
        if gpus == 0:
            write(os.path.join(root, "jobs", "cpu", job_id), {"format": 1}, owner)
        # its name in its owner's queue directory, as dq-submit writes it
        qdir = os.path.join(root, "jobs", "queue", job_id.split("-", 1)[1])
        write(os.path.join(qdir, f"{job_id.split('-')[0]}_{gpus}_-_0_0"), "", owner)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(qdir, pw.pw_uid, pw.pw_gid)
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(d, pw.pw_uid, pw.pw_gid)


def make_template(b):
    """The data root every test starts from: a finished job, a running one
    (GPU 0, its placement made by dq itself), a queued 1-GPU job and a
    queued CPU-only job of ours, and a finished job of OTHER."""
    root = os.path.join(b["dir"], "template")
    subprocess.run([os.path.join(b["install"], "bin", "dq-jobs")], check=True,
                   capture_output=True, env=dq_env(b, root))        # the layout
    seed_job(root, b, J_DONE, run=run_json(), end=end_json())
    seed_job(root, b, J_RUN, run=run_json(), queued=True)
    if IS_ROOT:
        seed_job(root, b, J_OTHER, run=run_json(), end=end_json(), owner=OTHER)
    # A corrupt placements.json: the next pass rebuilds it from the running
    # jobs' run.json, as dq itself would have written it.
    write(os.path.join(root, "state", "placements.json"), "{")
    r = subprocess.run([os.path.join(b["install"], "bin", "dq-schedule"), "--once"],
                       capture_output=True, text=True, env=dq_env(b, root))
    assert r.returncode == 0, r.stderr
    places = json.load(open(os.path.join(root, "state", "placements.json")))["jobs"]
    assert list(places) == [J_RUN] and places[J_RUN]["gpus"] == [0], places
    os.unlink(os.path.join(root, "state", "hosts.json"))   # every test polls afresh
    seed_job(root, b, J_GPU, gpus=1, queued=True)
    seed_job(root, b, J_CPU, gpus=0, queued=True)
    write(os.path.join(root, "state", "next_id"), {"format": 1, "next": NEXT}, mode=0o666)
    write(os.path.join(root, "jobs", "done", ME), {"format": 1, "done": 1})
    return root


def dq_env(b, root, **extra):
    env = {"PATH": f"{b['fakebin']}:{PATH}", "HOME": b["dir"], "LANG": "C.UTF-8",
           "NO_COLOR": "1"}
    if root is not None:
        env.update(DQ_ROOT=root, BADINPUT_SCREEN_LOG=root + ".screen.log")
    env.update(extra)
    return env


def hold_loop_lock(root, user):
    """Hold sched/<user>.lock for the rest of the module (see the docstring)."""
    path = os.path.join(root, "sched", user + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if user != ME:
        pw = pwd.getpwnam(user)
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held_locks.append(fd)


class Root:
    """A fresh data root for one test, a copy of the template."""

    def __init__(self, b, path):
        self.b, self.path = b, path
        subprocess.run(["cp", "-a", b["template"], path], check=True)
        for user in (ME, OTHER) if IS_ROOT else (ME,):
            hold_loop_lock(path, user)

    def p(self, *parts):
        return os.path.join(self.path, *parts)

    def run(self, cmd, *args, user=None, **env):
        """Run dq command `cmd` (None: dq.py with no command) as dq-CMD,
        or as `python3 dq.py CMD` for the internal ones."""
        if cmd is None or cmd.startswith(("_", "-")) or cmd in ("help", "bogus"):
            argv = ["python3", os.path.join(self.b["install"], "dq.py")] + \
                ([cmd] if cmd else [])
        else:
            argv = [os.path.join(self.b["install"], "bin", f"dq-{cmd}")]
        argv += list(args)
        if user:
            argv = ["setpriv", "--reuid", user, "--regid", user, "--init-groups"] + argv
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30, cwd=self.b["work"],
                              env=dq_env(self.b, self.path, **env))

    def launched(self):
        """Jobs the stub screen was asked to start."""
        try:
            with open(self.path + ".screen.log") as f:
                text = f.read()
        except FileNotFoundError:
            return set()
        return set(re.findall(r"-dmS dq-(\S+)", text))

    def jobs(self, *args):
        """dq-jobs -a --json ARGS: {id: job}, checked to go without a word."""
        r = self.run("jobs", "-a", "--json", *args)
        assert r.returncode == 0, r.stderr
        check_lines(r)
        return {j["id"]: j for j in json.loads(r.stdout)}


@pytest.fixture
def root(base):
    # The root's parent must be open to OTHER: not pytest's tmp_path.
    d = tempfile.mkdtemp(prefix="root-", dir=base["dir"])
    os.rmdir(d)
    r = Root(base, d)
    yield r
    shutil.rmtree(d, ignore_errors=True)


def snapshot(root):
    """Every file and directory under the root, with mode, owner and
    content, less locks and wake-up files (which dq may touch anyway)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if name.endswith(".lock") or rel == os.path.join("state", "lock") \
                    or name.startswith("wake-"):
                continue
            st = os.lstat(path)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
            out[rel] = (st.st_mode, st.st_uid, data)
    return out


# ------------------------------------------------------------------ checks

LINE_RE = re.compile(r"^dq(-[a-z_-]+)?: (error|warning): \S")
# What dq says on stderr besides errors and warnings
INFO_RE = re.compile(r"^(Flushing logs of \S+|\S+ is queued; it starts when .*"
                     r"|\S+ was lost \(.*\); requeued as \S+)$")


def check_lines(r, shell_says=None):
    """No traceback; every stderr line one of dq's own (or, matching
    shell_says, of the /bin/sh that starts it), none said twice."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()
             and not (shell_says and not ln.startswith("dq") and re.search(shell_says, ln))]
    for ln in lines:
        assert LINE_RE.match(ln) or INFO_RE.match(ln), f"not one of dq's lines: {ln!r}"
    assert len(lines) == len(set(lines)), f"said twice:\n{r.stderr}"
    return lines


def refused(r, *needles, shell_says=None):
    """A refusal: non-zero exit, and one line on stderr, the error, naming
    what is wrong (each needle)."""
    lines = check_lines(r, shell_says)
    assert r.returncode not in (0, None), (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and re.match(r"^dq(-[a-z_-]+)?: error: ", lines[0]), r.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


def carried_on(r, *needles):
    """dq went on past a corrupt file: exit 0, and a warning naming it."""
    lines = check_lines(r)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    for n in needles:
        assert any(n.lower() in ln.lower() and ": warning: " in ln for ln in lines), \
            f"no warning naming {n!r}:\n{r.stderr}"
    return lines


def refused_unchanged(root, *args, needles=(), **kw):
    before = snapshot(root.path)
    r = root.run(*args, **kw)
    line = refused(r, *needles)
    assert snapshot(root.path) == before, "a refused command changed the data root"
    return line


# ------------------------------------------------------------------ arguments

def SHORT(job_id):
    """A job ID as users mostly type it: its number."""
    return job_id.split("-")[0]


BAD_ARGS = [
    # (command, arguments, environment, what the error must name)
    ("submit", [], {}, ["required"]),
    ("submit", ["ok.sh", "noexec.sh"], {}, ["unrecognized"]),
    ("submit", ["--bogus", "ok.sh"], {}, ["--bogus"]),
    ("submit", ["/nonexistent/x.sh"], {}, ["no such file"]),
    ("submit", ["."], {}, ["directory"]),
    ("submit", ["noexec.sh"], {}, ["chmod +x"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": "x"}, ["DQ_GPUS"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": "-1"}, ["DQ_GPUS"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": "1.5"}, ["DQ_GPUS"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": ""}, ["DQ_GPUS"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": "65"}, ["DQ_GPUS"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": "\u00b2"}, ["DQ_GPUS"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": "1e3"}, ["DQ_GPUS"]),
    ("submit", ["ok.sh"], {"DQ_GPUS": "5"}, ["no host has 5 GPUs"]),
    ("jobs", ["bogus"], {}, ["invalid choice"]),
    ("jobs", ["-n", "x"], {}, ["-n"]),
    ("jobs", ["complete", "-n", "-1"], {}, ["-n"]),
    ("jobs", ["-n"], {}, ["-n"]),
    ("jobs", ["-u"], {}, ["-u"]),
    ("jobs", ["-u", "../state/next_id"], {}, ["not a user name"]),
    ("jobs", ["active", "extra"], {}, ["unrecognized"]),
    ("jobs", ["--bogus"], {}, ["--bogus"]),
    ("kill", [], {}, ["name the jobs"]),
    ("kill", ["x"], {}, ["not a job ID"]),
    ("kill", [f"{SHORT(J_GPU)}-"], {}, ["not a job ID"]),
    ("kill", ["-1"], {}, ["not a job ID"]),
    ("kill", ["999"], {}, ["no job 999"]),
    ("kill", ["999-nosuchuser"], {}, ["no job"]),
    ("kill", [SHORT(J_CPU), "x"], {}, ["'x' is not a job ID"]),
    ("kill", [SHORT(J_DONE)], {}, ["not active"]),
    ("hold", [], {}, ["name the jobs"]),
    ("hold", ["x"], {}, ["not a job ID"]),
    ("hold", ["999"], {}, ["no job 999"]),
    ("hold", [SHORT(J_DONE)], {}, ["only a queued job"]),
    ("top", [], {}, ["name the jobs"]),
    ("top", ["x"], {}, ["not a job ID"]),
    ("top", ["999"], {}, ["no job 999"]),
    ("top", [SHORT(J_DONE)], {}, ["only a queued job"]),
    ("submit", ["ok.sh"], {"DQ_PRIORITY": "high"}, ["DQ_PRIORITY"]),
    ("submit", ["ok.sh"], {"DQ_PRIORITY": "1.5"}, ["DQ_PRIORITY"]),
    ("submit", ["ok.sh"], {"DQ_PRIORITY": "99999999999"}, ["DQ_PRIORITY"]),
    ("drain", ["--undo"], {}, ["name the hosts"]),
    ("drain", ["-r", "x"], {}, ["name the hosts"]),
    ("drain", ["nosuchhost"], {}, ["not a host of this cluster"]),
    ("drain", [HOST, "--undo", "-r", "x"], {}, ["--undo takes no reason"]),
    ("release", [], {}, ["name the jobs"]),
    ("kill", ["15-12"], {}, ["not a range"]),
    ("kill", ["999-1000"], {}, ["no job numbered 999 to 1000"]),
    ("kill", ["--sweep", SHORT(J_DONE)], {}, ["not part of a sweep"]),
    ("wait", [], {}, ["name the jobs"]),
    ("doctor", ["extra"], {}, ["unrecognized"]),
    ("web", ["--port", "x"], {}, ["--port"]),
    ("web", ["--port", "0"], {}, ["--port 0"]),
    ("web", ["--port", "99999"], {}, ["--port 99999"]),
    ("web", ["--bind", "no.such.address.invalid", "--port", "1"], {}, ["cannot listen"]),
    ("web", ["extra"], {}, ["unrecognized"]),
    ("doctor", ["--bogus"], {}, ["--bogus"]),
    ("wait", ["x"], {}, ["not a job ID"]),
    ("wait", [SHORT(J_DONE), "-t", "x"], {}, ["-t"]),
    ("wait", [SHORT(J_DONE), "-t", "0"], {}, ["-t"]),
    ("restart", ["--failed"], {}, ["name the jobs"]),
    ("submit", ["--grid", "LR=1", "ok.sh"], {}, ["not a DQ_* variable"]),
    ("submit", ["--grid", "DQ_LR", "ok.sh"], {}, ["give the values"]),
    ("submit", ["--grid", "DQ_JOB_ID=1,2", "ok.sh"], {}, ["not a DQ_* variable"]),
    ("submit", ["--each", "/nonexistent", "ok.sh"], {}, ["--each /nonexistent"]),
    ("submit", ["ok.sh"], {"DQ_AFTER": "999"}, ["DQ_AFTER", "no job 999"]),
    ("submit", ["ok.sh"], {"DQ_AFTER_ANY": "x"}, ["DQ_AFTER_ANY", "not a job ID"]),
    ("submit", ["ok.sh"], {"DQ_RETRY": "many"}, ["DQ_RETRY"]),
    ("submit", ["ok.sh"], {"DQ_SIGNAL": "KILL@1m"}, ["DQ_SIGNAL='KILL@1m'",
                                                    "DQ_SIGNAL=USR1@10m"]),
    ("submit", ["ok.sh"], {"DQ_SIGNAL": "USR1@x"}, ["DQ_SIGNAL='USR1@x'", "not a time"]),
    ("submit", ["ok.sh"], {"DQ_SIGNAL": "1@1m"}, ["DQ_SIGNAL='1@1m'", "not a signal"]),
    ("kill", ["--grace", "x", SHORT(J_RUN)], {}, ["--grace 'x' is not a duration"]),
    ("kill", [SHORT(J_RUN), "--grace", "-5"], {}, ["--grace"]),
    ("kill", [SHORT(J_DONE), "--grace", "5m"], {}, ["not active"]),
    ("submit", ["ok.sh"], {"DQ_REQUEUE": "yes"}, ["DQ_REQUEUE='yes'", "0 to 1000",
                                                  "DQ_REQUEUE=1"]),
    ("submit", ["ok.sh"], {"DQ_REQUEUE": "-1"}, ["DQ_REQUEUE='-1'"]),
    ("submit", ["ok.sh"], {"DQ_RESUME": "0"}, ["DQ_RESUME='0'", "1 to 1000", "exits 75"]),
    ("submit", ["ok.sh"], {"DQ_RESUME": "many"}, ["DQ_RESUME='many'"]),
    ("submit", ["ok.sh"], {"DQ_SNAPSHOT": "yes"}, ["DQ_SNAPSHOT='yes'", "DQ_SNAPSHOT=1"]),
    ("submit", ["ok.sh"], {"DQ_MAIL": "1"}, ["DQ_MAIL=1", "mail_domain"]),
    ("submit", ["ok.sh"], {"DQ_MAIL": "me"}, ["DQ_MAIL='me'", "not a mail address"]),
    ("submit", ["ok.sh"], {"DQ_MAIL": "a@b", "DQ_MAIL_ON": "sometimes"}, ["DQ_MAIL_ON"]),
    ("_notify", [], {}, ["_notify JOB_ID"]),
    ("release", ["1-"], {}, ["not a job ID"]),
    ("release", [SHORT(J_DONE)], {}, ["only a queued job"]),
    ("restart", [], {}, ["name the jobs"]),
    ("restart", ["x"], {}, ["not a job ID"]),
    ("restart", [SHORT(J_GPU)], {}, ["only a finished job"]),
    ("restart", [SHORT(J_DONE), SHORT(J_RUN)], {}, ["only a finished job"]),
    ("free", ["extra"], {}, ["unrecognized"]),
    ("free", ["--bogus"], {}, ["--bogus"]),
    ("schedule", ["extra"], {}, ["unrecognized"]),
    ("schedule", ["--bogus"], {}, ["--bogus"]),
    ("tail", [], {}, ["required"]),
    ("tail", ["x"], {}, ["not a job ID"]),
    ("tail", ["999"], {}, ["no job 999"]),
    ("tail", [SHORT(J_DONE), "-n", "x"], {}, ["-n"]),
    ("tail", [SHORT(J_DONE), "-n"], {}, ["-n"]),
    ("tail", [SHORT(J_DONE), "-n", "-3"], {}, ["-n"]),
    ("tail", [SHORT(J_DONE), "-n", "\u00b2"], {}, ["-n"]),
    ("tail", [SHORT(J_DONE), SHORT(J_RUN)], {}, ["unrecognized"]),
    ("tail", [SHORT(J_DONE), "-f", "extra"], {}, ["unrecognized"]),
    ("tail", [SHORT(J_GPU)], {}, ["still queued"]),
    ("head", [], {}, ["required"]),
    ("head", ["x"], {}, ["not a job ID"]),
    ("head", [SHORT(J_DONE), "-n", "x"], {}, ["-n"]),
    ("head", [SHORT(J_GPU)], {}, ["still queued"]),
    ("logs", [], {}, ["required"]),
    ("logs", ["x"], {}, ["not a job ID"]),
    ("logs", ["999"], {}, ["no job 999"]),
    ("logs", [SHORT(J_DONE), SHORT(J_RUN)], {}, ["unrecognized"]),
    ("grep", [], {}, ["usage"]),
    ("grep", [SHORT(J_DONE)], {}, ["usage"]),
    ("grep", ["x", "line"], {}, ["not a job ID"]),
    ("grep", ["999", "line"], {}, ["no job 999"]),
    ("grep", [SHORT(J_GPU), "line"], {}, ["still queued"]),
    ("grep", [SHORT(J_DONE), "("], {}, ["grep: ", "("]),
    ("grep", [SHORT(J_DONE), "--bogus-option", "line"], {}, ["grep: ", "bogus-option"]),
    ("attach", [], {}, ["required"]),
    ("attach", ["x"], {}, ["not a job ID"]),
    ("attach", [SHORT(J_DONE)], {}, ["not running"]),
    ("users", ["extra"], {}, ["unrecognized"]),
    ("users", ["--bogus"], {}, ["--bogus"]),
    ("on-all", [], {}, ["no command"]),
    ("on-all", ["-t"], {}, ["-t"]),
    ("on-all", ["-t", "nan", "true"], {}, ["nan"]),
    ("on-all", ["-t", "inf", "true"], {}, ["inf"]),
    ("on-all", ["-t", "-1", "true"], {}, ["-1"]),
    ("on-all", ["-t", "0", "true"], {}, ["0"]),
    ("on-all", ["-t", "x", "true"], {}, ["x"]),
    ("on-all", ["-t", "1e9", "true"], {}, ["1e9"]),
]
OTHER_ARGS = [      # another user's job
    ("kill", [J_OTHER], {}, ["belongs to"]),
    ("top", [J_OTHER], {}, ["belongs to"]),
    ("restart", [J_OTHER], {}, ["belongs to"]),
    ("attach", [J_OTHER], {}, ["belongs to"]),
]


def case_id(c):
    return f"{c[0]}:{' '.join(c[1]) or '-'}" + "".join(f":{k}={v}" for k, v in c[2].items())


@pytest.mark.parametrize("case", BAD_ARGS + [pytest.param(c, marks=root_only)
                                             for c in OTHER_ARGS], ids=case_id)
def test_bad_arguments_are_refused(root, case):
    cmd, args, env, needles = case
    refused_unchanged(root, cmd, *args, needles=needles, **env)


INTERNAL = [
    ("_run", []),
    ("_run", [J_GPU]),
    ("_run", ["x", HOST, "1"]),
    ("_run", [J_GPU, "bad host!", "1"]),
    ("_run", [J_GPU, HOST, "x"]),
    ("_run", [J_GPU, HOST, "1,,2"]),
    ("_run", [J_GPU, HOST, "1", "extra"]),
    ("_run", [J_GPU + "\n", HOST, "1"]),
    ("_run", ["../../" + J_GPU, HOST, "1"]),
    ("_kill", []),
    ("_kill", [J_RUN]),
    ("_kill", [J_RUN, "x"]),
    ("_kill", [J_RUN, "-5"]),
    ("_kill", ["x", "0"]),
    ("_kill", [J_RUN, "0", "extra"]),
    ("_grace", []),
    ("_grace", [J_RUN]),
    ("_grace", [J_RUN, "x"]),
    ("_grace", [J_RUN, "1"]),
    ("_grace", ["x", "1234"]),
    ("_grace", [J_RUN, "1234", "extra"]),
    ("_layout", ["extra"]),
]


@pytest.mark.parametrize("case", INTERNAL, ids=lambda c: f"{c[0]}:{' '.join(c[1]) or '-'}")
def test_internal_commands_refuse_bad_arguments(root, case):
    cmd, args = case
    refused_unchanged(root, cmd, *args, needles=["usage: dq.py " + cmd])


@pytest.mark.parametrize("job_id,needle", [
    ("999-" + ME, "no job 999-" + ME),
    (J_GPU, f"{J_GPU}/job.json"),       # with a corrupt job.json
    pytest.param(J_OTHER, "refusing to run", marks=root_only),
])
def test_run_refuses_a_job_it_cannot_run(root, job_id, needle):
    if job_id == J_GPU:
        write(root.p("jobs", "backend", J_GPU, "job.json"), '{"format": 1, "gpus": "x"}')
    refused_unchanged(root, "_run", job_id, HOST, "1", needles=[needle])


# Every user command: in the overview, with --help and --version
COMMANDS = ["submit", "jobs", "kill", "hold", "release", "top", "drain", "wait", "doctor",
            "web", "restart", "free", "schedule", "tail", "head", "logs", "grep", "attach",
            "shell", "users", "on-all", "report"]


def test_no_command_prints_the_overview(root):
    r = root.run(None)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not r.stdout
    for cmd in COMMANDS:
        assert f"dq-{cmd}" in r.stderr
    assert "0." in r.stderr.splitlines()[0]     # the version


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_prints_the_overview(root, flag):
    r = root.run(flag)
    assert r.returncode == 0 and not r.stderr
    for cmd in COMMANDS:
        assert re.search(rf"^  dq-{cmd}\b|, dq-{cmd}\b", r.stdout, re.M), cmd


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(root, flag):
    r = root.run(flag)
    assert r.returncode == 0 and re.fullmatch(r"dq \d+\.\d+\.\d+\n", r.stdout) and not r.stderr


def test_unknown_command_is_one_line(root):
    refused_unchanged(root, "bogus", needles=["unknown command 'bogus'", "dq-submit"])


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_and_version(root, cmd):
    r = root.run(cmd, "--help")
    assert r.returncode == 0 and f"dq-{cmd}" in r.stdout and not r.stderr
    r = root.run(cmd, "--version")
    assert r.returncode == 0 and r.stdout.startswith("dq ") and not r.stderr


def test_submit_from_a_deleted_directory(root):
    gone = os.path.join(root.b["dir"], "gone-" + os.path.basename(root.path))
    os.mkdir(gone)
    before = snapshot(root.path)
    r = subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && exec "$2" "$3"', "sh", gone,
                        os.path.join(root.b["install"], "bin", "dq-submit"),
                        os.path.join(root.b["work"], "ok.sh")],
                       capture_output=True, text=True, env=dq_env(root.b, root.path))
    # /bin/sh, which runs dq.py's first line, says so too before dq starts
    refused(r, "current directory", shell_says=r"getcwd|current directory")
    assert snapshot(root.path) == before


# ------------------------------------------------------------------ dq.conf

NUMBER_KEYS = ["timeout", "poll_interval", "starve_after", "assign_timeout", "kill_grace",
               "lost_after", "watch_interval", "lock_timeout", "cpu_slots", "sample_interval"]
ABOVE_ZERO = ["timeout", "poll_interval", "assign_timeout", "watch_interval", "lock_timeout",
              "cpu_slots"]
BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "ten", "", "1e400", "1e9", "0x10"]
BAD_CONF = [(k, v) for k in NUMBER_KEYS + ["max_gpus_per_user"] for v in BAD_NUMBERS] + \
    [(k, "0") for k in ABOVE_ZERO] + [("cpu_slots", "2.5"), ("max_gpus_per_user", "2.5")]


@pytest.mark.parametrize("key,value", BAD_CONF, ids=lambda x: x or "empty")
def test_bad_config_number(root, key, value):
    write(root.p("dq.conf"), f"[dq]\n{key} = {value}\n")
    line = refused_unchanged(root, "jobs", needles=[f"'{key}'", "dq.conf", f"{key} = "])
    assert "e.g." in line


@pytest.mark.parametrize("text,needles", [
    ("[dq]\norder = random\n", ["'order'", "fairshare or fifo"]),
    ("[dq]\n[limits]\ndqalice = -1\n", ["[limits]", "'dqalice'", "dqalice = 8"]),
    ("[dq]\n[limits]\nbad user = 1\n", ["[limits]", "not a user name"]),
    ("[dq]\ntime_limit = soon\n", ["time_limit='soon'", "not a duration", "4h"]),
    ("[dq]\nmax_time = 0\n", ["max_time='0'", "above 0"]),
    ("[dq]\nfairshare_halflife = 0\n", ["fairshare_halflife='0'", "above 0"]),
    ("[dq]\nfairshare_halflife = a week\n", ["fairshare_halflife", "not a duration"]),
    ("[dq]\nadmins = alice;rm\n", ["'admins'", "not a user name"]),
    ("[dq]\nsmtp = mail server\n", ["'smtp'", "HOST:PORT"]),
    ("[dq]\nsmtp = mail:port\n", ["'smtp'", "HOST:PORT"]),
    ("[dq]\nmail_domain = a b\n", ["'mail_domain'", "example.org"]),
    ("[dq]\nshare_margin = lots\n", ["'share_margin'", "share_margin = 2%"]),
    ("[dq]\nshare_margin = 100%\n", ["'share_margin'", "under 100%"]),
    ("[dq]\nshare_margin = -1G\n", ["'share_margin'", "share_margin = 1G"]),
    ("[dq]\nmax_jobs_per_gpu = 0\n", ["'max_jobs_per_gpu'", "max_jobs_per_gpu = 8"]),
    ("[dq]\nmax_jobs_per_gpu = many\n", ["'max_jobs_per_gpu'", "1 to 1000"]),
    ("[dq]\nshare_foreign = perhaps\n", ["'share_foreign'", "yes or no"]),
    ("[dq]\nmem_overuse = shout\n", ["'mem_overuse'", "warn or kill"]),
    ("[dq]\nshell_time = forever\n", ["shell_time='forever'", "not a duration"]),
    ("[dq]\nsnapshot_max = lots\n", ["'snapshot_max'", "snapshot_max = 200M"]),
    ("[dq]\nsnapshot_max = -1G\n", ["'snapshot_max'", "a size"]),
    ("[dq]\nidle_after = soon\n", ["'idle_after'", "idle_after = 30m", "0 for never"]),
    ("[dq]\nidle_kill = -1\n", ["'idle_kill'", "idle_kill = 30m"]),
    ("[dq]\nshell_idle_after = 1h30\n", ["'shell_idle_after'", "shell_idle_after = 30m"]),
    ("[dq]\nbackend = pbs\n", ["'backend'", "ssh or slurm", "backend = slurm"]),
    ("[dq]\nslurm_partition = gpu;rm\n", ["'slurm_partition'", "slurm_partition = gpu"]),
    ("[dq]\nslurm_account = my lab\n", ["'slurm_account'", "a Slurm name"]),
    ("[dq]\nslurm_args = --qos 'x\n", ["'slurm_args'", "slurm_args = --qos=normal"]),
    ("[dq]\nslurm_args = qos=normal\n", ["'slurm_args'", "not an sbatch option"]),
    ("[dq]\nslurm_conf = etc/slurm.conf\n", ["'slurm_conf'", "absolute path"]),
])
def test_bad_order_and_limits(root, text, needles):
    write(root.p("dq.conf"), text)
    refused_unchanged(root, "jobs", needles=needles + ["dq.conf"])


@pytest.mark.parametrize("text", ["starve_after = 0", "kill_grace = 0", "lost_after = 0",
                                  "timeout = 2.5", "poll_interval = 0.5", "cpu_slots = 1",
                                  "multiplex = no", "lock_timeout = 1000000",
                                  "sample_interval = 0", "share_margin = 1.5%",
                                  "share_margin = 512M", "max_jobs_per_gpu = 1",
                                  "share_foreign = no", "mem_overuse = kill",
                                  "snapshot_max = 1.5G", "idle_after = 0",
                                  "idle_kill = 15m", "shell_idle_after = off",
                                  "backend = ssh", "backend = SSH"])
def test_good_config_numbers_are_taken(root, text):
    write(root.p("dq.conf"), f"[dq]\n{text}\n")
    r = root.run("jobs")
    assert r.returncode == 0 and not r.stderr, r.stderr


BAD_CONF_FILES = [
    ("multiplex", "[dq]\nmultiplex = maybe\n", ["'multiplex'", "yes or no"]),
    ("python", "[dq]\npython =\n", ["'python'"]),
    ("ssh-empty", "[dq]\nssh =\n", ["'ssh'"]),
    ("ssh-quote", "[dq]\nssh = ssh -o 'x\n", ["'ssh'"]),
    ("host", "[dq]\nhosts = a b;c\n", ["bad host name"]),
    ("no-section", "hosts = a\n", ["cannot parse", "[dq]"]),
    ("duplicate", "[dq]\ntimeout = 1\ntimeout = 2\n", ["cannot parse", "timeout"]),
    ("no-value", "[dq]\ntimeout\n", ["cannot parse"]),
    ("not-utf8", b"[dq]\n# caf\xe9\ntimeout = 5\n", ["cannot parse", "UTF-8"]),
    ("binary", b"\x00\xff\xfe\x01", ["cannot parse"]),
]


@pytest.mark.parametrize("case", BAD_CONF_FILES, ids=lambda c: c[0])
def test_bad_config_file(root, case):
    _, text, needles = case
    write(root.p("dq.conf"), text)
    refused_unchanged(root, "jobs", needles=["dq.conf"] + needles)


def test_config_that_is_a_directory(root):
    os.mkdir(root.p("dq.conf"))
    refused_unchanged(root, "jobs", needles=["dq.conf", "directory"])


def test_unknown_config_key_is_a_warning(root):
    write(root.p("dq.conf"), "[dq]\ntimout = 5\n")
    r = root.run("jobs")
    carried_on(r, "'timout'")


@root_only
def test_config_unreadable_by_the_user(root):
    write(root.p("dq.conf"), "[dq]\ntimeout = 5\n", mode=0o600)
    refused_unchanged(root, "jobs", user=OTHER, needles=["dq.conf", "permission denied"])


# ------------------------------------------------------------------ state files

class Raw(str):
    """A file's text as it is (not JSON, or JSON that json.dumps would not
    write, such as NaN)."""


GARBAGE = {     # the same for every file (one of each way read_json fails)
    "not-json": Raw("{not json"),
    "empty": Raw(""),
    "binary": b"\xff\xfe\x00\x01",
    "list": [1, 2],
    "string": "x",
    "number": 5,
    "nested": Raw("[" * 100000 + "]" * 100000),
    "format-x": {"format": "x"},
    "format-newer": {"format": 99},
}
FIELD_GARBAGE = {   # per file: fields of the wrong type or value
    "next_id": {"next-x": {"next": "x"}, "next-negative": {"next": -3},
                "next-bool": {"next": True}, "next-float": {"next": 1.5},
                "next-null": {"next": None}, "next-huge": {"next": 10 ** 400}, "no-next": {}},
    "hosts.json": {"down-list": {"down": [], "seen": {}}, "seen-list": {"seen": []},
                   "entry-list": {"seen": {HOST: []}},
                   "entry-fields": {"seen": {HOST: {"at": "x", "gpus": "x", "ok": 1,
                                                    "reachable": True, "busy": 5}}},
                   "down-since": {"down": {HOST: "x"}},
                   "busy-strings": {"seen": {HOST: {"at": time.time(), "gpus": 4, "ok": True,
                                                    "reachable": True, "busy": ["x"]}}},
                   "table": {"seen": {HOST: {"at": 1.0, "gpus": 4, "ok": True, "reachable": True,
                                             "busy": [], "table": {"at": 1.0, "all_known": True,
                                                                   "gpus": [[0]]}}}}},
    "placements.json": {"jobs-list": {"jobs": []}, "jobs-string": {"jobs": "x"},
                        "entry-list": {"jobs": {J_RUN: []}},
                        "entry-empty": {"jobs": {J_RUN: {}}},
                        "host-number": {"jobs": {J_RUN: {"user": ME, "host": 5, "gpus": [0],
                                                         "state": "running", "since": 1.0}}},
                        "gpus-string": {"jobs": {J_RUN: {"user": ME, "host": HOST, "gpus": "x",
                                                         "state": "running", "since": 1.0}}},
                        "bad-id": {"jobs": {"x": {"user": ME, "host": HOST, "gpus": [0],
                                                  "state": "running", "since": 1.0}}},
                        "since-huge": {"jobs": {J_RUN: {"user": ME, "host": HOST, "gpus": [0],
                                                        "state": "running",
                                                        "since": 10 ** 400}}},
                        "assigned-since-huge": {"jobs": {J_GPU: {
                            "user": ME, "host": HOST, "gpus": [1], "state": "assigned",
                            "since": 10 ** 400}}},
                        "since-nan": Raw('{"jobs": {"%s": {"user": "%s", "host": "%s", '
                                         '"gpus": [0], "state": "running", "since": NaN}}}'
                                         % (J_RUN, ME, HOST)),
                        "gpus-negative": {"jobs": {J_RUN: {"user": ME, "host": HOST,
                                                           "gpus": [-1], "state": "running",
                                                           "since": 1.0}}}},
    "cpu": {},       # what an entry of cpu/ holds is never read: only its name
    "active": {"gpus-x": {"gpus": "x"}, "gpus-negative": {"gpus": -1},
               "gpus-float": {"gpus": 1.5}, "gpus-null": {"gpus": None},
               "gpus-bool": {"gpus": True}, "gpus-huge": {"gpus": 1000},
               "no-gpus": {}, "submitted-x": {"gpus": 1, "submitted": "x"},
               "submitted-nan": Raw('{"gpus": 1, "submitted": NaN}'),
               "priority-x": {"gpus": 1, "priority": "high"},
               "top-negative": {"gpus": 1, "top": -1},
               "after-string": {"gpus": 1, "after": "12", "waiting": True},
               "after-bad-id": {"gpus": 1, "after": ["x"], "waiting": True},
               "waiting-x": {"gpus": 1, "waiting": "yes"},
               "held-false": {"gpus": 1, "held": False}},
    "done": {"done-x": {"done": "x"}, "done-negative": {"done": -1},
             "done-bool": {"done": True}, "no-done": {},
             "usage-x": {"done": 1, "usage": "x"}, "usage-negative": {"done": 1, "usage": -5},
             "usage-nan": Raw('{"done": 1, "usage": NaN}'),
             "usage_at-x": {"done": 1, "usage": 5, "usage_at": "x"}},
    "lost": {"reason-number": {"reason": 5}, "ended-x": {"ended": "x"},
             "ended-nan": Raw('{"ended": NaN}')},
    "job.json": {"empty-object": {}, "env-list": ("env", []), "env-number": ("env", {"DQ_X": 5}),
                 "env-key": ("env", {"A=B": "x"}), "gpus-x": ("gpus", "x"),
                 "gpus-negative": ("gpus", -1), "script-number": ("script", 5),
                 "script-relative": ("script", "ok.sh"), "cwd-null": ("cwd", None),
                 "submitted-x": ("submitted", "x"), "submitted-inf": ("submitted", "Infinity"),
                 "submitted-huge": ("submitted", 10 ** 400),
                 "requeues-x": ("requeues", "x"), "restart_of-number": ("restart_of", 5),
                 "user-number": ("user", 5), "no-script": ("script", KeyError),
                 "after-string": ("after", "12"), "after-ids": ("after", [5]),
                 "retries-x": ("retries", "x"), "retry_of-list": ("retry_of", [])},
    "run.json": {"empty-object": {}, "host-number": ("host", 5),
                 "host-words": ("host", "a host; rm -rf"), "gpus-x": ("gpus", "x"),
                 "gpus-mixed": ("gpus", [0, "x"]), "started-x": ("started", "x"),
                 "started-nan": ("started", "NaN"), "started-negative": ("started", -5),
                 "pgid-x": ("pgid", "x"),
                 "no-host": ("host", KeyError)},
    "end.json": {"empty-object": {}, "state-number": ("state", 5),
                 "state-bogus": ("state", "bogus"), "exit_code-x": ("exit_code", "x"),
                 "ended-x": ("ended", "x"), "signal-number": ("signal", 5),
                 "requeued_as-number": ("requeued_as", 5)},
}


def garbage_text(base_obj, g):
    """The file's text for garbage g: a whole value, or (field, value)
    changing one field of the valid base_obj (KeyError: without it;
    "NaN"/"Infinity": that JSON extension)."""
    if isinstance(g, tuple):
        field, value = g
        obj = dict(base_obj)
        if value is KeyError:
            del obj[field]
        elif value in ("NaN", "Infinity"):
            obj[field] = "@@"
            return json.dumps(obj).replace('"@@"', value)
        else:
            obj[field] = value
        return json.dumps(obj)
    if isinstance(g, (bytes, Raw)):
        return g
    return json.dumps(g)


def file_cases():
    for f, fields in FIELD_GARBAGE.items():
        for name, g in list(GARBAGE.items()) + list(fields.items()):
            yield pytest.param(f, name, g, id=f"{f}:{name}")


def state_path(root, f):
    return {"next_id": root.p("state", "next_id"),
            "hosts.json": root.p("state", "hosts.json"),
            "placements.json": root.p("state", "placements.json"),
            "active": root.p("jobs", "active", J_GPU),
            "cpu": root.p("jobs", "cpu", J_CPU),
            "done": root.p("jobs", "done", ME),
            "lost": root.p("jobs", "lost", J_CPU),
            "job.json": root.p("jobs", "backend", J_GPU, "job.json"),
            "run.json": root.p("jobs", "backend", J_RUN, "run.json"),
            "end.json": root.p("jobs", "backend", J_DONE, "end.json")}[f]


def valid_obj(root, f):
    if f == "job.json":
        return spec(root.b, J_GPU)
    if f == "run.json":
        return run_json()
    if f == "end.json":
        return end_json()
    return {}


# The file, as a warning names it
NEEDLE = {"next_id": "next_id", "hosts.json": "hosts.json", "placements.json": "placements",
          "active": f"active/{J_GPU}", "cpu": None, "done": f"done/{ME}", "lost": f"lost/{J_CPU}",
          "job.json": f"{J_GPU}/job.json", "run.json": f"{J_RUN}/run.json",
          "end.json": f"{J_DONE}/end.json"}
# Files shared by the whole cluster that a newer dq wrote: refused, with
# the advice to upgrade (the rest are skipped with a warning)
NEWER_REFUSED = {"next_id", "placements.json"}


def schedule_places(root, want, needle=None):
    """A pass goes on and starts the queued jobs in `want`."""
    r = root.run("schedule", "--once")
    carried_on(r, *([needle] if needle else []))
    assert want <= root.launched(), (root.launched(), r.stdout, r.stderr)
    assert J_RUN not in root.launched()     # never started twice
    return r


@pytest.mark.parametrize("f,name,g", list(file_cases()))
def test_corrupt_state_file(root, f, name, g):
    path = state_path(root, f)
    write(path, garbage_text(valid_obj(root, f), g), mode=0o666 if "state" in path else 0o644)
    needle = NEEDLE[f]
    if name == "format-newer" and f in NEWER_REFUSED:
        probe = ("submit", "ok.sh") if f == "next_id" else ("schedule", "--once")
        refused_unchanged(root, *probe, needles=[needle, "newer dq", "upgrade"],
                          DQ_GPUS="0")
        return
    if f == "next_id":
        r = root.run("submit", "ok.sh", DQ_GPUS="0")
        carried_on(r, needle)
        assert f"Job ID: '{NEXT}-{ME}'" in r.stdout     # one past the highest job
        assert {J_GPU, J_CPU, f"{NEXT}-{ME}"} <= root.launched()
    elif f == "hosts.json":
        r = root.run("submit", "ok.sh")
        carried_on(r, needle)
        assert f"Job ID: '{NEXT}-{ME}'" in r.stdout
        schedule_places(root, {J_GPU, J_CPU, f"{NEXT}-{ME}"})
        assert json.load(open(path))["seen"][HOST]["gpus"] == 4     # written anew
    elif f == "placements.json":
        assert set(root.jobs()) >= {J_RUN, J_GPU, J_CPU}
        r = root.run("free")
        carried_on(r, needle)
        assert r.stdout == f"{HOST}: 3 2 1\n"      # GPU 0 is the running job's
        schedule_places(root, {J_GPU, J_CPU}, needle)
        assert root.jobs()[J_RUN]["state"] == "running"
    elif f == "cpu":
        schedule_places(root, {J_GPU, J_CPU})
    elif f == "active":
        schedule_places(root, {J_CPU}, needle)
        assert set(root.jobs()) >= {J_RUN, J_GPU, J_CPU}
    elif f == "done":
        r = root.run("jobs", "summary", "--json")
        carried_on(r, needle)
        assert json.loads(r.stdout)["completed"] == 1
    elif f == "lost":
        listed = root.jobs()
        assert J_CPU not in listed and {J_RUN, J_GPU} <= set(listed)
        schedule_places(root, {J_GPU})
        done = root.jobs("complete")
        assert done[J_CPU]["state"] == "lost" and done[J_DONE]["state"] == "done"
    elif f == "job.json":
        r = root.run("jobs", "-a", "--json")
        carried_on(r, needle)
        assert J_RUN in r.stdout
        assert set(root.jobs()) >= {J_RUN, J_CPU}
        schedule_places(root, {J_CPU})
        refused(root.run("kill", SHORT(J_GPU)), f"no job {SHORT(J_GPU)}")
    elif f == "run.json":
        r = root.run("jobs", "-a")
        carried_on(r, needle)
        assert set(root.jobs()) >= {J_RUN, J_GPU, J_CPU}
        r = root.run("tail", SHORT(J_RUN))
        carried_on(r)
        assert r.stdout == "line 1\nline 2\nline 3\n"
        schedule_places(root, {J_GPU, J_CPU})
    elif f == "end.json":
        r = root.run("jobs", "complete", "-a")
        carried_on(r, needle)
        assert J_DONE in r.stdout
        assert root.jobs("complete")[J_DONE]["state"] in ("done", "failed")
        carried_on(root.run("tail", SHORT(J_DONE)))
        r = root.run("restart", SHORT(J_DONE), DQ_GPUS="0")
        carried_on(r)
        assert f"Job ID: '{NEXT}-{ME}'" in r.stdout


@pytest.mark.parametrize("name", ["not-json", "table"])
def test_job_wrapper_goes_on_past_a_corrupt_hosts_json(root, name):
    """A job's end hands its GPUs over with a poll of its host that reads
    the GPU table in hosts.json (poll_handover)."""
    g = GARBAGE.get(name) or FIELD_GARBAGE["hosts.json"][name]
    write(root.p("state", "hosts.json"), garbage_text({}, g), mode=0o666)
    # placed and being launched, as a pass leaves it for its wrapper
    path = root.p("state", "placements.json")
    places = json.load(open(path)) if os.path.exists(path) else {"format": 1, "jobs": {}}
    places["jobs"][J_GPU] = {"user": ME, "host": HOST, "gpus": [1], "state": "launching",
                             "since": time.time()}
    write(path, json.dumps(places), mode=0o666)
    r = root.run("_run", J_GPU, HOST, "1")      # runs ok.sh, which says ok
    carried_on(r, "hosts.json")
    assert root.jobs("complete")[J_GPU]["state"] == "done"
    assert J_CPU in root.launched()


# Names in the indexes that are not what dq writes there
BAD_NAMES = [
    ("active", "junk", {"format": 1, "gpus": 1}),
    ("active", f"99-{ME}", {"format": 1, "gpus": 1, "submitted": 1.0}),   # no such job
    ("active", "98-nosuchuserxyz", {"format": 1, "gpus": 1}),
    ("active", f"97-{ME}", "dir"),
    ("active", f"96-{ME}", "symlink"),
    ("active", f"95-{ME}\n", {"format": 1, "gpus": 1}),
    ("cpu", "junk", {}),
    ("cpu", f"99-{ME}", {}),
    ("cpu", J_GPU, {}),     # a GPU job's entry in cpu/: not a CPU-only job
    ("backend", "junk", "dir"),
    ("backend", f"99-{ME}", "dir"),             # an empty job directory
    ("lost", "junk", {"format": 1}),
    (f"queue/{ME}", "junk", {}),
    (f"queue/{ME}", f"{SHORT(J_GPU)}_1_-_0_0_x", {}),
    (f"queue/{ME}", "99_1_-_0_0", {}),                # no such job
    (f"queue/{ME}", f"{SHORT(J_GPU)}_1_-_0_99999999999999999999", {}),
    ("queue", "nosuchuserxyz", "dir"),
    ("queue", "junk", {}),
    ("done", "nosuchuserxyz", {"format": 1, "done": "x"}),
]


@pytest.mark.parametrize("index,name,content", BAD_NAMES,
                         ids=lambda x: repr(x)[:30] if not isinstance(x, dict) else "")
def test_bad_index_entries(root, index, name, content):
    path = root.p("jobs", index, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if content == "dir":
        os.mkdir(path)
    elif content == "symlink":
        os.symlink("/etc/hostname", path)
    else:
        write(path, content)
    listed = root.jobs()
    assert {J_RUN, J_GPU, J_CPU} <= set(listed)
    r = schedule_places(root, {J_GPU, J_CPU})
    assert re.search(f"Executing '{J_GPU}' on {HOST}/[1-3] ", r.stdout)  # with a GPU
    assert set(root.jobs("complete")) >= {J_DONE}
    r = root.run("jobs", "summary", "-a")
    check_lines(r)
    assert r.returncode == 0


@root_only
def test_drains_only_by_admins_and_bad_drain_files(root):
    """OTHER is no admin (ME owns the data root, and there is no dq.conf):
    refused in one line, and a drain file OTHER writes, under any name, is
    ignored with a warning; a corrupt one of ours too."""
    refused_unchanged(root, "drain", HOST, user=OTHER, needles=["only admins", "admins ="])
    drained = {"format": 1, "hosts": {HOST: {"drained": True, "since": 2e9}}}
    write(root.p("drain", OTHER), drained, owner=OTHER)
    r = schedule_places(root, {J_GPU, J_CPU}, "not an admin")
    for name, text in ((ME, "{"), (ME, {"format": 1, "hosts": []}),
                       (ME, {"format": 1, "hosts": {HOST: {"drained": "yes", "since": 1}}})):
        write(root.p("drain", name), text)
        r = root.run("drain")
        check_lines(r)
        assert r.returncode == 0 and r.stdout == "No host is drained\n", r.stdout


def test_doctor_on_a_machine_alone(root):
    r = root.run("doctor")
    check_lines(r)
    assert r.returncode == 0 and "no hosts in dq.conf" in r.stdout, r.stdout + r.stderr
    assert "permissions" in r.stdout and "0 failed" in r.stdout


def test_drain_by_the_data_roots_owner(root):
    r = root.run("drain", HOST, "-r", "fan")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"Drained {HOST} (fan)\n", "")
    assert root.run("free").stdout == f"{HOST}: drained (fan)\n"
    r = root.run("schedule", "--once")
    assert J_GPU not in root.launched() and J_CPU not in root.launched(), r.stderr
    assert root.jobs("queue")[J_GPU]["reason"] == "drained"
    r = root.run("drain", "--undo", HOST)
    assert (r.returncode, r.stdout) == (0, f"Undrained {HOST}\n")
    schedule_places(root, {J_GPU, J_CPU})


@root_only
def test_index_entry_owned_by_someone_else_is_ignored(root):
    """An entry of ours that OTHER made (forged) does not queue anything."""
    write(root.p("jobs", "active", f"99-{ME}"), {"format": 1, "gpus": 1}, owner=OTHER)
    write(root.p("jobs", "done", ME), {"format": 1, "done": 1000}, owner=OTHER)
    schedule_places(root, {J_GPU, J_CPU})
    assert f"99-{ME}" not in root.launched()
    r = root.run("jobs", "summary", "--json")
    assert json.loads(r.stdout)["completed"] == 1


@pytest.mark.parametrize("path,needle", [("/etc/hostname", "not a directory"),
                                         ("/proc/1/nonexistent", "cannot create")])
def test_data_root_that_cannot_be(root, path, needle):
    refused(root.run("jobs", DQ_ROOT=path), needle)


def test_lock_file_that_is_a_directory(root):
    os.unlink(root.p("state", "lock"))
    os.mkdir(root.p("state", "lock"))
    refused_unchanged(root, "schedule", "--once", needles=["state/lock"])


# ------------------------------------------------------------------ permissions

@pytest.fixture(scope="module")
def group_install(base):
    """An install shared by GROUP (install.sh DIR GROUP) with one finished
    job, for OTHER, who is not in GROUP."""
    if not IS_ROOT:
        pytest.skip("needs root")
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "-f", GROUP], check=True, capture_output=True)
    d = os.path.join(base["dir"], "group-install")
    subprocess.run([os.path.join(REPO, "install.sh"), d, GROUP], check=True,
                   capture_output=True, env=dict(os.environ, PATH=PATH))
    seed_job(d, base, J_DONE, run=run_json(), end=end_json())
    return d


@root_only
@pytest.mark.parametrize("args", [("jobs",), ("jobs", "-a", "complete"), ("submit", "ok.sh"),
                                  ("kill", SHORT(J_DONE)), ("tail", SHORT(J_DONE)),
                                  ("tail", J_DONE), ("restart", J_DONE),
                                  ("schedule", "--once"), ("free",)], ids=" ".join)
def test_group_install_used_by_an_outsider(base, group_install, args):
    before = snapshot(group_install)
    env = dq_env(base, None, DQ_GPUS="0")
    r = subprocess.run(["setpriv", "--reuid", OTHER, "--regid", OTHER, "--init-groups",
                        os.path.join(group_install, "bin", "dq-" + args[0]), *args[1:]],
                       capture_output=True, text=True, cwd=base["work"], env=env, timeout=30)
    refused(r, f"group '{GROUP}'")
    assert snapshot(group_install) == before


@root_only
def test_a_lock_another_user_created_a_moment_ago(root):
    # The first commands of a new install, by two users at once: the lock
    # file is created with its creator's umask (0644) and chmod'ed to 0666
    # a moment later.  The other user waits for that, and when it never
    # comes, gets one line saying how to fix the mode.
    import threading
    lock = root.p("state", "lock")
    with open(lock, "w"):
        pass
    os.chmod(lock, 0o644)
    later = threading.Timer(0.05, os.chmod, (lock, 0o666))
    later.start()
    r = root.run("schedule", "--once", "--quiet", user=OTHER)
    later.join()
    assert r.returncode == 0, r.stderr
    check_lines(r)
    os.chmod(lock, 0o644)
    refused(root.run("schedule", "--once", "--quiet", user=OTHER),
            "cannot open the lock", f"chmod 666 {lock}")
