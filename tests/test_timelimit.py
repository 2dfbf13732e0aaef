"""Time limits (issue 11): DQ_TIME at submit, time_limit and max_time in
dq.conf; the job's wrapper on its host ends a job that ran too long --
TERM to every process it started, KILL after kill_grace -- as `timeout`."""
from dqtest import ALICE, configure, jobs, script, submit, wait_state

# The job leaves a child that ignores TERM and left its process group.
STUBBORN = """\
setsid sh -c 'trap "" TERM; exec sleep 301' &
sleep 300
"""


def left_behind(cluster):
    r = cluster.run("node1", ALICE, ["pgrep", "-u", ALICE, "-f", "sleep 30[01]"])
    return r.stdout.split()


def test_a_job_over_its_limit_ends_as_timeout_with_all_it_started(cluster, dq):
    configure(dq, ["node1"], kill_grace=1, max_time="1h")
    d, path = script(cluster, ALICE, "long.sh", STUBBORN)
    job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_TIME": "4s"})
    assert "Executing" in r.stdout, r.stderr
    wait_state(dq, job_id, "running")
    r = dq.run("node1", ALICE, "jobs")
    header, _, row = r.stdout.splitlines()[1:4]
    assert header.split()[:5] == ["JobID", "Host", "GPU", "Runtime", "Left"]
    assert row.split()[4] in ("0s", "1s", "2s", "3s", "4s"), row
    j = wait_state(dq, job_id, "timeout", timeout=20)
    assert j["reason"].startswith("time limit 4s reached"), j
    assert 4 <= j["ended"] - j["started"] < 9
    assert left_behind(cluster) == []
    # what dq-jobs complete says
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert f"{job_id}  node1" in r.stdout and "timeout" in r.stdout


def test_time_limit_default_and_max_time_at_submit(cluster, dq):
    configure(dq, ["node1"], time_limit="2", max_time="1h30m")
    d, path = script(cluster, ALICE, "long.sh", "sleep 300\n")
    job_id, _ = submit(dq, "node1", ALICE, path)       # no DQ_TIME: time_limit
    assert wait_state(dq, job_id, "timeout", timeout=20)["reason"].startswith(
        "time limit 2s reached")
    for value, needle in [("2h", "max_time of 1h30m"), ("soon", "not a duration"),
                          ("1h30", "unit of its last number"), ("0", "above 0")]:
        job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_TIME": value}, check=False)
        assert r.returncode == 1 and job_id is None, r.stdout
        assert len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
    assert [j["state"] for j in jobs(dq, view="complete")] == ["timeout"]
