"""DQ_SNAPSHOT=1 (issue 20): a job runs from a copy of its directory taken
at submit (git's files from the repository's top, or the whole tree), so
edits made while it waits do not reach it."""
import os
import pwd
import stat

from dqtest import ALICE, configure, job, jobs, log_of, refused_at_submit, script, submit, \
    wait_state

REPORT = """echo "code v1"
cat ../data.txt helper.txt
echo "cwd=$(pwd)"
echo "submit=$DQ_SUBMIT_DIR"
echo out > result.txt
"""


def write_as(user, path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)


def git(cluster, user, repo, *args):
    r = cluster.run("node1", user, ["git", "-c", "user.name=t", "-c", "user.email=t@example.org",
                                    *args], cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_a_waiting_job_runs_the_files_of_submit_time(cluster, dq):
    configure(dq, ["node1"])
    cluster.set_gpus("node1", 1)
    holder = cluster.hold_gpu("node1", "dqbob", 0)      # every GPU busy: the job waits
    repo = cluster.user_dir(ALICE, "snap-repo")
    d, path = script(cluster, ALICE, "run.sh", REPORT, subdir="snap-repo/train")
    write_as(ALICE, os.path.join(repo, "data.txt"), "data v1\n")
    write_as(ALICE, os.path.join(d, "helper.txt"), "helper v1\n")
    write_as(ALICE, os.path.join(repo, ".gitignore"), "*.ckpt\n")
    git(cluster, ALICE, repo, "init", "-q")
    git(cluster, ALICE, repo, "add", ".")
    git(cluster, ALICE, repo, "commit", "-qm", "v1")
    # what the snapshot takes besides: a modified file as it is now, a new
    # file git does not ignore; not an ignored one
    write_as(ALICE, os.path.join(d, "helper.txt"), "helper v1, edited before submit\n")
    write_as(ALICE, os.path.join(repo, "notes.txt"), "new\n")
    write_as(ALICE, os.path.join(repo, "model.ckpt"), "ignored\n")
    job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_SNAPSHOT": "1"}, cwd=d)
    assert "is queued" in r.stderr, r.stdout + r.stderr
    # edits after dq-submit: the script, a file in the job's directory, one above it
    write_as(ALICE, path, "#!/bin/sh\necho 'code v2'\n", mode=0o755)
    write_as(ALICE, os.path.join(repo, "data.txt"), "data v2\n")
    write_as(ALICE, os.path.join(d, "helper.txt"), "helper v2\n")
    assert job(dq, job_id)["state"] == "queued"
    cluster.run("node1", "dqbob", ["kill", str(holder)], check=True)
    j = wait_state(dq, job_id, "done", timeout=30)
    snap = os.path.join(dq.root, "jobs", "backend", job_id, "snapshot")
    assert log_of(dq, job_id).splitlines() == [
        "code v1", "data v1", "helper v1, edited before submit",
        f"cwd={snap}/train", f"submit={d}"]
    assert j["script"] == path and j["cwd"] == d        # listed as submitted
    files = {".gitignore": 7, "data.txt": 8, "notes.txt": 4, "train/run.sh": len(REPORT) + 10,
             "train/helper.txt": 32}
    assert j["snapshot"] == {"files": 5, "bytes": sum(files.values()), "dir": snap,
                             "top": repo, "git": True}
    uid = pwd.getpwnam(ALICE).pw_uid
    for rel, size in files.items():
        st = os.lstat(os.path.join(snap, rel))
        assert (st.st_size, st.st_uid) == (size, uid), rel
    assert os.stat(os.path.join(snap, "train/run.sh")).st_mode & 0o111 == 0o111
    assert not os.path.exists(os.path.join(snap, "model.ckpt"))
    assert not os.path.exists(os.path.join(snap, ".git"))
    assert not [n for n in os.listdir(os.path.dirname(snap)) if "tmp" in n]
    # its output went to the copy, not to the repository
    assert os.path.exists(os.path.join(snap, "train/result.txt"))
    assert not os.path.exists(os.path.join(d, "result.txt"))
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert "Snapshot" in r.stdout and f"5 files {sum(files.values())}B" in r.stdout, r.stdout

    # dq-restart runs the same snapshot again (not today's files); no new copy
    r = dq.run("node1", ALICE, "restart", job_id)
    assert r.returncode == 0, r.stderr
    again = r.stdout.split("'")[1]
    a = wait_state(dq, again, "done", timeout=30)
    assert log_of(dq, again).splitlines()[:3] == [
        "code v1", "data v1", "helper v1, edited before submit"]
    assert a["snapshot"]["dir"] == snap and a["restart_of"] == job_id
    assert not os.path.exists(os.path.join(dq.root, "jobs", "backend", again, "snapshot"))


def test_a_plain_directory_and_a_sweep_share_one_snapshot(cluster, dq):
    configure(dq, ["node1", "node2"])
    d, path = script(cluster, ALICE, "s.sh",
                     'echo "x=$DQ_X $(cat conf.txt) $(cat link) $(cat deep/er/file) $(pwd)"\n',
                     subdir="snap-plain")
    write_as(ALICE, os.path.join(d, "conf.txt"), "conf v1\n")
    write_as(ALICE, os.path.join(d, "deep/er/file"), "deep\n", mode=0o600)
    os.symlink("conf.txt", os.path.join(d, "link"))
    os.mkfifo(os.path.join(d, "pipe"))      # a special file: not copied
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_X=1,2,3", path, cwd=d,
               env={"DQ_SNAPSHOT": "1"})
    assert r.returncode == 0, r.stderr
    ids = [line.split("'")[1] for line in r.stdout.splitlines() if line.startswith("Job ID")]
    assert len(ids) == 3
    write_as(ALICE, os.path.join(d, "conf.txt"), "conf v2\n")
    snap = os.path.join(dq.root, "jobs", "backend", ids[0], "snapshot")
    for i, job_id in enumerate(ids, 1):
        j = wait_state(dq, job_id, "done", timeout=30)
        assert log_of(dq, job_id).strip() == f"x={i} conf v1 conf v1 deep {snap}"
        assert j["snapshot"] == {"files": 4, "bytes": os.path.getsize(path) + 8 + 5,
                                 "dir": snap, "top": d, "git": False}
    # one copy, in the sweep's first job
    assert [i for i in ids if os.path.exists(os.path.join(dq.root, "jobs", "backend", i,
                                                          "snapshot"))] == [ids[0]]
    assert os.readlink(os.path.join(snap, "link")) == "conf.txt"
    assert stat.S_IMODE(os.stat(os.path.join(snap, "deep/er/file")).st_mode) == 0o600
    assert not os.path.lexists(os.path.join(snap, "pipe"))


def test_snapshot_refusals(cluster, dq):
    configure(dq, ["node1"], snapshot_max="1M")
    d, path = script(cluster, ALICE, "s.sh", "exit 0\n", subdir="snap-big")
    write_as(ALICE, os.path.join(d, "weights.bin"), "x" * (2 * 1024 * 1024))
    refused_at_submit(dq, path, [
        ({"DQ_SNAPSHOT": "1"}, ["DQ_SNAPSHOT", f"snapshot of {d}", "2M", "snapshot_max (1M",
                                "dq.conf"]),
        ({"DQ_SNAPSHOT": "yes"}, ["DQ_SNAPSHOT='yes'", "DQ_SNAPSHOT=1"]),
        ({"DQ_SNAPSHOT": "2"}, ["DQ_SNAPSHOT='2'"])])
    # nothing queued, no job directory, no copy begun
    assert not os.listdir(os.path.join(dq.root, "jobs", "backend"))
    assert not [j for j in jobs(dq)]
    # an unreadable file: one line naming it
    write_as(ALICE, os.path.join(d, "weights.bin"), "x", mode=0o000)
    refused_at_submit(dq, path, [({"DQ_SNAPSHOT": "1"}, [f"{d}/weights.bin", "cannot read"])])
    assert not os.listdir(os.path.join(dq.root, "jobs", "backend"))
    # DQ_SNAPSHOT=0 and a snapshot within the limit are fine
    os.unlink(os.path.join(d, "weights.bin"))
    for value in ("0", "1"):
        job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SNAPSHOT": value})
        assert (wait_state(dq, job_id, "done")["snapshot"] is None) == (value == "0")
