"""Idle GPUs caught while they idle (issue 21): a running job whose GPUs
have all sat at 0% with no process of the job on them for idle_after is
flagged idle (gpu.json, dq-jobs, dq-users), its owner mailed once (DQ_MAIL),
and with idle_kill stopped; dq-shell's sessions follow shell_idle_after.
The decision itself is tested first on a fake clock."""
import json
import os
import sys
import threading
import time
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dq as dqpy  # noqa: E402
from dqtest import ALICE, configure, job, jobs, log_of, script, submit, wait_state, \
    wait_until  # noqa: E402


# ------------------------------------------------------------- the decision

class Log:
    def __init__(self):
        self.lines = []

    def write(self, data):
        self.lines.append(data.decode())


def watch(tmp_path, idle_after=60, idle_kill=0, shell_idle_after=600, interactive=False):
    cfg = types.SimpleNamespace(idle_after=idle_after, idle_kill=idle_kill,
                                shell_idle_after=shell_idle_after, sample_interval=10,
                                mem_overuse="warn", path="dq.conf")
    spec = {"env": {}, "script": "a.sh"}
    if interactive:
        spec["interactive"] = True
    job = types.SimpleNamespace(id="7-alice", dir=str(tmp_path), spec=spec, owner="alice")
    return dqpy.GpuWatch(cfg, job, [0, 1], None, Log(), "node1")


def test_idle_after_a_stretch_of_unused_samples_and_the_kill_after_it(tmp_path):
    w = watch(tmp_path, idle_after=60, idle_kill=30)
    assert w.idle_check(True, 1000) is None and w.use["idle_since"] == 1000
    assert w.idle_check(True, 1059) is None and not w.use["idle"]
    assert w.idle_check(True, 1060) == "flag" and w.use["idle"]
    assert w.idle_check(True, 1070) is None             # flagged once
    assert w.idle_check(True, 1089) is None
    assert w.idle_check(True, 1090) == "kill"
    # any use ends the stretch: the clock starts again
    assert w.idle_check(False, 1100) is None
    assert w.use["idle"] is False and w.use["idle_since"] is None
    assert w.idle_check(True, 1110) is None and w.use["idle_since"] == 1110


def test_off_and_no_kill_and_shells(tmp_path):
    off = watch(tmp_path, idle_after=0)
    assert all(off.idle_check(True, t) is None for t in range(0, 10000, 100))
    assert off.use["idle"] is False
    keep = watch(tmp_path, idle_after=60)
    assert keep.idle_check(True, 0) is None and keep.idle_check(True, 60) == "flag"
    assert all(keep.idle_check(True, t) is None for t in range(61, 100000, 1000))
    shell = watch(tmp_path, idle_after=60, shell_idle_after=600, interactive=True)
    assert shell.idle_key == "shell_idle_after"
    assert shell.idle_check(True, 0) is None and shell.idle_check(True, 599) is None
    assert shell.idle_check(True, 600) == "flag"


def test_a_sample_is_unused_only_with_every_gpu_at_0_and_no_process(tmp_path):
    w = watch(tmp_path, idle_after=5)
    w.record(0, 0, idle=2, held=False, now=100)
    w.record(0, 0, idle=2, held=True, now=103)            # a process of it at 0%: in use
    assert w.use["idle_since"] is None
    w.record(0, 0, idle=2, held=False, now=104)
    w.record(0, 30, idle=1, held=False, now=106)          # one GPU busy: in use
    assert w.use["idle_since"] is None
    for t in range(107, 113):
        w.record(0, 0, idle=2, held=False, now=t)
    with open(tmp_path / "gpu.json") as f:
        use = json.load(f)
    assert use["idle"] is True and use["idle_since"] == 107
    assert dqpy.bad_field(use, dqpy.GPU_USE_FIELDS) is None
    said = [ln for ln in w.log.lines if "idle" in ln]
    assert len(said) == 1 and "7-alice: idle:" in said[0] and "idle_after 5s" in said[0]


def test_idle_keys_in_dq_conf(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_ROOT", str(tmp_path))

    def conf(text):
        (tmp_path / "dq.conf").write_text("[dq]\n" + text + "\n")
        return dqpy.Config()
    c = conf("")
    assert (c.idle_after, c.idle_kill, c.shell_idle_after) == (1800, 0, 3600)
    c = conf("idle_after = 0\nidle_kill = 15m\nshell_idle_after = off")
    assert (c.idle_after, c.idle_kill, c.shell_idle_after) == (0, 900, 0)
    for bad in ("idle_after = soon", "idle_kill = -1", "shell_idle_after = 1h30"):
        with pytest.raises(dqpy.Failure) as e:
            conf(bad)
        key = bad.split()[0]
        assert f"'{key}'" in str(e.value) and f"{key} = 30m" in str(e.value)
        assert "\n" not in str(e.value)


def test_listing_texts():
    now = 1000.0
    use = {"mem_mib": None, "idle": True, "idle_since": now - 2100}
    assert dqpy.gpu_use_text(use, None, now) == "IDLE 35m -"
    assert dqpy.gpu_use_text(dict(use, idle=False), None, now) == "-"
    assert dqpy.idle_for(dict(use, idle=False), now) is None


# ------------------------------------------------------- on the test cluster

FAST = dict(poll_interval=0.5, sample_interval=1)


@pytest.fixture
def inbox():
    from test_notify import Inbox
    from aiosmtpd.controller import Controller
    from dqtest import free_port
    box = Inbox()
    box.port = free_port()
    ctl = Controller(box, hostname="127.0.0.1", port=box.port)
    ctl.start()
    try:
        yield box
    finally:
        ctl.stop()


def running(dq, job_id):
    return {j["id"]: j for j in jobs(dq)}.get(job_id)


def test_an_idle_job_is_flagged_mailed_and_stopped(cluster, dq, inbox):
    configure(dq, ["node1"], smtp=f"127.0.0.1:{inbox.port}", idle_after="4s",
              idle_kill="6s", kill_grace=1, **FAST)
    _, sleeper = script(cluster, ALICE, "sleeper.sh", "sleep 60\n")
    _, busy = script(cluster, ALICE, "busy.sh", "exec fake-cuda --hold 60\n")
    _, waiting = script(cluster, ALICE, "waiting.sh", "exec fake-cuda --util 0 --hold 60\n")
    idle, _ = submit(dq, "node1", ALICE, sleeper, env={"DQ_MAIL": "a@example.org"})
    work, _ = submit(dq, "node1", ALICE, busy)
    ctx, _ = submit(dq, "node1", ALICE, waiting)
    j = wait_until(lambda: (lambda j: j if j and (j["gpu_use"] or {}).get("idle") else None)(
        running(dq, idle)), 30, 0.3, f"{idle} to be flagged idle")
    assert j["gpu_use"]["idle_since"] <= time.time() - 3
    # dq-jobs: the mark in the Mem column and a note; the others are not idle
    out = dq.run("node1", ALICE, "jobs").stdout
    row = next(ln for ln in out.splitlines() if ln.startswith(idle))
    assert "IDLE " in row, out
    assert f"{idle} on node1: idle: GPU " in out and "(idle_kill)" in out, out
    for other in (work, ctx):
        assert "IDLE" not in next(ln for ln in out.splitlines() if ln.startswith(other)), out
        assert running(dq, other)["gpu_use"]["idle"] is False
    # dq-users: a row for the GPU it holds and runs nothing on
    users = dq.run("node1", ALICE, "users", "--json")
    rows = [r for r in json.loads(users.stdout) if r["job"] == idle]
    assert rows and all(r["idle_s"] is not None and r["pid"] is None for r in rows), users.stdout
    assert all(r["idle_s"] is None for r in json.loads(users.stdout) if r["job"] != idle)
    assert f"{idle} IDLE " in dq.run("node1", ALICE, "users").stdout
    # one mail when it became idle
    mails = inbox.wait(1)
    assert f"dq: {idle} idle on node1/" in mails[0]["subject"], mails
    assert "idle_after" in mails[0]["body"] and "idle_kill" in mails[0]["body"]
    # idle_kill: it ends killed, with its reason; the others run on
    end = wait_state(dq, idle, "killed", timeout=30)
    assert end["reason"].startswith("idle: no GPU use for ") and \
        "(idle_after 4s + idle_kill 6s)" in end["reason"], end
    assert "idle: its GPUs have been at 0%" in log_of(dq, idle)
    assert {running(dq, work)["state"], running(dq, ctx)["state"]} == {"running"}
    mails = inbox.wait(2)       # its end's mail
    assert sum(" idle on " in m["subject"] for m in mails) == 1, mails
    assert end["notify"] == {}
    dq.run("node1", ALICE, "kill", work, ctx)


def test_a_shell_follows_shell_idle_after(cluster, dq):
    configure(dq, ["node1"], idle_after="1h", shell_idle_after="3s", idle_kill="2s",
              kill_grace=1, **FAST)
    _, sleeper = script(cluster, ALICE, "sleeper.sh", "sleep 60\n")
    batch, _ = submit(dq, "node1", ALICE, sleeper)
    wait_state(dq, batch, "running")
    out = {}
    t = threading.Thread(target=lambda: out.update(r=dq.run(
        "node1", ALICE, "shell", "sleep", "60", cwd=cluster.user_dir(ALICE, "project"),
        timeout=60)))
    t0 = time.monotonic()
    t.start()
    t.join(60)
    assert time.monotonic() - t0 < 40, "dq-shell outlived shell_idle_after + idle_kill"
    r = out["r"]
    assert "Traceback" not in r.stderr, r.stdout + r.stderr
    [sh] = [j for j in jobs(dq, view="complete") if j["interactive"]]
    assert sh["state"] == "killed" and "(shell_idle_after 3s + idle_kill 2s)" in sh["reason"]
    b = job(dq, batch)      # idle_after 1h: the batch job beside it is not idle
    assert b["state"] == "running" and b["gpu_use"]["idle"] is False
    dq.run("node1", ALICE, "kill", batch)
