"""Order within one user's jobs (issue 11): DQ_PRIORITY, then dq-top, then
submission order -- and neither lets a user jump ahead of another user."""
import os

from dqtest import ALICE, BOB, DAN, configure, job, jobs, script, submit, wait_state, \
    wait_until


def started_order(dq, ids, user=ALICE):
    done = wait_until(lambda: (lambda c: c if len(c) == len(ids) else None)(
        [j for j in jobs(dq, user=user, view="complete") if j["id"] in ids]),
        timeout=60, interval=0.3, what=f"{len(ids)} jobs to end")
    assert {j["state"] for j in done} == {"done"}, done
    return [j["id"] for j in sorted(done, key=lambda j: j["started"])]


def one_gpu_held_by_hand(cluster, dq):
    """node1 alone, with one GPU, which dqdan holds by hand (no dq job, so
    nobody gains dq usage from it): jobs submitted now queue up behind it,
    in no race with it, until the returned function frees it."""
    configure(dq, ["node1"], poll_interval=0.5)
    cluster.set_gpus("node1", 1)
    holder = cluster.hold_gpu("node1", DAN, 0)
    return lambda: cluster.run("node1", DAN, ["kill", str(holder)], check=True)


def queued(dq):
    return sorted(j["id"] for j in jobs(dq, view="queue"))


def test_priority_then_top_then_submission(cluster, dq):
    # One user's jobs only (fair share has no say): each rule is seen where
    # it alone decides.  low is submitted first and starts last (only its
    # DQ_PRIORITY=-1 puts it there); b is submitted after a and starts first
    # (DQ_PRIORITY=5); d and c are moved by dq-top; a before e is
    # submission order.
    release = one_gpu_held_by_hand(cluster, dq)
    _, path = script(cluster, ALICE, "s.sh", "sleep 0.3\n")
    low, _ = submit(dq, "node1", ALICE, path, env={"DQ_PRIORITY": "-1"})
    a, _ = submit(dq, "node1", ALICE, path)
    b, _ = submit(dq, "node1", ALICE, path, env={"DQ_PRIORITY": "5"})
    c, _ = submit(dq, "node1", ALICE, path)
    d, _ = submit(dq, "node1", ALICE, path)
    e, _ = submit(dq, "node1", ALICE, path)
    # dq-top: d, then c, in front of a and e (but not of b's priority)
    r = dq.run("node2", ALICE, "top", d, c.split("-")[0])
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Moved {d} to the front of your jobs\nMoved {c} to the front of " \
                       f"your jobs\n"
    # only the owner, only queued jobs
    r = dq.run("node1", BOB, "top", a)
    assert r.returncode == 1 and "belongs to" in r.stderr
    _, cpu = script(cluster, ALICE, "cpu.sh", "true\n")
    ended, _ = submit(dq, "node1", ALICE, cpu, env={"DQ_GPUS": "0"})
    wait_state(dq, ended, "done")
    r = dq.run("node1", ALICE, "top", ended)
    assert r.returncode == 1 and f"{ended} is done; only a queued job" in r.stderr, r.stderr
    assert job(dq, b)["env"]["DQ_PRIORITY"] == "5"
    assert queued(dq) == sorted([low, a, b, c, d, e])      # nothing started yet
    release()
    assert started_order(dq, [low, a, b, c, d, e]) == [b, d, c, a, e, low]


def test_a_priority_does_not_jump_an_earlier_job_of_another_user(cluster, dq):
    # alice and bob hold no GPU and have no dq usage: between them the
    # earlier job goes first, whatever alice's DQ_PRIORITY says (it orders
    # her own jobs only).
    release = one_gpu_held_by_hand(cluster, dq)
    _, path_a = script(cluster, ALICE, "a.sh", "sleep 0.3\n")
    _, path_b = script(cluster, BOB, "b.sh", "sleep 0.3\n")
    b1, _ = submit(dq, "node1", BOB, path_b)
    a1, _ = submit(dq, "node1", ALICE, path_a, env={"DQ_PRIORITY": "1000"})
    assert queued(dq) == sorted([b1, a1])
    assert jobs(dq, view="complete") == []      # no usage for anybody
    release()
    assert started_order(dq, [b1, a1]) == [b1, a1]


def test_less_recent_usage_goes_before_an_earlier_job_with_a_priority(cluster, dq):
    # alice has used a GPU through dq, bob has not; neither holds one when
    # it frees.  Her job is the earlier one and has DQ_PRIORITY=1000, yet
    # bob's starts first: between users holding as many GPUs, less recent
    # usage decides, before submission order (and a priority never counts
    # between users).
    configure(dq, ["node1"], poll_interval=0.5)
    cluster.set_gpus("node1", 1)
    _, used_path = script(cluster, ALICE, "used.sh", "sleep 2\n")
    used, _ = submit(dq, "node1", ALICE, used_path)
    wait_state(dq, used, "done")
    # her usage is counted just after the end is recorded
    wait_until(lambda: os.path.exists(os.path.join(dq.root, "jobs", "done", ALICE)),
               timeout=10, what="alice's usage counted")
    holder = cluster.hold_gpu("node1", DAN, 0)
    _, path_a = script(cluster, ALICE, "a.sh", "sleep 0.3\n")
    _, path_b = script(cluster, BOB, "b.sh", "sleep 0.3\n")
    a1, _ = submit(dq, "node1", ALICE, path_a, env={"DQ_PRIORITY": "1000"})
    b1, _ = submit(dq, "node1", BOB, path_b)
    assert queued(dq) == sorted([a1, b1])
    cluster.run("node1", DAN, ["kill", str(holder)], check=True)
    assert started_order(dq, [a1, b1]) == [b1, a1]


def test_queue_order_survives_a_lost_queue_directory(cluster, dq):
    # jobs/queue/<user> is derived from the jobs/active entries: removed by
    # hand, the owner's next command rebuilds it, priorities and tops kept.
    release = one_gpu_held_by_hand(cluster, dq)
    _, path = script(cluster, ALICE, "s.sh", "sleep 0.3\n")
    a, _ = submit(dq, "node1", ALICE, path)
    b, _ = submit(dq, "node1", ALICE, path)
    c, _ = submit(dq, "node1", ALICE, path, env={"DQ_PRIORITY": "2"})
    assert dq.run("node1", ALICE, "top", b).returncode == 0
    qdir = os.path.join(dq.root, "jobs", "queue", ALICE)
    cluster.run("node1", ALICE, ["rm", "-r", qdir], check=True)
    # her loop's next pass rebuilds it (it passes every poll_interval while
    # the GPU is busy by hand)
    wait_until(lambda: os.path.isdir(qdir), timeout=10, what="the queue directory rebuilt")
    assert queued(dq) == sorted([a, b, c])
    release()
    assert started_order(dq, [a, b, c]) == [c, b, a]
