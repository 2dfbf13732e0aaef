"""Multi-user safety end to end: owners from the file system, forged jobs
refused, no shell injection, permissions of the data root, bad input."""
import json
import os
import pwd
import stat
import subprocess

from dqtest import ALICE, BOB, configure, job, jobs, script, submit, wait_state


def as_user(user, fn):
    """Run fn() in a child process with user's uid (for writing files as them)."""
    pid = os.fork()
    if pid == 0:
        try:
            pw = pwd.getpwnam(user)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def test_forged_jobs_are_never_run(cluster, dq):
    configure(dq, ["node1"], poll_interval=0.5)
    d, evil = script(cluster, BOB, "evil.sh", "touch /tmp/forged-$(id -un)\n")
    backend = os.path.join(dq.root, "jobs", "backend")
    active = os.path.join(dq.root, "jobs", "active")
    spec = {"format": 1, "script": evil, "cwd": d, "env": {}, "gpus": 1,
            "submitted": 1.0}

    def forge():
        # 1) a job named as Alice's, in a directory Bob made
        os.mkdir(os.path.join(backend, "900-dqalice"))
        with open(os.path.join(backend, "900-dqalice", "job.json"), "w") as f:
            json.dump(dict(spec, id="900-dqalice", user=ALICE), f)
        with open(os.path.join(active, "900-dqalice"), "w") as f:
            json.dump({"format": 1, "gpus": 1, "submitted": 1.0}, f)
        # 2) Bob's own job whose JSON claims to be Alice's
        os.mkdir(os.path.join(backend, "901-dqbob"))
        with open(os.path.join(backend, "901-dqbob", "job.json"), "w") as f:
            json.dump(dict(spec, id="901-dqbob", user=ALICE), f)
        with open(os.path.join(active, "901-dqbob"), "w") as f:
            json.dump({"format": 1, "gpus": 1, "submitted": 1.0}, f)
    os.makedirs(backend, exist_ok=True)
    assert as_user(BOB, forge)
    # passes by both users, and Alice's own job to show the queue works
    _, fine = script(cluster, ALICE, "fine.sh", "echo fine\n")
    a, _ = submit(dq, "node1", ALICE, fine)
    dq.run("node1", BOB, "schedule", "--once")
    dq.run("node1", ALICE, "schedule", "--once")
    wait_state(dq, a, "done")
    r = cluster.run("node1", "root", "ls /tmp")
    assert "forged" not in r.stdout
    listed = {j["id"] for j in jobs(dq)} | {j["id"] for j in jobs(dq, view="complete")}
    assert "900-dqalice" not in listed and "901-dqbob" not in listed
    r = dq.run("node1", ALICE, "kill", "900")
    assert r.returncode == 1 and "no job 900" in r.stderr
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert "belongs to 'dqbob'" in r.stderr


def test_no_shell_injection_anywhere(cluster, dq):
    configure(dq, ["node2"])
    nasty_dir = "we ird 'dir' $(touch INJ1) `touch INJ2`"
    d, path = script(cluster, ALICE, "my script; touch INJ3.sh",
                     'printf "%s|" "$DQ_NASTY" "$(pwd)" > out\n', subdir=nasty_dir)
    value = "a 'b' \"c\" $(touch INJ4) `touch INJ5` ; touch INJ6\nline2 $HOME \\"
    job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_NASTY": value}, cwd=d)
    wait_state(dq, job_id, "done")
    with open(os.path.join(d, "out")) as f:
        assert f.read() == f"{value}|{d}|"
    for root, dirs, files in os.walk(cluster.base):
        assert not [f for f in files if f.startswith("INJ")], (root, files)
    assert job(dq, job_id)["env"] == {"DQ_NASTY": value}
    r = dq.run("node1", ALICE, "on-all", "printf", "%s", "$(touch INJ7)")
    assert r.stdout.splitlines()[0].endswith(": $(touch INJ7)")
    for root, dirs, files in os.walk(cluster.base):
        assert not [f for f in files if f.startswith("INJ")], (root, files)


def test_bad_host_names_in_config_are_refused(cluster, dq):
    with open(os.path.join(dq.root, "dq.conf"), "w") as f:
        f.write("[dq]\nhosts = node1 node2;touch${IFS}x\n")
    r = dq.run("node1", ALICE, "free")
    assert r.returncode == 1 and "bad host name" in r.stderr


def test_data_root_permissions(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "s.sh", "echo secret-ish\n")
    a, _ = submit(dq, "node1", ALICE, path)
    wait_state(dq, a, "done")
    for sub in ("jobs/backend", "jobs/active", "jobs/lost", "sched"):
        mode = os.stat(os.path.join(dq.root, sub)).st_mode
        assert mode & stat.S_ISVTX, sub          # sticky: nobody removes others' entries
    jd = os.path.join(dq.root, "jobs", "backend", a)
    assert os.stat(jd).st_uid == pwd.getpwnam(ALICE).pw_uid
    # Bob can read Alice's log (lab-readable) but not change or remove her job
    assert dq.run("node1", BOB, "logs", a).stdout == "secret-ish\n"
    for cmd in (["rm", "-rf", jd], ["sh", "-c", f"echo x > {jd}/end.json"],
                ["mv", jd, jd + ".x"]):
        r = cluster.run("node1", BOB, cmd)
        assert r.returncode != 0, cmd
    assert job(dq, a)["state"] == "done"


def test_group_install_layout(cluster, tmp_path):
    root = os.path.join(cluster.base, "grouped")
    subprocess.run(["groupadd", "-f", "dqlab"], check=True)
    r = subprocess.run(["make", "-C", os.path.dirname(os.path.dirname(__file__)), "install",
                        f"PREFIX={root}", "GROUP=dqlab", "DESTDIR="], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    gid = __import__("grp").getgrnam("dqlab").gr_gid
    for sub, sticky in (("state", False), ("jobs/backend", True), ("jobs/active", True)):
        st = os.stat(os.path.join(root, sub))
        assert st.st_gid == gid and st.st_mode & stat.S_ISGID, sub
        assert bool(st.st_mode & stat.S_ISVTX) == sticky, sub
        assert not st.st_mode & stat.S_IWOTH, sub        # not world-writable
    assert os.readlink(os.path.join(root, "bin", "dq-submit")) == "../dq.py"
    r = subprocess.run(["make", "-C", os.path.dirname(os.path.dirname(__file__)), "uninstall",
                        f"PREFIX={root}"], capture_output=True, text=True)
    assert r.returncode == 0 and not os.path.exists(os.path.join(root, "dq.py"))
    assert os.path.isdir(os.path.join(root, "jobs", "backend"))   # jobs kept



def test_bytecode_cache_is_not_writable_and_a_patch_takes_effect_at_once(cluster, dq):
    """The commands run dq from __pycache__/ (see dq.py's first line): users
    must not be able to write it (a pyc is code every user runs), and an
    admin's in-place patch of dq.py must never be shadowed by stale bytecode."""
    cache = os.path.join(dq.root, "__pycache__")
    pycs = [os.path.join(cache, f) for f in os.listdir(cache)]
    assert pycs and all(os.path.basename(f).startswith("dq.cpython-") for f in pycs)
    assert not os.stat(cache).st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    with open(pycs[0], "rb") as f:
        assert int.from_bytes(f.read(8)[4:], "little") == 3    # checked-hash pyc
    r = cluster.run("node1", ALICE, ["sh", "-c", f"echo x > {cache}/dq.x.pyc"])
    assert r.returncode != 0
    assert dq.run("node1", ALICE, "jobs", "--version").stdout.strip().startswith("dq ")
    src = os.path.join(dq.root, "dq.py")
    with open(src) as f:
        text = f.read()
    with open(src, "w") as f:
        f.write(text.replace("__version__ = \"", "__version__ = \"9.9-patched-"))
    r = dq.run("node1", ALICE, "jobs", "--version")
    assert r.stdout.strip().startswith("dq 9.9-patched-"), r.stdout + r.stderr
    r = dq.run("node1", BOB, "jobs")
    assert r.returncode == 0, r.stderr

BAD_INPUT = [
    ("kill", []), ("kill", ["99999"]), ("kill", ["abc"]), ("kill", ["1-bad user"]),
    ("kill", ["--json", "1"]), ("restart", []), ("restart", ["12x"]),
    ("jobs", ["bogus"]), ("jobs", ["queue", "extra"]), ("free", ["extra"]),
    ("tail", []), ("tail", ["1", "--json"]), ("head", ["1", "-n", "x"]),
    ("logs", ["99999"]), ("grep", ["1"]), ("attach", []), ("attach", ["99999"]),
    ("users", ["--bogus"]), ("schedule", ["--bogus"]), ("submit", ["--json", "x"]),
    ("on-all", ["--timeout", "abc", "true"]),
]


def test_bad_input_gets_one_clear_line_and_changes_nothing(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "s.sh", "true\n")
    a, _ = submit(dq, "node1", ALICE, path)
    wait_state(dq, a, "done")
    before = sorted(os.listdir(os.path.join(dq.root, "jobs", "backend")))
    for cmd, args in BAD_INPUT:
        r = dq.run("node1", ALICE, cmd, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0, (cmd, args)
        assert len(lines) == 1 and lines[0].startswith(f"dq-{cmd}: "), (cmd, args, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == "", (cmd, args)
    assert sorted(os.listdir(os.path.join(dq.root, "jobs", "backend"))) == before
    # reached by an unknown name: it lists the valid ones
    r = cluster.run("node1", ALICE, ["python3", os.path.join(dq.root, "dq.py"), "frobnicate"])
    assert r.returncode == 2 and "dq-submit" in r.stderr
