"""Experiments (issue 12): sweeps (--grid, --each), dependencies (DQ_AFTER,
DQ_AFTER_ANY), dq-wait, ranges and --sweep, DQ_RETRY; on both back ends
(issue 22: the README's experiments work the same on Slurm)."""
import os
import re
import time

from dqtest import ALICE, BOB, job, jobs, log_of, script, submit, wait_state, \
    wait_until

ENV_DUMP = 'echo "LR=$DQ_LR BS=$DQ_BS NAME=$DQ_NAME SWEEP=$DQ_SWEEP IDX=$DQ_SWEEP_INDEX"\n'


def ids_of(stdout):
    return re.findall(r"^Job ID: '([0-9]+-[a-z]+)'$", stdout, re.M)


def test_a_grid_times_an_each_file(engine):
    cluster, dq = engine.cluster, engine.dq
    engine.configure(["node1", "node2"])
    d, path = script(cluster, ALICE, "train.sh", ENV_DUMP)
    each = os.path.join(d, "runs.txt")
    with open(each, "w") as f:
        f.write("# name and batch size\n\nDQ_NAME='run a' DQ_BS=32\n"
                "DQ_NAME=b DQ_BS=64  # the big one\n")
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_LR=0.1,0.01", "--each", each, path,
               cwd=d)
    assert r.returncode == 0, r.stderr
    ids = ids_of(r.stdout)
    assert len(ids) == 4 and len(set(ids)) == 4, r.stdout
    assert [int(i.split("-")[0]) for i in ids] == \
        list(range(int(ids[0].split("-")[0]), int(ids[0].split("-")[0]) + 4))
    for i in ids:
        wait_state(dq, i, "done")
    got = [log_of(dq, i).strip() for i in ids]
    assert got == [f"LR=0.1 BS=32 NAME=run a SWEEP={ids[0]} IDX=0",
                   f"LR=0.01 BS=32 NAME=run a SWEEP={ids[0]} IDX=1",
                   f"LR=0.1 BS=64 NAME=b SWEEP={ids[0]} IDX=2",
                   f"LR=0.01 BS=64 NAME=b SWEEP={ids[0]} IDX=3"]
    listed = {j["id"]: j for j in jobs(dq, view="complete")}
    assert listed[ids[3]]["env"]["DQ_SWEEP"] == ids[0] and listed[ids[3]]["sweep"] == ids[0]

    # a 2x2 grid alone; then --sweep names all four
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_LR=1,2", "--grid", "DQ_BS=3,4", path,
               cwd=d)
    grid = ids_of(r.stdout)
    assert len(grid) == 4
    r = dq.run("node1", ALICE, "wait", "--sweep", grid[0].split("-")[0], "-t", "30")
    assert r.returncode == 0, r.stderr
    assert sorted(ln.split()[0] for ln in r.stdout.splitlines()) == sorted(grid)
    assert sorted(log_of(dq, i).split()[0] + " " + log_of(dq, i).split()[1] for i in grid) == \
        ["LR=1 BS=3", "LR=1 BS=4", "LR=2 BS=3", "LR=2 BS=4"]


def test_a_bad_each_line_queues_nothing(engine):
    cluster, dq = engine.cluster, engine.dq
    engine.configure(["node1"])
    d, path = script(cluster, ALICE, "train.sh", ENV_DUMP)
    each = os.path.join(d, "bad.txt")
    with open(each, "w") as f:
        f.write("DQ_LR=0.1\nDQ_LR=0.2 LR=0.3\n")
    before = len(os.listdir(os.path.join(dq.root, "jobs", "backend")))
    r = dq.run("node1", ALICE, "submit", "--each", each, path, cwd=d)
    assert r.returncode == 1 and not r.stdout
    assert f"{each}:2" in r.stderr and "'LR'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1
    with open(each, "w") as f:
        f.write("DQ_LR='0.1\n")
    r = dq.run("node1", ALICE, "submit", "--each", each, path, cwd=d)
    assert r.returncode == 1 and f"{each}:1" in r.stderr and "quotation" in r.stderr
    assert len(os.listdir(os.path.join(dq.root, "jobs", "backend"))) == before


def test_after_waits_for_done_and_cancels_on_failure(engine):
    cluster, dq = engine.cluster, engine.dq
    engine.configure(["node1", "node2"], poll_interval=0.5)
    d, ok = script(cluster, ALICE, "ok.sh", "sleep 2; date +%s.%N\n")
    _, bad = script(cluster, ALICE, "bad.sh", "sleep 1; exit 3\n")
    _, quick = script(cluster, BOB, "quick.sh", "date +%s.%N\n")
    first, _ = submit(dq, "node1", ALICE, ok)
    # bob's job waits on alice's: anyone's jobs, by N or N-user
    after, r = submit(dq, "node1", BOB, quick, env={"DQ_AFTER": first.split("-")[0]})
    assert "dependencies" in r.stderr
    reasons = wait_until(lambda: {j["id"]: j["reason"] for j in jobs(dq, view="queue")
                                  if (j["reason"] or "").startswith("after ")}, 10, 0.2,
                         "its reason")
    assert reasons[after].split(" (Slurm")[0] == f"after {first}"
    a = wait_state(dq, first, "done")
    b = wait_state(dq, after, "done", user=BOB)
    assert b["started"] >= a["ended"]
    assert job(dq, after, user=BOB)["after"] == [first]

    # a dependent of a failed job is cancelled without running, and its own
    # dependents with it; DQ_AFTER_ANY runs after any end
    failing, _ = submit(dq, "node1", ALICE, bad)
    child, _ = submit(dq, "node1", ALICE, ok,
                      env={"DQ_AFTER": failing})
    grandchild, _ = submit(dq, "node1", ALICE, ok, env={"DQ_AFTER": child})
    anyway, _ = submit(dq, "node1", ALICE, ok, env={"DQ_AFTER_ANY": failing})
    assert wait_state(dq, failing, "failed")["exit_code"] == 3
    c = wait_state(dq, child, "cancelled")
    assert failing in c["reason"] and c["started"] is None
    g = wait_state(dq, grandchild, "cancelled")
    assert child in g["reason"] and g["started"] is None
    assert not log_of(dq, child) and not log_of(dq, grandchild)
    assert wait_state(dq, anyway, "done")["started"] >= job(dq, failing)["ended"]


def test_wait_exit_codes_timeout_and_ranges(engine):
    cluster, dq = engine.cluster, engine.dq
    engine.configure(["node1"])
    d, ok = script(cluster, ALICE, "ok.sh", "sleep 1\n")
    _, bad = script(cluster, ALICE, "bad.sh", "sleep 1; exit 1\n")
    _, slow = script(cluster, ALICE, "slow.sh", "sleep 30\n")
    a, _ = submit(dq, "node1", ALICE, ok)
    b, _ = submit(dq, "node1", ALICE, ok)
    t0 = time.monotonic()
    r = dq.run("node2", ALICE, "wait", a, b.split("-")[0])
    assert r.returncode == 0, r.stderr
    assert [ln.split()[:2] for ln in r.stdout.splitlines()] == [[a, "done"], [b, "done"]] \
        or sorted(ln.split()[0] for ln in r.stdout.splitlines()) == [a, b]
    assert all("exit 0 runtime " in ln for ln in r.stdout.splitlines())
    assert not r.stderr     # no progress line: not a terminal
    c, _ = submit(dq, "node1", ALICE, bad)
    r = dq.run("node2", ALICE, "wait", a, c)
    assert r.returncode == 1 and f"{c} failed exit 1" in r.stdout
    s, _ = submit(dq, "node1", ALICE, slow)
    t0 = time.monotonic()
    r = dq.run("node2", ALICE, "wait", s, "-t", "1.5")
    assert r.returncode == 2 and "timed out" in r.stderr and s in r.stderr
    assert 1.4 < time.monotonic() - t0 < 10
    # a range of one's own jobs in dq-kill (and dq-wait): a to s
    lo, hi = a.split("-")[0], s.split("-")[0]
    r = dq.run("node1", ALICE, "kill", f"{lo}-{hi}")
    assert wait_state(dq, s, "killed")
    r = dq.run("node2", ALICE, "wait", f"{lo}-{hi}", "-t", "10")
    assert r.returncode == 1 and len(r.stdout.splitlines()) == 4
    assert f"{s} killed" in r.stdout


def test_kill_a_sweep_and_restart_its_failed_jobs(engine):
    cluster, dq = engine.cluster, engine.dq
    engine.configure(["node1"])
    cluster.set_gpus("node1", 1)
    d, path = script(cluster, ALICE, "s.sh", '[ "$DQ_X" != 2 ] || exit 1; sleep 0.3\n')
    _, slow = script(cluster, ALICE, "slow.sh", "sleep 30\n")
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_X=1,2,3", path, cwd=d)
    sweep = ids_of(r.stdout)
    r = dq.run("node1", ALICE, "wait", "--sweep", sweep[1], "-t", "30")
    assert r.returncode == 1 and f"{sweep[1]} failed" in r.stdout
    r = dq.run("node1", ALICE, "restart", "--failed", "--sweep", sweep[0])
    assert r.returncode == 0 and len(ids_of(r.stdout)) == 1, r.stderr
    again = ids_of(r.stdout)[0]
    assert wait_state(dq, again, "failed")["restart_of"] == sweep[1]
    # killing a whole sweep
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_X=5,6,7", slow, cwd=d)
    big = ids_of(r.stdout)
    r = dq.run("node1", ALICE, "kill", "--sweep", big[2])
    assert r.returncode == 0, r.stderr
    for i in big:
        wait_state(dq, i, "killed")


def test_retry_until_success_and_stop_after_n(engine):
    cluster, dq = engine.cluster, engine.dq
    engine.configure(["node1"])
    d, flaky = script(cluster, ALICE, "flaky.sh",
                      'n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count\n'
                      '[ "$n" -ge 2 ]\n')
    if os.path.exists(os.path.join(d, "count")):    # (the other back end's run)
        os.remove(os.path.join(d, "count"))
    first, _ = submit(dq, "node1", ALICE, flaky, env={"DQ_RETRY": "5"})
    r = dq.run("node2", ALICE, "wait", first, "-t", "30")
    assert r.returncode == 0 and "done (as " in r.stdout, r.stdout + r.stderr
    runs = [j for j in jobs(dq, view="complete") if j["script"] == flaky]
    assert [j["state"] for j in runs] == ["failed", "failed", "done"]
    assert [j["retry_of"] for j in runs] == [None, runs[0]["id"], runs[1]["id"]]
    assert runs[0]["requeued_as"] == runs[1]["id"]
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert f"failed -> {runs[1]['id']}" in r.stdout
    with open(os.path.join(d, "count"), "w") as f:
        f.write("-100\n")
    _, never = script(cluster, ALICE, "never.sh", "exit 4\n")
    last, _ = submit(dq, "node1", ALICE, never, env={"DQ_RETRY": "2"})
    r = dq.run("node2", ALICE, "wait", last, "-t", "30")
    assert r.returncode == 1 and "failed (as " in r.stdout
    assert len([j for j in jobs(dq, view="complete") if j["script"] == never]) == 3
    wait_until(lambda: not [j for j in jobs(dq) if j["script"] == never], timeout=5)


def test_wait_shows_progress_only_on_a_terminal(engine):
    cluster, dq = engine.cluster, engine.dq
    engine.configure(["node1"])
    _, ok = script(cluster, ALICE, "ok.sh", "sleep 1\n")
    a, _ = submit(dq, "node1", ALICE, ok)
    b, _ = submit(dq, "node1", ALICE, ok)
    # script(1) gives dq-wait a pseudo-terminal, as in a user's shell
    r = cluster.run("node1", ALICE, ["script", "-qec", f"{dq.path('wait')} {a} {b}",
                                     "/dev/null"], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"[0-2] of 2 jobs ended", r.stdout), r.stdout
    assert f"{a} done exit 0" in r.stdout and f"{b} done exit 0" in r.stdout
