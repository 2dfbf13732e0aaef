"""The README's set-up lines, run as written by a new user, and install.sh's
checks before it installs anything.

A fresh plain user (dqnewbie) with an empty home directory gets a copy of
the source, as a clone would give them, and runs the first block under
"## Set up" in README.md with bash, from that copy, with a PATH that holds
no nvidia-smi: a machine without GPUs and without a lab group. Its first
job must end `done`, and its log must say hello.

No simulated cluster (the `cluster` and `dq` fixtures): dq runs on this
machine alone, as it does for that user. Needs root (to create the user),
GNU screen and make; skipped without them, except with CI=true, where the
test fails instead. Every process of the user is killed afterwards.
"""
import fcntl
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
USER = "dqnewbie"                       # not a user of the test cluster
HOME = "/home/" + USER
LOCK = "/var/tmp/dq-test-setup.lock"
PATH = "/usr/local/bin:/usr/bin:/bin"   # a plain user's PATH
NO_SUCH_GROUP = "dqnosuchgroup"


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail("test_setup cannot run on CI: " + reason, pytrace=False)
    pytest.skip(reason)


def setup_block():
    """The lines of the first code block under "## Set up" in README.md
    (fenced, or else indented after a blank line), as a user would paste them."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    m = re.search(r"^## Set up\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, 'README.md has no "## Set up" section'
    section = m.group(1)
    fenced = re.search(r"^```[a-z]*\n(.*?)^```", section, re.M | re.S)
    indented = re.search(r"\n\n((?:    .*\n)+)", section)
    first = min((b for b in (fenced, indented) if b), key=lambda b: b.start(), default=None)
    assert first, 'no code block under "## Set up" in README.md'
    if first is fenced:
        return fenced.group(1)
    return "".join(line[4:] + "\n" for line in indented.group(1).splitlines())


def _uid_pids(uid):
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(name))
                        break
        except OSError:
            pass
    return pids


def kill_user_processes(uid, timeout=10):
    """SIGKILL, one by one, every process of the test user (the scheduler
    loop, screen sessions, jobs) until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _uid_pids(uid)
        if not pids:
            return
        assert time.monotonic() < deadline, f"processes of {USER} will not die: {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _clean(pw):
    kill_user_processes(pw.pw_uid)
    for d in (pw.pw_dir, f"/run/screen/S-{USER}", f"/var/run/screen/S-{USER}"):
        shutil.rmtree(d, ignore_errors=True)


def _source_files():
    """What a clone of the repository holds: git's tracked files and the new
    ones it does not ignore; the whole tree when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(REPO, p))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for top, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in (".git", "__pycache__", ".pytest_cache")]
            files += [os.path.relpath(os.path.join(top, n), REPO) for n in names]
        return files


@pytest.fixture
def newbie():
    """A plain user with a fresh, empty home directory."""
    if os.geteuid() != 0:
        _unavailable("needs root (creates the user %s)" % USER)
    if not shutil.which("useradd"):
        _unavailable("useradd is not installed")
    for tool in ("python3", "screen", "make", "bash", "hostname"):
        if not shutil.which(tool, path=PATH):
            _unavailable(f"{tool} is not installed (in {PATH})")
    if shutil.which("nvidia-smi", path=PATH):
        _unavailable("this machine has nvidia-smi: not a machine without GPUs")
    # One test run at a time uses the user (two pytest runs may overlap).
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "-M", "-d", HOME, "-s", "/bin/bash", USER],
                           check=True, capture_output=True)
            pw = pwd.getpwnam(USER)
        # Its home is wiped before and after: it must be the one made here.
        assert pw.pw_uid != 0 and pw.pw_dir == HOME, f"unexpected user {pw}"
        _clean(pw)
        os.makedirs(pw.pw_dir, mode=0o755)
        os.chown(pw.pw_dir, pw.pw_uid, pw.pw_gid)
        os.chmod(pw.pw_dir, 0o755)
        try:
            yield pw
        finally:
            _clean(pw)


def run_as(pw, script, cwd, timeout=20):
    """bash running `script` as the user, in a plain user's environment."""
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
           "SHELL": "/bin/bash", "PATH": PATH, "LANG": "C.UTF-8", "TERM": "xterm"}
    return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-x", "-c", script],
                          cwd=cwd, env=env, user=pw.pw_uid, group=pw.pw_gid,
                          extra_groups=[], capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def clone_for(pw):
    """The source in ~/dq, as `git clone` would leave it, owned by the user."""
    dest = os.path.join(pw.pw_dir, "dq")
    for rel in _source_files():
        path = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), path)
    for top, dirs, files in os.walk(dest):
        for name in [top] + [os.path.join(top, n) for n in dirs + files]:
            os.lchown(name, pw.pw_uid, pw.pw_gid)
    return dest


def test_readme_setup_runs_a_first_job(newbie):
    block = setup_block()
    assert "../shared" not in open(os.path.join(REPO, "README.md")).read()
    src = clone_for(newbie)
    # The block as pasted, then what the user would look at next.
    script = block + "\necho @@after-setup@@\ndq-logs 1\n"
    r = run_as(newbie, script, src)
    said = f"\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}"
    assert r.returncode == 0, "a set-up line failed" + said
    setup_out, _, log = r.stdout.partition("@@after-setup@@\n")
    assert f"Job ID: '1-{USER}'" in setup_out, said
    assert re.search(rf"^1-{USER}\s+\S+\s+-\s+done\s+0\s", setup_out, re.M), \
        "dq-jobs complete does not show the first job done" + said
    assert re.fullmatch(r"hello from \S+ on GPU \S*\n", log), said
    assert "Traceback" not in r.stderr, said
    # make install put the completion where bash-completion looks for it
    completions = os.path.join(newbie.pw_dir, ".local/share/bash-completion/completions")
    assert os.path.realpath(os.path.join(completions, "dq-kill")) == \
        os.path.join(newbie.pw_dir, "dq-local/share/bash-completion/completions/dq.bash")


def _installed(path):
    return os.path.lexists(path)


def test_install_refuses_a_missing_group_and_installs_nothing(newbie):
    try:
        grp.getgrnam(NO_SUCH_GROUP)
        pytest.skip(f"group {NO_SUCH_GROUP} exists here")
    except KeyError:
        pass
    src = clone_for(newbie)
    target = os.path.join(newbie.pw_dir, "lab", "dq")
    r = run_as(newbie, f"./install.sh {target} {NO_SUCH_GROUP}", src)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if not ln.startswith("+ ")]  # less bash -x
    assert len(err) == 1 and NO_SUCH_GROUP in err[0] and "install.sh" in err[0], r.stderr
    assert not _installed(os.path.join(newbie.pw_dir, "lab")), os.listdir(newbie.pw_dir)
    # make install says the same, and installs nothing either.
    r = run_as(newbie, f"make install PREFIX={target} GROUP={NO_SUCH_GROUP}", src)
    assert r.returncode != 0 and f"no group '{NO_SUCH_GROUP}'" in r.stderr, r.stderr
    assert not _installed(os.path.join(newbie.pw_dir, "lab"))


@pytest.mark.parametrize("case", ["unwritable", "not-a-dir", "not-in-group"])
def test_install_refuses_what_it_cannot_finish(newbie, case):
    """Checked before anything is written: one line on stderr, exit 1."""
    src = clone_for(newbie)
    home = newbie.pw_dir
    if case == "unwritable":
        target, group, check = "/usr/local/dq-setup-test/dq", "", "/usr/local/dq-setup-test"
    elif case == "not-a-dir":
        target, group, check = os.path.join(src, "README.md", "dq"), "", None
    else:
        other = grp.getgrgid(0).gr_name        # root's group: a plain user is not in it
        target, group, check = os.path.join(home, "shared-dq"), other, os.path.join(home, "shared-dq")
    before = sorted(os.listdir(home))
    r = run_as(newbie, f"./install.sh {target} {group}", src)
    err = [ln for ln in r.stderr.splitlines() if not ln.startswith("+ ")]
    assert r.returncode == 1 and len(err) == 1 and err[0].startswith("install.sh: "), r.stderr
    assert sorted(os.listdir(home)) == before
    if check:
        assert not _installed(check)


def test_install_twice_upgrades_in_place(newbie):
    """Re-running the install (an upgrade) keeps the jobs and succeeds."""
    src = clone_for(newbie)
    target = os.path.join(newbie.pw_dir, "dq-local")
    own_group = grp.getgrgid(newbie.pw_gid).gr_name
    for _ in range(2):
        r = run_as(newbie, f"./install.sh {target} {own_group}", src)
        assert r.returncode == 0, r.stderr
    assert os.path.isdir(os.path.join(target, "jobs", "backend"))
    assert os.stat(os.path.join(target, "state")).st_mode & 0o7777 == 0o2770


@pytest.mark.parametrize("sub", ["jobs/queue", "drain", "sched"])
def test_upgrade_checks_every_directory_of_the_layout_first(newbie, sub):
    """An earlier install whose directory belongs to someone else: the
    upgrade refuses in one line before changing anything (it knows every
    directory dq.py lists, jobs/queue and drain/ included)."""
    src = clone_for(newbie)
    target = os.path.join(newbie.pw_dir, "dq-upgrade")
    r = run_as(newbie, f"./install.sh {target}", src)
    assert r.returncode == 0, r.stderr
    os.chown(os.path.join(target, sub), 0, 0)      # made by someone else (root)
    with open(os.path.join(target, "dq.py"), "a") as f:
        f.write("# the old one\n")
    r = run_as(newbie, f"./install.sh {target}", src)
    err = [ln for ln in r.stderr.splitlines() if not ln.startswith("+ ")]
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert os.path.join(target, sub) in err[0] and "belongs to root" in err[0], err
    with open(os.path.join(target, "dq.py")) as f:
        assert f.read().endswith("# the old one\n")     # not half-upgraded
