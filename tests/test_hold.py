"""dq-hold and dq-release (issue 11): a held job keeps its place in the
queue but does not start until its owner releases it."""
from dqtest import ALICE, BOB, configure, job, jobs, script, submit, wait_state


def test_a_held_job_waits_until_released(cluster, dq):
    configure(dq, ["node1"])
    cluster.set_gpus("node1", 1)
    d, path = script(cluster, ALICE, "s.sh", "sleep 2\n")
    first, r = submit(dq, "node1", ALICE, path)
    assert "Executing" in r.stdout, r.stderr
    held, _ = submit(dq, "node1", ALICE, path)
    later, _ = submit(dq, "node1", ALICE, path)
    r = dq.run("node2", ALICE, "hold", held.split("-")[0])
    assert (r.returncode, r.stdout) == (0, f"Holding {held}\n"), r.stderr
    reasons = {j["id"]: j["reason"] for j in jobs(dq, view="queue")}
    assert reasons == {held: "held", later: "GPUs busy"}
    # nobody else may hold or release it; a running job is not held
    r = dq.run("node1", BOB, "release", held)
    assert r.returncode == 1 and "belongs to" in r.stderr
    r = dq.run("node1", ALICE, "hold", first)
    assert r.returncode == 1 and "only a queued job" in r.stderr
    # the GPU goes to the job behind it, and stays with nobody after that
    wait_state(dq, later, "done", timeout=30)
    assert job(dq, held)["state"] == "queued"
    r = dq.run("node1", ALICE, "release", held)
    assert (r.returncode, r.stdout) == (0, f"Releasing {held}\n"), r.stderr
    assert wait_state(dq, held, "done", timeout=30)["host"] == "node1"
