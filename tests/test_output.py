"""Job output end to end: dq-tail, dq-head, dq-logs, dq-grep, dq-attach."""
import os
import shlex
import signal
import subprocess
import time

from dqtest import ALICE, BOB, configure, script, submit, wait_state, wait_until

CHATTY = r'''
for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo "out $i"; echo "err $i" >&2; done
echo "validation cost: 0.5"
touch "printed-$DQ_JOB_ID"
sleep "${DQ_SLEEP:-0}"
echo "last words"
'''


def test_tail_head_logs_grep_of_a_finished_job(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "chatty.sh", CHATTY)
    job_id, _ = submit(dq, "node1", ALICE, path)
    wait_state(dq, job_id, "done")
    n = job_id.split("-")[0]
    expected = [x for i in range(1, 13) for x in (f"out {i}", f"err {i}")] + \
        ["validation cost: 0.5", "last words"]
    r = dq.run("node2", ALICE, "logs", n)
    assert r.returncode == 0 and r.stdout.splitlines() == expected
    assert dq.run("node2", ALICE, "tail", n).stdout.splitlines() == expected[-10:]
    assert dq.run("node2", ALICE, "tail", n, "-3").stdout.splitlines() == expected[-3:]
    assert dq.run("node2", ALICE, "head", n, "-4").stdout.splitlines() == expected[:4]
    assert dq.run("node2", ALICE, "head", job_id).stdout.splitlines() == expected[:10]
    r = dq.run("node2", ALICE, "grep", n, "validation|err 1[01]")
    assert r.stdout.splitlines() == ["err 10", "err 11", "validation cost: 0.5"]
    r = dq.run("node2", ALICE, "grep", n, "-c", "^out")
    assert r.stdout.strip() == "12"
    # other users may read it (logs are lab-readable)
    assert dq.run("node2", BOB, "tail", n, "-1").stdout == "last words\n"
    for cmd, args, needle in (("tail", ["999"], "no job 999"), ("grep", [n], "usage"),
                              ("head", ["x"], "not a job ID")):
        r = dq.run("node2", ALICE, cmd, *args)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_tail_of_running_job_is_current_within_a_second(cluster, dq):
    configure(dq, ["node1"])
    d, path = script(cluster, ALICE, "chatty.sh", CHATTY)
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SLEEP": "30"})
    marker = os.path.join(d, f"printed-{job_id}")
    wait_until(lambda: os.path.exists(marker), 20, 0.02, "the job to print")
    printed = time.time()
    r = dq.run("node2", ALICE, "tail", job_id, "-1")
    assert r.stdout == "validation cost: 0.5\n"
    assert r.stderr.strip() == f"Flushing logs of {job_id}"
    assert time.time() - printed < 1.0


def test_tail_follow_until_job_ends_and_on_ctrl_c(cluster, dq):
    configure(dq, ["node1"])
    _, path = script(cluster, ALICE, "chatty.sh", CHATTY)
    job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_SLEEP": "2"})
    wait_state(dq, job_id, "running")
    r = dq.run("node2", ALICE, "tail", job_id, "-f", timeout=30)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "last words"
    job2, _ = submit(dq, "node1", ALICE, path, env={"DQ_SLEEP": "60"})
    wait_state(dq, job2, "running")
    p = dq.popen("node2", ALICE, "tail", job2, "-f", stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=10)
    assert "validation cost" in out
    assert "Traceback" not in err


def tmux(*args):
    return subprocess.run(["tmux", "-L", "dqtest"] + list(args), capture_output=True,
                          text=True)


def test_attach_in_a_real_terminal(cluster, dq):
    configure(dq, ["node2"])
    _, path = script(cluster, ALICE, "count.sh",
                     'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.3; done\n')
    job_id, _ = submit(dq, "node1", ALICE, path)
    wait_state(dq, job_id, "running")
    argv = cluster._argv("node1", ALICE, [dq.path("attach"), job_id], {"TERM": "xterm"}, None)
    tmux("kill-server")
    r = tmux("new-session", "-d", "-s", "att", "-x", "100", "-y", "20",
             shlex.join(argv) + "; sleep 5")
    assert r.returncode == 0, r.stderr
    try:
        wait_until(lambda: "tick" in tmux("capture-pane", "-p", "-t", "att").stdout, 15,
                   0.2, "the job's screen in the terminal")
        tmux("send-keys", "-t", "att", "C-a", "d")
        wait_until(lambda: "detached" in tmux("capture-pane", "-p", "-t", "att").stdout
                   or tmux("has-session", "-t", "att").returncode != 0, 10, 0.2, "detach")
    finally:
        tmux("kill-server")
    time.sleep(0.5)
    assert wait_state(dq, job_id, "running")
    r = dq.run("node1", BOB, "attach", job_id)
    assert r.returncode == 1 and "belongs to" in r.stderr
    dq.run("node1", ALICE, "kill", job_id)
    r = dq.run("node1", ALICE, "attach", job_id)
    assert r.returncode == 1 and "not running" in r.stderr
