"""Warning a job before it is stopped (issue 20): DQ_SIGNAL=SIG@TIME at
submit (the signal TIME before the time limit), DQ_DEADLINE in the job's
environment, and dq-kill --grace DUR (the warning now, TERM DUR later).
The job's wrapper on its host sends every signal; a dq-kill that cannot
reach the host leaves a request (grace.json) that the wrapper finds."""
import json
import os
import time

from dqtest import ALICE, configure, job, jobs, log_of, refused_at_submit, script, submit, \
    wait_state, wait_until

# Says when each signal came (a trap runs once the foreground `sleep`,
# which gets the signal too, has ended) and what DQ_DEADLINE it saw.
WARNED = r'''
say() { echo "$1 $(date +%s.%N) $DQ_DEADLINE"; }
trap 'say warned' USR1
trap 'say term; exit 7' TERM
say start
while :; do sleep 0.1; done
'''

# The checkpoint pattern: trap the warning, save, exit.
CHECKPOINT = r'''
setsid sh -c 'trap "" TERM USR1; exec sleep 301' &
trap 'echo saved > checkpoint-$DQ_JOB_ID; echo "saved $(date +%s.%N)"; exit 0' USR1
echo start
while :; do sleep 0.1; done
'''


def said(text, what):
    """[(time, DQ_DEADLINE)] of the log's lines saying `what`."""
    return [(float(w[1]), w[2] if len(w) > 2 else "")
            for w in (ln.split() for ln in text.splitlines()) if w and w[0] == what]


def wait_said(dq, job_id, what, timeout):
    return wait_until(lambda: said(log_of(dq, job_id), what), timeout,
                      what=f"{job_id} to say {what!r}")[0]


def left_behind(cluster):
    r = cluster.run("node1", ALICE, ["pgrep", "-u", ALICE, "-f", "sleep 30[01]"])
    return r.stdout.split()


def test_the_warning_comes_its_time_before_the_limit(cluster, dq):
    configure(dq, ["node1"], kill_grace=1)
    _, path = script(cluster, ALICE, "warned.sh", WARNED)
    job_id, _ = submit(dq, "node1", ALICE, path,
                       env={"DQ_TIME": "9s", "DQ_SIGNAL": "USR1@5s"})
    started = wait_state(dq, job_id, "running")["started"]
    _, deadline = wait_said(dq, job_id, "start", 10)
    assert abs(int(deadline) - (started + 9)) <= 1, (deadline, started)
    warned, _ = wait_said(dq, job_id, "warned", 15)
    assert abs(warned - (started + 4)) < 2, warned - started
    j = wait_state(dq, job_id, "timeout", timeout=20)
    assert j["reason"] == "time limit 9s reached (exit status 7)", j
    term, _ = said(log_of(dq, job_id), "term")[0]
    assert abs(term - (started + 9)) < 2, term - started
    assert len(said(log_of(dq, job_id), "warned")) == 1


def test_a_job_that_closed_its_terminal_is_still_warned_and_stopped(cluster, dq):
    """`exec >file 2>&1 </dev/null` closes the job's pty: its wrapper
    still watches the clock."""
    configure(dq, ["node1"], kill_grace=1)
    d, path = script(cluster, ALICE, "quiet.sh",
                     "exec >quiet.out 2>&1 </dev/null\n" + WARNED, subdir="quiet")
    job_id, _ = submit(dq, "node1", ALICE, path,
                       env={"DQ_TIME": "6s", "DQ_SIGNAL": "SIGUSR1@3s"})
    started = wait_state(dq, job_id, "running")["started"]
    j = wait_state(dq, job_id, "timeout", timeout=20)
    with open(os.path.join(d, "quiet.out")) as f:
        out = f.read()
    warned, deadline = said(out, "warned")[0]
    assert abs(warned - (started + 3)) < 2, out
    assert abs(int(deadline) - (started + 6)) <= 1
    assert j["ended"] - j["started"] < 9


def test_no_time_limit_means_an_empty_deadline(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "d.sh", 'echo "deadline=[$DQ_DEADLINE]"\n')
    # a DQ_DEADLINE of the submitter's (a job submitting jobs) is not passed on
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_DEADLINE": "12345"})
    wait_state(dq, job_id, "done")
    assert log_of(dq, job_id) == "deadline=[]\n"
    assert "DQ_DEADLINE" not in job(dq, job_id)["env"]


def test_kill_with_grace_warns_now_and_terms_when_the_grace_runs_out(cluster, dq):
    configure(dq, ["node1"], kill_grace=1)
    cluster.set_gpus("node1", 1)
    _, path = script(cluster, ALICE, "warned.sh", WARNED)
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SIGNAL": "USR1@1m"})
    wait_state(dq, job_id, "running")
    wait_said(dq, job_id, "start", 10)
    t0 = time.time()
    r = dq.run("node1", ALICE, "kill", "--grace", "4s", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Stopping {job_id} on node1: SIGUSR1 now, SIGTERM in 4s\n"
    warned, deadline = wait_said(dq, job_id, "warned", 5)
    assert warned - t0 < 1.5 and deadline == ""
    # a second --grace changes nothing; the job goes on through its grace
    r = dq.run("node1", ALICE, "kill", "--grace", "1s", job_id)
    assert r.returncode == 1 and "being stopped already" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert job(dq, job_id)["state"] == "running"
    j = wait_state(dq, job_id, "killed", timeout=15)
    term, _ = said(log_of(dq, job_id), "term")[0]
    assert 3 < term - warned < 5.5, term - warned
    assert j["reason"] == f"dq-kill --grace 4s by {ALICE} (exit status 7)", j
    assert len(said(log_of(dq, job_id), "warned")) == 1
    wait_until(lambda: dq.run("node1", ALICE, "free").stdout == "node1: 0\n", 5,
               what="its GPU to be free")


def test_a_job_that_saves_and_exits_during_its_grace_ends_killed_at_once(cluster, dq):
    configure(dq, ["node1"], kill_grace=1)
    d, path = script(cluster, ALICE, "ckpt.sh", CHECKPOINT, subdir="ckpt")
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SIGNAL": "USR1"})
    wait_state(dq, job_id, "running")
    wait_until(lambda: "start" in log_of(dq, job_id), 10, what="the job to start")
    t0 = time.time()
    r = dq.run("node1", ALICE, "kill", "--grace", "30s", job_id)
    assert r.returncode == 0 and "SIGUSR1 now, SIGTERM in 30s" in r.stdout, r.stderr
    j = wait_state(dq, job_id, "killed", timeout=10)
    assert j["ended"] - t0 < 5
    assert j["reason"] == f"dq-kill --grace 30s by {ALICE} (it exited with status 0)", j
    assert j["exit_code"] == 0
    assert os.path.exists(os.path.join(d, f"checkpoint-{job_id}"))
    assert left_behind(cluster) == []   # a killed job leaves nothing running


def test_kill_with_grace_without_dq_signal_terms_now_and_kills_later(cluster, dq):
    configure(dq, ["node1"], kill_grace=1)
    _, path = script(cluster, ALICE, "stubborn.sh", r'''
trap 'echo "term $(date +%s.%N)"' TERM
echo start
while :; do sleep 0.1; done
''')
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_TIME": "1h"})
    wait_state(dq, job_id, "running")
    wait_until(lambda: "start" in log_of(dq, job_id), 10, what="the job to start")
    t0 = time.time()
    r = dq.run("node1", ALICE, "kill", "--grace", "3", job_id)
    assert r.stdout == f"Stopping {job_id} on node1: SIGTERM now, SIGKILL in 3s\n", r.stderr
    term, _ = wait_said(dq, job_id, "term", 5)
    assert term - t0 < 1.5
    j = wait_state(dq, job_id, "killed", timeout=10)
    assert j["reason"] == f"dq-kill --grace 3s by {ALICE} (killed by SIGKILL)", j
    assert j["signal"] == "SIGKILL" and 2.5 < j["ended"] - term < 5, j


def test_a_plain_kill_during_a_grace_stops_the_job_at_once(cluster, dq):
    configure(dq, ["node1"], kill_grace=1)
    _, path = script(cluster, ALICE, "warned.sh", WARNED)
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SIGNAL": "USR1"})
    wait_state(dq, job_id, "running")
    wait_said(dq, job_id, "start", 10)
    assert dq.run("node1", ALICE, "kill", "--grace", "5m", job_id).returncode == 0
    wait_said(dq, job_id, "warned", 5)
    t0 = time.time()
    r = dq.run("node1", ALICE, "kill", job_id)
    assert r.returncode == 0 and r.stdout.startswith(f"Killing {job_id} on node1"), r.stderr
    j = wait_state(dq, job_id, "killed", timeout=5)
    assert j["reason"] == "killed by dq-kill" and j["ended"] - t0 < 3, j
    assert len(said(log_of(dq, job_id), "warned")) == 1


def test_grace_on_a_host_that_does_not_answer_goes_through_the_wrapper(cluster, dq):
    """The ssh to poke the wrapper hangs: dq-kill says so, and the wrapper
    finds the request at its next lease renewal (every second here)."""
    configure(dq, ["node1"], kill_grace=1, timeout=2, lost_after=8)
    _, path = script(cluster, ALICE, "warned.sh", WARNED)
    job_id, _ = submit(dq, "node2", ALICE, path, env={"DQ_SIGNAL": "USR2@1m"})
    wait_state(dq, job_id, "running")
    wait_said(dq, job_id, "start", 10)
    cluster.stop_sshd("node1")
    try:
        t0 = time.time()
        r = dq.run("node2", ALICE, "kill", "--grace", "3s", job_id)
        assert r.returncode == 1 and "could not reach node1" in r.stderr, r.stderr
        assert "SIGUSR2 within" in r.stderr
        # USR2 is not trapped by the script: the warning ends it, as killed
        j = wait_state(dq, job_id, "killed", timeout=10, host="node2")
        assert j["ended"] - t0 < 2 + 2 + 2, j
        assert j["reason"] == f"dq-kill --grace 3s by {ALICE} (killed by SIGUSR2)", j
    finally:
        cluster.cont_sshd("node1")


def test_bad_dq_signal_and_grace_are_refused(cluster, dq):
    configure(dq, ["node1"], max_time="1d")
    _, path = script(cluster, ALICE, "s.sh", "sleep 30\n")
    example = "DQ_SIGNAL=USR1@10m"
    refused_at_submit(dq, path, [
        ({"DQ_SIGNAL": "KILL@10m"}, ["DQ_SIGNAL='KILL@10m'", "cannot be trapped", example]),
        ({"DQ_SIGNAL": "SIGSTOP"}, ["SIGSTOP cannot be trapped", example]),
        ({"DQ_SIGNAL": "USR3@1m"}, ["USR3 is not a signal", example]),
        ({"DQ_SIGNAL": "@1m"}, ["is not a signal", example]),
        ({"DQ_SIGNAL": "USR1@soon"}, ["'soon' is not a time", example]),
        ({"DQ_SIGNAL": "USR1@0"}, ["is not a time", example]),
        ({"DQ_SIGNAL": "USR1@"}, ["is not a time", example]),
        ({"DQ_SIGNAL": "USR1@1h30"}, ["is not a time", example]),
        ({"DQ_SIGNAL": "USR1@1h", "DQ_TIME": "30m"}, ["before it starts", "DQ_SIGNAL=USR1@3m"]),
        ({"DQ_SIGNAL": "USR1@30m", "DQ_TIME": "30m"}, ["before it starts"]),
    ])
    assert jobs(dq, view="queue") == [] and jobs(dq) == []
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SIGNAL": "usr1@90s"})
    wait_state(dq, job_id, "running")
    grace = os.path.join(dq.root, "jobs", "backend", job_id, "grace.json")
    for args, needle in ((["--grace", "soon", job_id], "--grace 'soon' is not a duration"),
                         (["--grace", "0", job_id], "--grace '0' is not a duration"),
                         ([job_id, "--grace", "1h30"], "--grace '1h30' is not a duration"),
                         ([job_id, "--grace"], "expected one argument")):
        r = dq.run("node1", ALICE, "kill", *args)
        assert r.returncode == 1 and needle in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1
        assert not os.path.exists(grace)
    assert job(dq, job_id)["state"] == "running"
    # a job whose wrapper is of a dq from before --grace (no "grace" in its
    # run.json) would never act on the request: refused
    run_json = os.path.join(dq.root, "jobs", "backend", job_id, "run.json")
    with open(run_json) as f:
        run = json.load(f)
    del run["grace"]
    with open(run_json, "w") as f:
        json.dump(run, f)
    r = dq.run("node1", ALICE, "kill", "--grace", "5m", job_id)
    assert r.returncode == 1 and "started by a dq from before --grace" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and not os.path.exists(grace)
    assert job(dq, job_id)["state"] == "running"
    dq.run("node1", ALICE, "kill", job_id)


def test_grace_on_a_queued_job_removes_it_at_once(cluster, dq):
    configure(dq, ["node1"])
    cluster.set_gpus("node1", 1)
    cluster.hold_gpu("node1", "dqbob", 0)
    _, path = script(cluster, ALICE, "never.sh", "touch ran-$DQ_JOB_ID\n")
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SIGNAL": "USR1"})
    r = dq.run("node1", ALICE, "kill", "--grace", "5m", job_id)
    assert r.returncode == 0 and f"Removing {job_id} from the queue" in r.stdout, r.stderr
    assert job(dq, job_id)["state"] == "killed"
