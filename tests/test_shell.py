"""dq-shell (issue 20): a shell on a GPU through the queue, in a real
terminal (tmux on the test machine, running dq-shell inside a node as the
user, as ssh would): it waits with a status line, becomes a shell on the
job's host once a GPU is free, detaches and comes back with dq-attach,
ends when the shell exits; Ctrl-C withdraws it, --now fails at once."""
import json
import os
import shlex
import subprocess
import time

import pytest

from dqtest import ALICE, BOB, configure, job, jobs, wait_state, wait_until

SOCKET = "dqshell"


def tmux(*args):
    return subprocess.run(["tmux", "-L", SOCKET] + list(args), capture_output=True, text=True)


def screen_text():
    return tmux("capture-pane", "-p", "-J", "-t", "sh").stdout


@pytest.fixture
def terminal(cluster):
    """start(host, user, argv, cwd): run argv in a 120x30 tmux terminal
    inside the node; the terminal's text is screen_text()."""
    tmux("kill-server")
    wait_until(lambda: tmux("has-session").returncode != 0, 10, 0.1, "the old tmux to go")

    def start(host, user, argv, cwd, env=None):
        full = cluster._argv(host, user, argv, dict({"TERM": "xterm", "SHELL": "/bin/sh",
                                                     "PS1": "$ "}, **(env or {})), cwd)
        # typed at an interactive shell, as a user would (a Ctrl-C goes to
        # the command, not to the terminal's shell)
        r = tmux("new-session", "-d", "-s", "sh", "-x", "120", "-y", "30",
                 "bash --norc --noprofile -i")
        assert r.returncode == 0, r.stderr
        type_line(shlex.join(full) + '; echo "[exit $?]"')
    yield start
    tmux("kill-server")


def type_line(text):
    tmux("send-keys", "-t", "sh", "-l", text)
    tmux("send-keys", "-t", "sh", "Enter")


def shows(text, timeout=20):
    try:
        return wait_until(lambda: text in screen_text(), timeout, 0.2,
                          f"{text!r} in the terminal")
    except AssertionError as e:
        raise AssertionError(f"{e}; the terminal shows:\n{screen_text()}") from None


def one_busy_gpu(cluster, dq):
    configure(dq, ["node1"], poll_interval=0.5)
    cluster.set_gpus("node1", 1)
    return cluster.hold_gpu("node1", BOB, 0)


def test_a_shell_waits_for_a_gpu_then_is_a_shell_there(cluster, dq, terminal):
    holder = one_busy_gpu(cluster, dq)
    cwd = cluster.user_dir(ALICE, "project")
    terminal("node2", ALICE, [dq.path("shell")], cwd)
    shows("waits, 1 of 1 in the queue: GPUs busy")
    [j] = jobs(dq)
    assert j["state"] == "queued" and j["interactive"] and j["script"] == "/bin/sh"
    assert "[shell] /bin/sh" in dq.run("node1", ALICE, "jobs", "queue").stdout
    # the GPU is freed: the terminal is a shell on node1, in the submit
    # directory, with that GPU
    cluster.run("node1", BOB, ["kill", str(holder)], check=True)
    wait_state(dq, j["id"], "running", timeout=20)
    time.sleep(1)       # (screen takes over the terminal)
    type_line('echo "on=$(hostname) gpu=$CUDA_VISIBLE_DEVICES in=$(pwd) id=$DQ_JOB_ID"')
    shows(f"on=node1 gpu=0 in={cwd} id={j['id']}")
    # it shows as a running job, marked, with shell_time's limit (4h)
    r = dq.run("node1", ALICE, "jobs")
    assert "[shell] /bin/sh" in r.stdout and "4h" in r.stdout.replace("3h59m", "4h"), r.stdout
    # detach, and come back with dq-attach
    tmux("send-keys", "-t", "sh", "C-a", "d")
    shows(f"{j['id']} runs on; dq-attach {j['id'].split('-')[0]} returns to it")
    assert job(dq, j["id"])["state"] == "running"
    tmux("kill-server")
    wait_until(lambda: tmux("has-session").returncode != 0, 10, 0.1, "the old tmux to go")
    terminal("node2", ALICE, [dq.path("attach"), j["id"]], cwd)
    type_line("echo back=$DQ_JOB_ID")
    shows(f"back={j['id']}")
    type_line("exit")
    done = wait_state(dq, j["id"], "done", timeout=20)
    assert done["exit_code"] == 0
    # its output is logged as any job's
    with open(os.path.join(dq.root, "jobs", "backend", j["id"], "log")) as f:
        assert f"back={j['id']}" in f.read()


def test_a_command_instead_of_the_shell_and_its_exit_status(cluster, dq, terminal):
    configure(dq, ["node1"], poll_interval=0.5)
    cwd = cluster.user_dir(ALICE, "project")
    terminal("node1", ALICE, [dq.path("shell"), "sh", "-c", "echo ran $CUDA_VISIBLE_DEVICES; "
                              "read x; exit 3"], cwd, env={"DQ_TIME": "10m"})
    shows("ran ")
    type_line("bye")
    shows("[exit 3]")
    [j] = jobs(dq, view="complete")
    assert j["state"] == "failed" and j["exit_code"] == 3 and j["time_limit"] == 600
    assert "[shell] sh -c" in dq.run("node1", ALICE, "jobs", "complete").stdout


def test_now_fails_at_once_when_every_gpu_is_busy(cluster, dq):
    one_busy_gpu(cluster, dq)
    t0 = time.monotonic()
    r = dq.run("node1", ALICE, "shell", "--now", "true", cwd=cluster.user_dir(ALICE, "project"))
    assert time.monotonic() - t0 < 10
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "now: GPUs busy; without --now it waits" in lines[0], r.stderr
    assert jobs(dq) == []
    [j] = jobs(dq, view="complete")
    assert j["state"] == "cancelled" and "--now" in j["reason"]


def test_ctrl_c_while_waiting_withdraws_it(cluster, dq, terminal):
    one_busy_gpu(cluster, dq)
    terminal("node1", ALICE, [dq.path("shell")], cluster.user_dir(ALICE, "project"))
    shows("GPUs busy")
    tmux("send-keys", "-t", "sh", "C-c")
    shows("withdrew")
    assert jobs(dq) == []
    [j] = jobs(dq, view="complete")
    assert j["state"] == "cancelled" and "Ctrl-C" in j["reason"]


def test_bad_shell_options_and_restart_are_refused(cluster, dq):
    configure(dq, ["node1"])
    for argv, env, needle in ((["--bogus"], {}, "unrecognized arguments"),
                              ([], {"DQ_GPUS": "lots"}, "DQ_GPUS='lots'"),
                              ([], {"DQ_TIME": "soon"}, "DQ_TIME='soon'"),
                              ([], {"DQ_MEM": "big"}, "DQ_MEM='big'")):
        r = dq.run("node1", ALICE, "shell", *argv, env=env)
        assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr
    assert jobs(dq) == [] and jobs(dq, view="complete") == []
    # a shell that ended is not restarted (nobody would be at its terminal)
    r = dq.run("node1", ALICE, "shell", "echo", "over at once")
    assert r.returncode == 0 and r.stdout == "over at once\n", r
    # without a terminal: a command's output once it ends; no shell
    r = dq.run("node1", ALICE, "shell", "sh", "-c", "sleep 2; echo late; exit 4")
    assert r.returncode == 4 and r.stdout.startswith("late\n"), r     # (then dq's last line)
    r = dq.run("node1", ALICE, "shell")
    assert r.returncode == 1 and "needs a terminal" in r.stderr and len(r.stderr.splitlines()) == 1
    j = jobs(dq, view="complete")[0]
    r = dq.run("node1", ALICE, "restart", j["id"])
    assert r.returncode == 1 and "was a dq-shell" in r.stderr
    data = json.loads(dq.run("node1", ALICE, "jobs", "complete", "--json").stdout)
    assert data[0]["interactive"] is True and data[0]["args"][-2:] == ["echo", "over at once"]
