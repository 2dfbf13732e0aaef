"""Order within one user's jobs (issue 11): DQ_PRIORITY, then dq-top, then
submission order -- and neither lets a user jump ahead of another user."""
import os

from dqtest import ALICE, BOB, configure, job, jobs, script, submit, wait_until


def started_order(dq, ids, user=ALICE):
    done = wait_until(lambda: (lambda c: c if len(c) == len(ids) else None)(
        [j for j in jobs(dq, user=user, view="complete") if j["id"] in ids]),
        timeout=60, interval=0.3, what=f"{len(ids)} jobs to end")
    assert {j["state"] for j in done} == {"done"}, done
    return [j["id"] for j in sorted(done, key=lambda j: j["started"])]


def one_gpu_taken(cluster, dq):
    """node1 alone, with one GPU, which alice's job holds for 3 s: jobs
    submitted now queue up behind it.  Returns that job's ID."""
    configure(dq, ["node1"])
    cluster.set_gpus("node1", 1)
    _, blocker = script(cluster, ALICE, "block.sh", "sleep 3\n")
    first, r = submit(dq, "node1", ALICE, blocker)
    assert "Executing" in r.stdout, r.stderr
    return first


def test_priority_then_top_then_submission(cluster, dq):
    first = one_gpu_taken(cluster, dq)
    _, path = script(cluster, ALICE, "s.sh", "sleep 0.3\n")
    a, _ = submit(dq, "node1", ALICE, path)
    b, _ = submit(dq, "node1", ALICE, path, env={"DQ_PRIORITY": "5"})
    c, _ = submit(dq, "node1", ALICE, path)
    d, _ = submit(dq, "node1", ALICE, path)
    low, _ = submit(dq, "node1", ALICE, path, env={"DQ_PRIORITY": "-1"})
    # dq-top: d, then c, in front of a (but not of b's priority)
    r = dq.run("node2", ALICE, "top", d, c.split("-")[0])
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Moved {d} to the front of your jobs\nMoved {c} to the front of " \
                       f"your jobs\n"
    # only the owner, only queued jobs
    r = dq.run("node1", BOB, "top", a)
    assert r.returncode == 1 and "belongs to" in r.stderr
    r = dq.run("node1", ALICE, "top", first)
    assert r.returncode == 1 and "only a queued job" in r.stderr
    assert job(dq, b)["env"]["DQ_PRIORITY"] == "5"
    assert started_order(dq, [a, b, c, d, low]) == [b, d, c, a, low]


def test_a_priority_does_not_jump_other_users(cluster, dq):
    one_gpu_taken(cluster, dq)
    _, path_a = script(cluster, ALICE, "a.sh", "sleep 0.3\n")
    _, path_b = script(cluster, BOB, "b.sh", "sleep 0.3\n")
    b1, _ = submit(dq, "node1", BOB, path_b)
    a1, _ = submit(dq, "node1", ALICE, path_a, env={"DQ_PRIORITY": "1000"})
    order = started_order(dq, [b1, a1])
    assert order == [b1, a1]


def test_queue_order_survives_a_lost_queue_directory(cluster, dq):
    # jobs/queue/<user> is derived from the jobs/active entries: removed by
    # hand, the owner's next command rebuilds it, priorities and tops kept.
    one_gpu_taken(cluster, dq)
    _, path = script(cluster, ALICE, "s.sh", "sleep 0.3\n")
    a, _ = submit(dq, "node1", ALICE, path)
    b, _ = submit(dq, "node1", ALICE, path)
    c, _ = submit(dq, "node1", ALICE, path, env={"DQ_PRIORITY": "2"})
    assert dq.run("node1", ALICE, "top", b).returncode == 0
    qdir = os.path.join(dq.root, "jobs", "queue", ALICE)
    cluster.run("node1", ALICE, ["rm", "-r", qdir], check=True)
    assert started_order(dq, [a, b, c]) == [c, b, a]
    assert os.path.isdir(qdir)
