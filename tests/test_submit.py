"""dq-submit end to end: a job runs where dq says, as its owner, with its
directory and variables; bad submissions are refused cleanly."""
import json
import os
import re

from dqtest import ALICE, BOB, configure, job, jobs, log_of, script, submit, wait_state, \
    wait_until

REPORT = r'''
{ echo "host=$(hostname)"; echo "pwd=$(pwd)"; echo "user=$(id -un)"
  echo "DQ_FOO=$DQ_FOO"; echo "DQ_DESC=$DQ_DESC"; echo "CVD=$CUDA_VISIBLE_DEVICES"
  echo "ORDER=$CUDA_DEVICE_ORDER"; echo "JOB=$DQ_JOB_ID"; } > "report-$DQ_JOB_ID"
exec fake-cuda --hold 30
'''


def read_report(d, job_id):
    path = os.path.join(d, f"report-{job_id}")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rep = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    return rep if "JOB" in rep else None


def test_job_runs_on_its_gpu_from_submit_dir_with_dq_vars(cluster, dq):
    d, path = script(cluster, ALICE, "report.sh", REPORT, subdir="exp one")
    cluster.hold_gpu("node2", BOB, 0)       # so placement is not simply GPU 0
    configure(dq, ["node2"])
    job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_FOO": "a b $(x) 'q'",
                                                      "DQ_DESC": "first run"}, cwd=d)
    m = re.search(rf"^Executing '{job_id}' on node2/([0-9]) as {ALICE}\.\.\.$", r.stdout, re.M)
    assert m, r.stdout + r.stderr
    gpu = int(m.group(1))
    assert gpu != 0
    rep = wait_until(lambda: read_report(d, job_id), 20, what="the job's report")
    assert rep == {"host": "node2", "pwd": d, "user": ALICE, "DQ_FOO": "a b $(x) 'q'",
                   "DQ_DESC": "first run", "CVD": str(gpu), "ORDER": "PCI_BUS_ID",
                   "JOB": job_id}
    # the fake CUDA program really opened that GPU, and nvidia-smi shows it
    wait_until(lambda: f"using GPU {gpu}" in log_of(dq, job_id), 10, what="fake-cuda output")
    procs = wait_until(lambda: [p for p in cluster.gpu_processes("node2") if p[2] == ALICE],
                       10, what="the job on nvidia-smi")
    assert [p[0] for p in procs] == [gpu]
    j = job(dq, job_id)
    assert {"id", "user", "state", "host", "gpus", "script", "cwd", "env", "submitted",
            "started", "ended", "exit_code"} <= set(j)
    assert (j["state"], j["host"], j["gpus"], j["user"], j["cwd"], j["script"]) == \
        ("running", "node2", [gpu], ALICE, d, path)
    assert j["ended"] is None and j["exit_code"] is None
    assert j["submit_host"] == "node1"      # where it was submitted from
    assert j["env"]["DQ_FOO"] == "a b $(x) 'q'" and j["started"] >= j["submitted"]
    # the manual's table
    r = dq.run("node3", ALICE, "jobs")
    assert r.returncode == 0
    row = [ln for ln in r.stdout.splitlines() if ln.startswith(job_id)][0]
    assert row.split()[:3] == [job_id, "node2", str(gpu)]
    assert "DQ_DESC=first run" in row and path in row
    assert r.stdout.startswith("Active jobs: 1\n")


def test_finished_job_records_exit_status_and_times(cluster, dq):
    d, ok = script(cluster, ALICE, "ok.sh", "echo out; echo err >&2\n")
    _, bad = script(cluster, ALICE, "bad.sh", "echo failing; exit 3\n")
    configure(dq, ["node1"])
    ok_id, _ = submit(dq, "node1", ALICE, ok)
    bad_id, _ = submit(dq, "node1", ALICE, bad)
    j = wait_state(dq, ok_id, "done")
    assert j["exit_code"] == 0 and j["ended"] >= j["started"] >= j["submitted"]
    j = wait_state(dq, bad_id, "failed")
    assert j["exit_code"] == 3 and "exit status 3" in j["reason"]
    assert log_of(dq, ok_id) == "out\nerr\n"
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert re.search(rf"^{bad_id}\s+node1\s+0\s+failed\s+3\s", r.stdout, re.M), r.stdout
    r = dq.run("node1", ALICE, "jobs", "summary", "--json")
    assert json.loads(r.stdout) == {"active": 0, "queued": 0, "completed": 2}
    # the count is an index kept as jobs end; lost, it is rebuilt from the jobs
    os.unlink(os.path.join(dq.root, "jobs", "done", ALICE))
    r = dq.run("node1", ALICE, "jobs", "summary")
    assert r.stdout == "Active jobs: 0\nJobs in queue: 0\nCompleted jobs: 2\n"


def test_two_users_jobs_run_as_their_owners(cluster, dq):
    configure(dq, ["node1", "node2"])
    body = "id -un > whoami-$DQ_JOB_ID; touch made-by-$DQ_JOB_ID\n"
    da, pa = script(cluster, ALICE, "who.sh", body)
    db, pb = script(cluster, BOB, "who.sh", body)
    a, _ = submit(dq, "node3", ALICE, pa)
    b, _ = submit(dq, "node4", BOB, pb)
    assert a.endswith("-" + ALICE) and b.endswith("-" + BOB)
    wait_state(dq, a, "done")
    wait_state(dq, b, "done", user=BOB)
    for d, job_id, user in ((da, a, ALICE), (db, b, BOB)):
        with open(os.path.join(d, f"whoami-{job_id}")) as f:
            assert f.read().strip() == user
        st = os.stat(os.path.join(d, f"made-by-{job_id}"))
        assert st.st_uid == __import__("pwd").getpwnam(user).pw_uid
    # each user's own view shows only their jobs; -a shows both
    mine = json.loads(dq.run("node1", BOB, "jobs", "complete", "--json").stdout)
    assert [j["id"] for j in mine] == [b]
    assert {j["id"] for j in jobs(dq, view="complete")} == {a, b}


def test_job_ids_accept_number_alone(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "sleepy.sh", "sleep 30\n")
    job_id, _ = submit(dq, "node1", ALICE, path)
    n = job_id.split("-")[0]
    wait_state(dq, job_id, "running")
    r = dq.run("node1", ALICE, "kill", n)
    assert r.returncode == 0, r.stderr
    assert f"Killing {job_id} on node1" in r.stdout
    assert job(dq, job_id)["state"] == "killed"


def test_cpu_only_job_and_no_gpu_cluster(cluster, dq):
    configure(dq, ["node1", "node2"])
    for h in ("node1", "node2"):
        cluster.set_smi_mode(h, "nodevices")
    _, path = script(cluster, ALICE, "cpu.sh", 'echo "cvd=[$CUDA_VISIBLE_DEVICES]"\n')
    r = dq.run("node1", ALICE, "submit", path, cwd=os.path.dirname(path))
    assert r.returncode != 0
    assert "DQ_GPUS=0" in r.stderr and "Traceback" not in r.stderr
    assert jobs(dq) == [] and jobs(dq, view="complete") == []     # nothing half-made
    job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_GPUS": "0"})
    assert re.search(rf"Executing '{job_id}' on node[12]/- as {ALICE}", r.stdout), r.stdout
    wait_state(dq, job_id, "done")
    assert log_of(dq, job_id) == "cvd=[]\n"


def test_more_gpus_than_any_host_is_refused(cluster, dq):
    configure(dq, ["node1", "node2"])
    _, path = script(cluster, ALICE, "big.sh", "true\n")
    r = dq.run("node1", ALICE, "submit", path, env={"DQ_GPUS": "5"})
    assert r.returncode == 1 and "no host has 5 GPUs" in r.stderr


def test_bad_submissions_get_one_clear_line(cluster, dq):
    configure(dq, ["node1"])
    d, path = script(cluster, ALICE, "fine.sh", "true\n")
    noexec = os.path.join(d, "noexec.sh")
    with open(noexec, "w") as f:
        f.write("#!/bin/sh\ntrue\n")
    os.chmod(noexec, 0o644)
    cases = [([os.path.join(d, "missing.sh")], {}, "no such file"),
             ([d], {}, "is a directory"),
             ([noexec], {}, "chmod +x"),
             ([], {}, "the following arguments are required"),
             ([path, "--bogus"], {}, "unrecognized arguments"),
             ([path], {"DQ_GPUS": "two"}, "DQ_GPUS")]
    for args, env, needle in cases:
        r = dq.run("node1", ALICE, "submit", *args, env=env, cwd=d)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("dq-submit: "), \
            (args, r.stderr)
    assert jobs(dq) == []


def test_help_for_every_command(cluster, dq):
    for cmd in sorted(os.listdir(dq.bin)):
        r = dq.run("node1", ALICE, cmd[3:], "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (cmd, r.stdout, r.stderr)


def test_without_config_the_cluster_is_this_machine(cluster, dq):
    os.unlink(os.path.join(dq.root, "dq.conf"))
    cluster.set_gpus("node3", 2)
    d, path = script(cluster, ALICE, "local.sh", 'echo "on $(hostname) gpu $CUDA_VISIBLE_DEVICES"; '
                     "sleep ${DQ_SLEEP:-0}\n")
    r = dq.run("node3", ALICE, "free")
    assert r.stdout == "node3: 1 0\n"
    job_id, r = submit(dq, "node3", ALICE, path)
    assert f"Executing '{job_id}' on node3/0 as {ALICE}..." in r.stdout
    wait_state(dq, job_id, "done", user=ALICE)
    assert log_of(dq, job_id) == "on node3 gpu 0\n"
    long_id, _ = submit(dq, "node3", ALICE, path, env={"DQ_SLEEP": "60"})
    wait_state(dq, long_id, "running")
    r = dq.run("node3", ALICE, "kill", long_id)
    assert r.returncode == 0 and job(dq, long_id)["state"] == "killed"


def test_gpu_submit_after_a_failed_poll_asks_the_hosts_again(cluster, dq):
    # A pass recorded node1's nvidia-smi failing; it works again now, and a
    # GPU job within the next seconds is not refused on that old news.
    configure(dq, ["node1"])
    d, path = script(cluster, ALICE, "ok.sh", "exit 0\n")
    cluster.set_smi_mode("node1", "fail")
    cpu_job, _ = submit(dq, "node1", ALICE, path, env={"DQ_GPUS": "0"})
    wait_state(dq, cpu_job, "done")
    cluster.set_smi_mode("node1", "ok")
    job_id, r = submit(dq, "node1", ALICE, path)
    assert f"Executing '{job_id}' on node1/" in r.stdout, r.stderr
