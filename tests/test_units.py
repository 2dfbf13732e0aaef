"""Unit tests of the pure parts of dq: nvidia-smi parsing and placement."""
import os
import re
import sys
import time
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dq  # noqa: E402
from dqtest import planner_rules  # noqa: E402

UUID0 = "GPU-6a3f4b2e-1c2d-3e4f-5a6b-7c8d9e0f1a2b"
UUID1 = "GPU-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e"


def poll_output(gpus, apps, gpus_rc=0, apps_rc=0, ps=""):
    return (f"@@gpus\n{gpus}@@rc {gpus_rc}\n@@apps\n{apps}@@rc {apps_rc}\n"
            f"@@ps\n{ps}@@rc 0\n")


def parsed(out, rc=0, err=""):
    return dq.parse_poll("node1", dq.Result("node1", rc, out, err, 0.01), 100.0)


def test_idle_gpus_are_free():
    st = parsed(poll_output(f"0, {UUID0}, 0, 81559, NVIDIA H100 80GB HBM3\n1, {UUID1}, 3, 81559, NVIDIA H100 80GB HBM3\n", ""))
    assert st.error is None
    assert st.free() == [0, 1]


def test_gpu_name_and_memory_are_read_a_comma_in_the_name_too():
    st = parsed(poll_output(f"0, {UUID0}, 0, 11264, NVIDIA GeForce GTX 1080 Ti\n"
                            f"1, {UUID1}, 0, [N/A], Odd, Name\n", ""))
    assert [(g.name, g.total) for g in st.gpus] == \
        [("NVIDIA GeForce GTX 1080 Ti", 11264), ("Odd, Name", None)]


def test_gpu_with_a_process_is_busy_and_pid_recorded():
    st = parsed(poll_output(f"0, {UUID0}, 1043, 81559, NVIDIA H100 80GB HBM3\n1, {UUID1}, 0, 81559, NVIDIA H100 80GB HBM3\n",
                            f"{UUID0}, 12345, 1034\n"))
    assert st.free() == [1]
    assert st.gpus[0].pids == [12345]


def test_reserved_gpus_are_not_free():
    st = parsed(poll_output(f"0, {UUID0}, 0, 81559, NVIDIA H100 80GB HBM3\n1, {UUID1}, 0, 81559, NVIDIA H100 80GB HBM3\n", ""))
    assert st.free(reserved={0}) == [1]


@pytest.mark.parametrize("field", ["[N/A]", "[Insufficient Permissions]", "[Unknown Error]"])
def test_unknown_memory_means_not_free(field):
    st = parsed(poll_output(f"0, {UUID0}, {field}, 81559, NVIDIA H100 80GB HBM3\n1, {UUID1}, 0, 81559, NVIDIA H100 80GB HBM3\n", ""))
    assert st.free() == [1]


def test_process_on_unknown_uuid_makes_every_gpu_unknown():
    st = parsed(poll_output(f"0, {UUID0}, 0, 81559, NVIDIA H100 80GB HBM3\n", "GPU-ffffffff-0000, 77, 10\n"))
    assert st.free() == []


@pytest.mark.parametrize("gpus,rc,needle", [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
     "Make sure that the latest NVIDIA driver is installed and running.\n", 9, "exit 9"),
    ("No devices were found\n", 6, "No devices"),
    ("sh: 1: nvidia-smi: not found\n", 127, "not found"),
    ("", 124, "timed out"),
])
def test_failing_nvidia_smi_means_no_free_gpus(gpus, rc, needle):
    st = parsed(poll_output(gpus, "", gpus_rc=rc))
    assert st.free() == []
    assert needle in st.error
    assert st.reachable


def test_garbage_rows_are_an_error_not_a_crash():
    st = parsed(poll_output("this is not csv\n", ""))
    assert st.free() == [] and "unexpected" in st.error


def test_failure_text_on_stdout_with_exit_zero_is_rejected():
    st = parsed(poll_output("NVIDIA-SMI has failed because it couldn't communicate\n", ""))
    assert st.free() == [] and st.error


def test_unreachable_host():
    st = parsed("", rc=255, err="ssh: connect to host node9 port 22: Connection refused\n")
    assert not st.reachable and "Connection refused" in st.error and st.free() == []


def test_sessions_found_in_ps():
    ps = ("SCREEN -c /x/jobs/backend/3-alice/screenrc -L -dmS dq-3-alice python3 /x/dq.py"
          " _run 3-alice node1 0\nSCREEN -dmS other\n")
    st = parsed(poll_output(f"0, {UUID0}, 0, 81559, NVIDIA H100 80GB HBM3\n", "", ps=ps))
    assert st.sessions == {"3-alice"}


cfg = planner_rules


def queued(item):
    """A (job_id, gpus, submitted[, need]) tuple as the planner's Queued."""
    job_id, gpus, submitted = item[:3]
    return dq.Queued(job_id, gpus, item[3] if len(item) > 3 else None, submitted)


def plan(queue, polls, places, now, c, usage=None, cpu=(), **kw):
    """dq.plan's placements for a queue given as tuples: one list (each
    job's user from its ID, the list's order kept per user), or {user:
    list}; a generator is read only as far as the planner asks."""
    if isinstance(queue, dict):
        queues = {u: (queued(i) for i in q) for u, q in queue.items()}
    elif isinstance(queue, list):
        queues = {}
        for item in queue:
            queues.setdefault(item[0].split("-", 1)[1], []).append(queued(item))
    else:
        queues = {"x": (queued(i) for i in queue)}
    return dq.plan(queues, [queued(i) for i in cpu], polls, places, now, c, usage=usage,
                   **kw).placed


def host(name, free_idx, total):
    st = dq.HostState(name, 0)
    for i in range(total):
        g = dq.Gpu(i, f"GPU-{name}-{i}", 0, 100)
        if i not in free_idx:
            g.apps.append((1000 + i, 100))     # all of it: no room to share
        st.gpus.append(g)
    return st


def test_plan_first_come_first_served():
    polls = {"a": host("a", [0], 2)}
    out = plan([("1-x", 1, 0), ("2-y", 1, 0)], polls, {}, 10, cfg())
    assert out == [("1-x", "a", [0])]


def test_plan_backfills_past_a_job_that_does_not_fit():
    polls = {"a": host("a", [0, 1], 4), "b": host("b", [3], 4)}
    out = plan([("1-x", 4, 5), ("2-y", 1, 6), ("3-y", 2, 7)], polls, {}, 10, cfg())
    # the 1-GPU job goes to the host with the fewest free GPUs (best fit)
    assert out == [("2-y", "b", [3]), ("3-y", "a", [0, 1])]


def test_plan_keeps_a_host_for_a_starving_job():
    polls = {"a": host("a", [0, 1], 4)}
    queue = [("1-x", 4, 0), ("2-y", 1, 1)]
    assert plan(queue, polls, {}, 10, cfg()) == [("2-y", "a", [0])]
    assert plan(queue, polls, {}, 10_000, cfg()) == []


def test_plan_backfill_and_starvation_guard_under_fair_share():
    # x's 4-GPU job cannot fit on a's 2 free GPUs: y's 1-GPU job backfills,
    # until x's job has waited starve_after -- then host a is kept for it
    polls = {"a": host("a", [0, 1], 4)}

    def queues():
        return {"x": [("1-x", 4, 0)], "y": [("2-y", 1, 1)]}
    c = cfg(order="fairshare")
    assert plan(queues(), polls, {}, 10, c) == [("2-y", "a", [0])]
    assert plan(queues(), polls, {}, 10_000, c) == []


def test_plan_never_gives_a_reserved_gpu():
    polls = {"a": host("a", [0, 1], 2)}
    places = {"9-z": {"host": "a", "gpus": [0], "state": "running", "user": "z", "since": 0}}
    out = plan([("1-x", 1, 0), ("2-x", 1, 0)], polls, places, 10, cfg())
    assert out == [("1-x", "a", [1])]


def test_plan_reads_the_queue_only_while_gpus_are_free():
    polls = {"a": host("a", [0, 1], 2)}
    read = []

    def queue():
        for i in range(1, 10001):
            read.append(i)
            yield (f"{i}-x", 1, 0)
    out = plan(queue(), polls, {}, 10, cfg())
    assert [j for j, _, _ in out] == ["1-x", "2-x"] and len(read) == 2


def test_plan_passes_over_a_shape_that_found_no_room_unread():
    # 10,000 jobs that may only use host b (busy), one that fits a: the
    # planner takes one job of the unfit shape, then the one that fits.
    polls = {"a": host("a", [0], 2), "b": host("b", [], 2)}
    made = []
    need = {"hosts": ["b"]}

    def make(n, group):
        made.append(n)
        return dq.Queued(f"{n}-x", group[0], need if group[1] != "-" else None, 0, None,
                         group[1])
    groups = {(1, dq.need_shape(need)): [(dq.order_key(n, 0, 0), n) for n in range(1, 10001)],
              (1, "-"): [(dq.order_key(10001, 0, 0), 10001)]}
    out = dq.plan({"x": dq.UserQueue(groups, make)}, [], polls, {}, 10, cfg())
    assert out.placed == [("10001-x", "a", [0])] and made == [1, 10001]
    assert out.reasons == {"1-x": "hosts"}     # a's GPU is free, but it may use b only


def test_user_queue_merges_shapes_in_order_and_drops_a_shape():
    made = []

    def make(job_id, group):
        made.append(job_id)
        return dq.Queued(job_id, group[0], None, 0, None, group[1])
    groups = {(1, "-"): [(dq.order_key(n, 0, 0), f"{n}-x") for n in (5, 1, 3)],
              (2, "abc"): [(dq.order_key(n, 0, 0), f"{n}-x") for n in (2, 4)],
              (1, "def"): [(dq.order_key(6, 9, 0), "6-x")]}
    q = dq.UserQueue(groups, make)
    assert [next(q).job_id for _ in range(3)] == ["6-x", "1-x", "2-x"]
    q.drop(2, "abc")
    assert [i.job_id for i in q] == ["3-x", "5-x"]
    assert "4-x" not in made        # dropped unmade


def test_user_order_priority_then_top_then_submission():
    keys = {"1": dq.order_key(1, 0, 0), "2": dq.order_key(2, 5, 0), "3": dq.order_key(3, 0, 2),
            "4": dq.order_key(4, 0, 7), "5": dq.order_key(5, -1, 9)}
    assert sorted(keys, key=keys.get) == ["2", "4", "3", "1", "5"]
    name = dq.queue_name("12-x", {"gpus": 2, "need": {"hosts": ["b"]}, "priority": -3,
                                  "top": 4, "held": True, "submitted": 1700000000.2})
    m = dq.QUEUE_NAME_RE.match(name)
    assert m and m.group(1, 2, 4, 5, 6, 7) == ("12", "2", "-3", "4", "1700000001", "_h")
    # a name of an older dq, without the submit time, still reads
    m = dq.QUEUE_NAME_RE.match("12_2_-_0_0_w")
    assert m and m.group(6, 7) == (None, "_w")


def test_plan_multi_gpu_job_stays_on_one_host():
    polls = {"a": host("a", [0], 2), "b": host("b", [1], 2)}
    assert plan([("1-x", 2, 0)], polls, {}, 10, cfg()) == []


def test_plan_cpu_jobs_spread_and_respect_slots():
    polls = {"a": host("a", [], 2), "b": host("b", [], 2)}
    queue = [(f"{i}-x", 0, 0) for i in range(1, 6)]
    assert plan(queue, polls, {}, 10, cfg(cpu_slots=2)) == []
    out = plan([], polls, {}, 10, cfg(cpu_slots=2), cpu=queue)
    assert len(out) == 4
    assert sorted(h for _, h, _ in out) == ["a", "a", "b", "b"]


def test_job_id_pattern():
    assert dq.JOB_ID_RE.match("42").groups() == ("42", None)
    assert dq.JOB_ID_RE.match("42-alice").groups() == ("42", "alice")
    for bad in ("", "abc", "42-", "-1", "4 2", "42;rm", "42-$(x)", "../1-a"):
        assert not dq.JOB_ID_RE.match(bad), bad


def test_session_names_are_prefix_free():
    names = [dq.session_name(f"{n}-alice") for n in range(1, 200)]
    for a in names:
        for b in names:
            assert a == b or not b.startswith(a)


def test_atomic_write_and_newer_format_refused(tmp_path):
    p = tmp_path / "x.json"
    dq.write_json(str(p), {"a": 1})
    assert dq.read_json(str(p))["a"] == 1
    with pytest.raises(FileExistsError):
        dq.write_json(str(p), {"a": 2}, exclusive=True)
    assert dq.read_json(str(p))["a"] == 1
    p.write_text('{"format": 99}')
    with pytest.raises(dq.Failure, match="newer dq"):
        dq.read_json(str(p))
    p.write_text('{"trunc')
    assert dq.read_json(str(p), {"d": 1}) == {"d": 1}
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


@pytest.mark.parametrize("text,n,want", [
    (b"a\nb\nc\n", 2, b"b\nc\n"), (b"a\nb\nc", 2, b"b\nc"), (b"a\nb\nc\n", 5, b"a\nb\nc\n"),
    (b"", 3, b""), (b"a\n", 0, b""), (b"x" * 100000 + b"\n" + b"y\n" * 70000, 3, b"y\n" * 3),
])
def test_last_lines_offset(tmp_path, text, n, want):
    p = tmp_path / "log"
    p.write_bytes(text)
    with open(p, "rb") as f:
        f.seek(dq.last_lines_offset(f, n))
        assert f.read() == want


def test_last_lines_offset_looks_back_at_most_so_far(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\n" + b"x" * 100000 + b"\nb\n")
    with open(p, "rb") as f:
        assert dq.last_lines_offset(f, 1, most=10) == p.stat().st_size - 2     # "b\n"
        assert dq.last_lines_offset(f, 2, most=10) == p.stat().st_size - 10
        assert dq.last_lines_offset(f, 2, most=10 ** 6) == 2


@pytest.mark.parametrize("text,kw,want", [
    ("0", {}, 0), ("007", {}, 7), ("12", {"high": 12}, 12), ("13", {"high": 12}, None),
    ("0", {"low": 1}, None), ("", {}, None), (" 1", {}, None), ("1 ", {}, None),
    ("1.5", {}, None), ("1e3", {}, None), ("\u00b2", {}, None), ("\u0661", {}, None),
    ("-1", {}, None), ("+1", {}, None), ("-5", {"signed": True}, -5),
    ("+5", {"signed": True}, 5), ("-5", {"signed": True, "low": -4}, None),
    ("-", {"signed": True}, None),
])
def test_whole_number(text, kw, want):
    assert dq.whole_number(text, **kw) == want


def test_listings_durations_read_back_as_durations():
    for s, text in [(0, "0s"), (-3, "0s"), (45.9, "45s"), (5400, "1h30m"), (90061, "1d1h1m1s")]:
        assert dq.fmt_duration(s) == text
        assert s <= 0 or dq.duration("DQ_TIME", text, "DQ_TIME") == int(s)


@pytest.mark.parametrize("text,want", [
    ("USR1@10m", ("SIGUSR1", 600)), ("SIGUSR2@90s", ("SIGUSR2", 90)),
    ("TERM@30", ("SIGTERM", 30)), (" usr1 @ 1h30m ", ("SIGUSR1", 5400)),
    ("sigint@2d", ("SIGINT", 172800)), ("USR1", ("SIGUSR1", None)),
])
def test_dq_signal_reads_a_signal_and_a_time_before_the_limit(text, want):
    sig, lead = dq.parse_signal(text)
    assert (sig.name, lead) == want


@pytest.mark.parametrize("text,needle", [
    ("KILL@10m", "SIGKILL cannot be trapped"), ("SIGSTOP@1m", "SIGSTOP cannot be trapped"),
    ("USR3@1m", "USR3 is not a signal"), ("9@1m", "9 is not a signal"),
    ("@1m", "(none) is not a signal"), ("", "(none) is not a signal"),
    ("USR1@", "'' is not a time"), ("USR1@0", "'0' is not a time"),
    ("USR1@1h30", "'1h30' is not a time"), ("USR1@-5s", "'-5s' is not a time"),
    ("USR1@10m@5m", "is not a time"),
])
def test_dq_signal_refuses_what_a_job_cannot_use(text, needle):
    with pytest.raises(dq.Failure) as e:
        dq.parse_signal(text)
    assert needle in str(e.value) and "e.g. DQ_SIGNAL=USR1@10m" in str(e.value)
    assert str(e.value).startswith(f"DQ_SIGNAL={text!r}")


def test_dq_signal_must_come_before_the_limit():
    assert dq.job_signal({}, 60) is None
    assert dq.job_signal({"DQ_SIGNAL": "USR1@59s"}, 60)[1] == 59
    assert dq.job_signal({"DQ_SIGNAL": "USR1@1h"}, None)[1] == 3600   # serves dq-kill --grace
    for limit in (60, 30):
        with pytest.raises(dq.Failure, match="before it starts; give a shorter time"):
            dq.job_signal({"DQ_SIGNAL": "USR1@1m"}, limit)
    # what the wrapper takes from a job dq-submit did not check: no warning
    assert dq.warning_signal({"env": {"DQ_SIGNAL": "KILL@1m"}, "time_limit": 600}) is None
    assert dq.warning_signal({"env": {"DQ_SIGNAL": "USR1@1m"}, "time_limit": 30}) is None
    assert dq.warning_signal({"env": {"DQ_SIGNAL": "HUP@1m"}})[0].name == "SIGHUP"


class FakeClock:
    """dq.time for TimeLimit: monotonic and wall clock move together, by hand."""
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time(self):
        return self.now + 1_700_000_000

    def sleep(self, s):
        self.now += s


def timer_for(tmp_path, monkeypatch, env, limit=None):
    """A TimeLimit whose signals are recorded, not sent: (timer, sent, clock)."""
    clock = FakeClock()
    monkeypatch.setattr(dq, "time", clock)
    job = types.SimpleNamespace(id="7-alice", dir=str(tmp_path),
                                spec={"env": env, "time_limit": limit})
    timer = dq.TimeLimit(job, 5, clock.time())
    sent = []
    timer._send = lambda sig: sent.append((clock.now - 1000.0, sig.name))
    timer.start(4242)
    return timer, sent, clock


def run_timer(timer, clock, until, grace_at=None, grace=None, tmp_path=None):
    while clock.now - 1000.0 < until:
        if grace_at is not None and clock.now - 1000.0 >= grace_at:
            dq.write_json(os.path.join(tmp_path, "grace.json"),
                          {"grace": grace, "reason": "dq-kill --grace by test"})
            timer.notice()
            grace_at = None
        timer.check()
        clock.now += 0.5


def test_the_timer_warns_before_the_limit_then_terms_and_kills(tmp_path, monkeypatch):
    timer, sent, clock = timer_for(tmp_path, monkeypatch, {"DQ_SIGNAL": "USR1@10s"}, 60)
    assert timer.deadline == clock.time() + 60
    run_timer(timer, clock, 70)
    assert sent == [(50.0, "SIGUSR1"), (60.0, "SIGTERM"), (65.0, "SIGKILL")]
    assert timer.hit and timer.stopped_by is None


def test_the_timer_takes_a_grace_request_once(tmp_path, monkeypatch):
    # warned now, TERM when the grace ends, not warned again at the limit
    timer, sent, clock = timer_for(tmp_path, monkeypatch, {"DQ_SIGNAL": "USR1@10s"}, 100)
    run_timer(timer, clock, 120, grace_at=20, grace=30, tmp_path=tmp_path)
    assert sent == [(20.0, "SIGUSR1"), (50.0, "SIGTERM"), (55.0, "SIGKILL")]
    assert timer.stopped_by == "dq-kill --grace by test" and not timer.hit
    timer.notice()      # the lease thread seeing grace.json too: nothing more
    run_timer(timer, clock, 130)
    assert len(sent) == 3


def test_a_grace_never_goes_past_the_time_limit(tmp_path, monkeypatch):
    timer, sent, clock = timer_for(tmp_path, monkeypatch, {"DQ_SIGNAL": "USR2"}, 40)
    run_timer(timer, clock, 60, grace_at=20, grace=300, tmp_path=tmp_path)
    assert sent == [(20.0, "SIGUSR2"), (40.0, "SIGTERM"), (45.0, "SIGKILL")]
    # without DQ_SIGNAL: TERM now, KILL at the grace's end (or the limit's KILL)
    timer, sent, clock = timer_for(tmp_path, monkeypatch, {}, 40)
    run_timer(timer, clock, 60, grace_at=10, grace=300, tmp_path=tmp_path)
    assert sent == [(10.0, "SIGTERM"), (45.0, "SIGKILL")]
    timer, sent, clock = timer_for(tmp_path, monkeypatch, {}, None)
    run_timer(timer, clock, 60, grace_at=10, grace=4, tmp_path=tmp_path)
    assert sent == [(10.0, "SIGTERM"), (14.0, "SIGKILL")] and timer.deadline is None


def test_a_grace_after_the_limits_term_changes_nothing(tmp_path, monkeypatch):
    timer, sent, clock = timer_for(tmp_path, monkeypatch, {"DQ_SIGNAL": "USR1@5s"}, 10)
    run_timer(timer, clock, 30, grace_at=12, grace=60, tmp_path=tmp_path)
    assert sent == [(5.0, "SIGUSR1"), (10.0, "SIGTERM"), (15.0, "SIGKILL")]
    assert timer.hit and timer.stopped_by is None


def test_kill_grace_reads_durations():
    assert [dq.grace_seconds(t) for t in ("5m", "90s", "300", "1h30m")] == [300, 90, 300, 5400]
    for bad in ("", "0", "soon", "1h30", "-5"):
        with pytest.raises(dq.Failure, match="is not a duration above 0; e.g. --grace 5m"):
            dq.grace_seconds(bad)


def test_file_sizes_read_back_as_sizes():
    for n, text in [(0, "0B"), (512, "512B"), (3481, "3.4K"), (5 * 2 ** 20, "5M"),
                    (200 * 2 ** 20, "200M"), (int(1.5 * 2 ** 30), "1.5G")]:
        assert dq.fmt_bytes(n) == text
        assert n < 2 ** 20 or dq.size_mib("snapshot_max", text) == n // 2 ** 20


def test_readme_example_config_parses(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(dq.DQ_PY), "README.md")).read()
    block = readme.split("    [dq]\n", 1)[1].split("\n\n", 1)[0]
    conf = "[dq]\n" + "\n".join(line[4:] for line in block.splitlines())
    (tmp_path / "dq.conf").write_text(conf)
    monkeypatch.setenv("DQ_ROOT", str(tmp_path))
    cfg = dq.Config()
    assert cfg.hosts == ["deep1", "deep2", "deep3"]
    assert cfg.ssh == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    assert (cfg.timeout, cfg.lost_after, cfg.python) == (15, 45, "python3")
    assert (cfg.order, cfg.gpu_limit("alice"), cfg.gpu_limit("bob")) == ("fairshare", 12, 8)


def test_bad_config_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_ROOT", str(tmp_path))
    for text, needle in (("[dq]\nhosts = a b;c\n", "bad host name"),
                         ("[dq]\ntimeout = soon\n", "'timeout' must be a number"),
                         ("[dq]\nssh = ssh -o 'x\n", "'ssh'"),
                         ("hosts = a\n", "cannot parse")):
        (tmp_path / "dq.conf").write_text(text)
        with pytest.raises(dq.Failure, match=needle):
            dq.Config()


def test_first_line_starts_dq_the_way_boot_does():
    """dq.py's /bin/sh line and dq.BOOT (used to start the loop and the job
    wrappers) must run the same code."""
    with open(dq.DQ_PY) as f:
        first, line = f.readline(), f.readline()
    assert first == "#!/bin/sh\n"
    assert f"exec python3 -S -c '{dq.BOOT}' \"$0\" \"$@\"" in line
    argv = dq.dq_argv("python3", "_run", "1-x")
    assert argv[:5] == ["python3", "-S", "-c", dq.BOOT, dq.DQ_PY] and argv[5:] == ["_run", "1-x"]


def apps_only(apps, rc=0):
    return f"@@apps\n{apps}@@rc {rc}\n"


def test_handover_poll_uses_the_gpu_table_of_the_last_full_poll():
    table = {"at": 50.0, "gpus": [[0, UUID0, 81559, "NVIDIA H100 80GB HBM3"],
                                  [1, UUID1, 81559, "NVIDIA H100 80GB HBM3"]], "all_known": True}
    st = dq.parse_poll("node1", dq.Result("node1", 0, apps_only(f"{UUID1}, 4321, 900\n"),
                                          "", 0.01), 100.0, table)
    assert st.error is None and st.free() == [0]
    assert st.gpus[1].pids == [4321]
    assert (st.gpus[1].name, st.gpus[1].total) == ("NVIDIA H100 80GB HBM3", 81559)
    assert st.table_at == 50.0 and st.sessions is None


def test_handover_poll_failing_or_naming_a_new_gpu_frees_nothing(tmp_path):
    table = {"at": 50.0, "gpus": [[0, UUID0, 81559, "NVIDIA H100 80GB HBM3"]], "all_known": True}
    st = dq.parse_poll("node1", dq.Result("node1", 0, apps_only("", rc=9), "", 0.01),
                       100.0, table)
    assert st.error and st.free() == []
    st = dq.parse_poll("node1", dq.Result("node1", 0, apps_only(f"{UUID1}, 1, 10\n"), "",
                                          0.01), 100.0, table)
    assert st.free() == []
    # ... and the table is read again at the next hand-over
    cfg = types.SimpleNamespace(p=lambda *parts: str(tmp_path.joinpath(*parts)))
    tmp_path.joinpath("state").mkdir()
    full = parsed(poll_output(f"0, {UUID0}, 0, 81559, NVIDIA H100 80GB HBM3\n", ""))
    dq.track_hosts(cfg, {"node1": full})
    seen = dq.read_json(cfg.p("state", "hosts.json"), {})["seen"]["node1"]
    assert seen["table"]["gpus"] == [[0, UUID0, 81559, "NVIDIA H100 80GB HBM3"]]
    dq.track_hosts(cfg, {"node1": st})
    assert dq.read_json(cfg.p("state", "hosts.json"), {})["seen"]["node1"]["table"] is None


def _hold_lock(path, seconds):
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); "
                          "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); "
                          "time.sleep(float(sys.argv[2]))", path, str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("in_thread", [False, True])
def test_lock_is_taken_when_the_holder_lets_go(tmp_path, in_thread):
    path = str(tmp_path / "lock")
    holder = _hold_lock(path, 0.5)
    t0 = time.monotonic()
    got = []

    def take():
        with dq.Lock(path, timeout=10):
            got.append(time.monotonic() - t0)   # the holder's 0.5 s, not the 10
    if in_thread:       # no SIGALRM there: the polling wait
        import threading
        t = threading.Thread(target=take)
        t.start()
        t.join()
    else:
        take()
    assert len(got) == 1 and 0.3 < got[0] < 5
    assert holder.wait(timeout=5) == 0


def test_lock_wait_times_out_with_the_fix_named(tmp_path):
    path = str(tmp_path / "lock")
    holder = _hold_lock(path, 5)
    try:
        with pytest.raises(dq.Failure, match="timed out after 0.3s waiting for the lock"):
            dq.Lock(path, timeout=0.3).acquire()
        assert not dq.Lock(path).acquire(blocking=False)
        import signal
        assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL   # left as found
    finally:
        holder.kill()
        holder.wait()
    assert dq.Lock(path).acquire(blocking=False)


# The placement model ########################################################

def poll_at(started, sessions):
    st = dq.HostState("node1", started)
    st.sessions = set(sessions)
    return st


def placements(state, since=100.0, **extra):
    places = dq.Placements(cfg(timeout=15))
    places["7-x"] = dict({"user": "x", "host": "node1", "gpus": [0], "state": state,
                          "since": since}, **extra)
    return places


def never():
    raise AssertionError("run.json read where the poll proves nothing")


def test_a_poll_older_than_the_sighting_proves_nothing():
    # The captured race: one pass saw the job's session (at 105) and
    # confirmed it; another pass whose poll began at 102, before the
    # session existed, then judges it.
    places = placements(dq.Placements.RUNNING, seen=105.0)
    assert places.session_verdict("7-x", poll_at(102.0, []), never, 110) is None
    assert places.session_verdict("7-x", poll_at(106.0, []), never, 110) == "gone"
    assert places.session_verdict("7-x", poll_at(106.0, ["7-x"]), never, 110) == "seen"


def test_a_launch_is_judged_on_its_wrapper_start_or_after_the_grace():
    places = placements(dq.Placements.LAUNCHING)
    # began before the claim: nothing
    assert places.session_verdict("7-x", poll_at(99.0, []), never, 130) is None
    # the wrapper started at 101: a poll from 101.5 may predate its session
    assert places.session_verdict("7-x", poll_at(101.5, []), lambda: 101.0, 102) is None
    assert places.session_verdict("7-x", poll_at(103.0, []), lambda: 101.0, 104) == "gone"
    # no wrapper yet: gone only once the launch must be over
    assert places.session_verdict("7-x", poll_at(110.0, []), lambda: None, 110) is None
    late = 100 + 15 + dq.LAUNCH_GRACE
    assert places.session_verdict("7-x", poll_at(late, []), lambda: None, late) == "gone"


def test_assigned_jobs_and_polls_without_ps_prove_nothing():
    places = placements(dq.Placements.ASSIGNED)
    assert places.session_verdict("7-x", poll_at(200.0, []), never, 200) is None
    places = placements(dq.Placements.RUNNING, seen=105.0)
    st = poll_at(200.0, [])
    st.sessions = None
    assert places.session_verdict("7-x", st, never, 200) is None


@pytest.mark.parametrize("state", [dq.Placements.LAUNCHING, dq.Placements.RUNNING])
def test_a_job_dq_kill_recorded_keeps_its_gpus_until_it_is_surely_gone(tmp_path, monkeypatch,
                                                                       state):
    """The captured race: dq-kill wrote end.json of a job still launching;
    a pass that did not poll its host dropped the placement and gave its GPU
    out while the job was still dying."""
    monkeypatch.setenv("DQ_ROOT", str(tmp_path))
    c = dq.Config()
    dq.ensure_layout(c)
    now = time.time()
    d = c.job_dir("7-x")
    os.makedirs(d)
    dq.write_json(os.path.join(d, "run.json"), {"host": "node1", "gpus": [0], "started": now - 2})
    dq.write_json(os.path.join(d, "end.json"), {"state": "killed", "ended": now})
    lease = dq.lease_path(c, "7-x")
    os.makedirs(os.path.dirname(lease), exist_ok=True)
    open(lease, "w").close()

    def kept(polls, at=now):
        places = placements(state, since=now - 3, seen=now - 1)
        places.cfg = c
        dq.reconcile(c, places, polls, at)
        return "7-x" in places
    assert kept({})                                             # node1 not polled
    assert kept({"node1": poll_at(now - 0.5, ["7-x"])})         # its session is there
    silent = dq.HostState("node1", now)
    silent.reachable, silent.error = False, "unreachable"
    assert kept({"node1": silent})
    later = now + dq.CLOCK_SLACK + 1
    assert not kept({"node1": poll_at(later, [])}, later)       # a poll proves it gone
    # its lease stopped lost_after ago: its wrapper is gone, or stopped it
    old = now - dq.lease_times(c).lost - 1
    os.utime(lease, (old, old))
    assert not kept({})
    # killed before its launch: nothing of it runs
    os.utime(lease, (now, now))
    places = placements(dq.Placements.ASSIGNED, since=now - 1)
    places.cfg = c
    dq.reconcile(c, places, {}, now)
    assert "7-x" not in places


def test_transitions_and_what_they_save(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_ROOT", str(tmp_path))
    c = dq.Config()
    dq.ensure_layout(c)
    with dq.Placements.locked(c) as places:
        places.assign("1-x", "node1", [0], 10.0)
        places.assign("2-y", "node1", [1], 10.0)
        assert places.claim("x", 11.0) == [("1-x", "node1", [0], None)]
        assert places.handed_out
    places = dq.Placements.read(c)
    assert places.state("1-x") == "launching" and places.state("2-y") == "assigned"
    assert places.unclaimed_users() == {"y"} and places.counts("x") == (0, 1)
    mtime = os.stat(dq.Placements.path(c)).st_mtime_ns
    with dq.Placements.locked(c) as places:
        assert places.drop("3-z") is False      # nothing changed: not rewritten
    assert os.stat(dq.Placements.path(c)).st_mtime_ns == mtime
    with dq.Placements.locked(c) as places:
        places.confirm("1-x", 12.0)
        places.drop("2-y")
    assert dict(dq.Placements.read(c)) == {"1-x": {
        "user": "x", "host": "node1", "gpus": [0], "state": "running", "since": 11.0,
        "seen": 12.0}}


def test_plan_fair_share_goes_to_who_holds_fewest_gpus():
    polls = {"a": host("a", {2, 3}, 4)}
    places = {"1-x": {"host": "a", "gpus": [0, 1], "state": "running", "user": "x",
                      "since": 0}}

    def queues():
        return {"x": [("2-x", 1, 0), ("3-x", 1, 0)], "y": [("4-y", 1, 5), ("5-y", 1, 5)]}
    fair = [j for j, _, _ in plan(queues(), polls, places, 10, cfg(order="fairshare"))]
    assert fair == ["4-y", "5-y"]
    fifo = [j for j, _, _ in plan(queues(), polls, places, 10, cfg(order="fifo"))]
    assert fifo == ["2-x", "3-x"]
    # holding as many: the earlier job first, then turns
    even = [j for j, _, _ in plan(queues(), {"a": host("a", {0, 1, 2, 3}, 4)}, {}, 10,
                                       cfg(order="fairshare"))]
    assert even == ["2-x", "4-y", "3-x", "5-y"]


def test_plan_fair_share_ties_go_to_less_recent_usage():
    polls = {"a": host("a", {0, 1, 2}, 3)}
    queues = {"x": [("1-x", 1, 0), ("2-x", 1, 0)], "y": [("3-y", 1, 0), ("4-y", 1, 0)]}
    used = {"x": 5000.0, "y": 10.0}
    out = [j for j, _, _ in plan(queues, polls, {}, 10, cfg(order="fairshare"),
                                    usage=used)]
    # held GPUs first (y after its first job holds as many as x), usage next
    assert out == ["3-y", "1-x", "4-y"]
    counters = {"usage": 1000.0, "usage_at": 0.0}
    assert dq.decayed(counters, 86400, 86400) == 500.0


def test_plan_user_limit_leaves_gpus_idle_for_others_only():
    polls = {"a": host("a", {0, 1, 2, 3}, 4)}
    limits = {"x": 2}
    c = cfg(order="fairshare", gpu_limit=limits.get)
    queues = {"x": [("1-x", 1, 0), ("2-x", 2, 0), ("3-x", 1, 0), ("4-x", 1, 0)],
              "y": [("5-y", 1, 0)]}
    out = [j for j, _, _ in plan(queues, polls, {}, 10, c)]
    # x gets two 1-GPU jobs (its 2-GPU job would take it to 3), y its one;
    # the fourth GPU stays idle: the limit holds even with nobody waiting
    assert out == ["1-x", "5-y", "3-x"]


def gpu_host(name, model, total_mib, free_idx, count=2, error=None):
    st = host(name, free_idx, count)
    for g in st.gpus:
        g.name, g.total = model, total_mib
    st.error = error
    if error:
        st.reachable = False
    return st


def test_every_wait_reason_comes_from_the_planner():
    # One cluster, one queue per scenario; the planner's reasons, gathered,
    # cover every reason dq has (WAIT_REASONS): none is left unreachable.
    polls = {"a": gpu_host("a", "NVIDIA GeForce GTX 1080 Ti", 11264, [0]),
             "b": gpu_host("b", "NVIDIA A100-SXM4-80GB", 81920, [1]),
             "c": gpu_host("c", "NVIDIA A100-SXM4-80GB", 81920, [], error="no answer"),
             "d": gpu_host("d", "NVIDIA A100-SXM4-80GB", 81920, [0, 1])}
    placed = {"9-z": {"user": "z", "host": "a", "gpus": [], "state": "running", "since": 0},
              "8-y": {"user": "y", "host": "b", "gpus": [0], "state": "assigned", "since": 0}}
    Q = dq.Queued
    got = {}

    def reasons(queues, cpu=(), c=None, now=10):
        out = dq.plan(queues, list(cpu), polls, placed, now, c or cfg(), drained={"d"},
                      explain=True)
        got.update(out.reasons)
        return out.reasons
    assert reasons({"x": [Q("1-x", 1, held=True), Q("2-x", 1, waiting=True, waits_on="7-z"),
                          Q("3-x", 1, waiting=True)],
                    "y": [Q("8-y", 1)]}) == \
        {"1-x": "held", "2-x": "after 7-z", "3-x": "next pass", "8-y": "starting"}
    assert reasons({"y": [Q("10-y", 1), Q("11-y", 1)]},
                   c=cfg(gpu_limit={"y": 2}.get)) == {"11-y": "user limit"}
    assert reasons({"x": [Q("12-x", 1, {"hosts": ["c"]}), Q("13-x", 1, {"hosts": ["d"]}),
                          Q("14-x", 1, {"hosts": ["nowhere*"]}), Q("15-x", 3),
                          Q("16-x", 1, {"gpu_type": "H100"}), Q("17-x", 1, {"hosts": ["a"]}),
                          Q("18-x", 1, {"gpu_mem": 40000})]}) == \
        {"12-x": "hosts down", "13-x": "drained", "14-x": "hosts", "15-x": "GPUs busy",
         "16-x": "GPU kind"}      # 17-x takes a's GPU, then 18-x b's
    # a job that has waited starve_after keeps a (the first of the hosts
    # closest to fitting it) for itself; a 1-GPU job that may use only a
    # then waits for it
    assert reasons({"x": [Q("20-x", 2, submitted=0)], "y": [Q("21-y", 1, {"hosts": ["a"]})]},
                   now=10_000) == {"20-x": "GPUs busy", "21-y": "kept for 20-x"}
    # a sharing job too big for what b's free GPU has left once share_margin is kept
    assert reasons({"x": [Q("25-x", 1, {"mem": 81000})]}) == \
        {"25-x": "GPU memory: 78.4G free at most, needs 79.1G"}
    assert reasons({}, cpu=[Q("22-x", 0), Q("23-x", 0), Q("24-x", 0)],
                   c=cfg(cpu_slots=1)) == {"23-x": "CPU slots", "24-x": "CPU slots"}
    # (a runs a CPU-only job already, c is down, d drained: 22-x takes b)
    reached = {next(w for w in dq.WAIT_REASONS if re.fullmatch(
        re.sub(r"\\\{[a-z]+\\\}", ".+", re.escape(w)), r)) for r in got.values()}
    assert reached == set(dq.WAIT_REASONS)


def test_a_new_constraint_is_one_table_entry(monkeypatch):
    # What the README's "Patching dq" adds: DQ_GPU_MAX_MEM, keep small jobs
    # off big GPUs.  One entry, and it is parsed, stored, planned,
    # explained, described and refused at submit.
    monkeypatch.setattr(dq, "WAIT_REASONS", dict(dq.WAIT_REASONS))
    entry = dq.Constraint(
        "DQ_GPU_MAX_MEM", "gpu_max_mem", lambda t: dq.size_mib("DQ_GPU_MAX_MEM", t),
        lambda v: dq.is_int(v, 1), "a size in MiB", lambda v: f"DQ_GPU_MAX_MEM={v}M",
        ("GPU too big", "GPUs are free, but all bigger than DQ_GPU_MAX_MEM"),
        gpu=lambda v, name, total: total is not None and total <= v)
    monkeypatch.setattr(dq, "CONSTRAINTS", dq.CONSTRAINTS + [entry])
    need = dq.job_needs({"DQ_GPU_MAX_MEM": "12G", "DQ_HOSTS": "a,b"}, 1)
    assert need == {"hosts": ["a", "b"], "gpu_max_mem": 12288}
    assert dq.is_need(need) and not dq.is_need({"gpu_max_mem": "big"})
    assert dq.describe_need(need) == "DQ_HOSTS=a,b DQ_GPU_MAX_MEM=12288M"
    assert dq.need_shape(need) != dq.need_shape({"hosts": ["a", "b"]})
    with pytest.raises(dq.Failure, match="DQ_GPU_MAX_MEM='lots' is not a size"):
        dq.job_needs({"DQ_GPU_MAX_MEM": "lots"}, 1)
    with pytest.raises(dq.Failure, match="DQ_GPU_MAX_MEM chooses GPUs, but DQ_GPUS=0"):
        dq.job_needs({"DQ_GPU_MAX_MEM": "12G"}, 0)
    polls = {"a": gpu_host("a", "NVIDIA GeForce GTX 1080 Ti", 11264, [0]),
             "b": gpu_host("b", "NVIDIA A100-SXM4-80GB", 81920, [0, 1])}
    out = dq.plan({"x": [dq.Queued("1-x", 1, need), dq.Queued("2-x", 1, need)]}, [], polls, {},
                  10, cfg(), explain=True)
    assert out.placed == [("1-x", "a", [0])] and out.reasons == {"2-x": "GPU too big"}
    hosts = {"b": ([("NVIDIA A100-SXM4-80GB", 81920)] * 2, True)}
    with pytest.raises(dq.Failure, match=r"no host has 1 GPU\(s\) for DQ_GPU_MAX_MEM=12288M; "
                                         r"the cluster has 2 x NVIDIA A100"):
        dq.check_fits(types.SimpleNamespace(local=False), hosts, 1, {"gpu_max_mem": 12288})


def test_the_manual_says_every_wait_reason():
    manual = open(os.path.join(os.path.dirname(__file__), "..", "docs", "manual.md")).read()
    for words in dq.WAIT_REASONS:
        shown = re.sub(r"\{(\w+)\}", lambda m: "ID" if m.group(1) == "job" else m.group(1).upper(),
                       words)
        assert "- `" + shown + "`: " in manual, words


# The file's layout: what `grep '^# .*###' dq.py` promises an admin.
DQ_SOURCE = open(dq.__file__).read()
BANNER_RE = re.compile(r"^# (.*?) #{3,}$", re.M)


def top_level_names():
    """{name: (line, section)} of dq.py's functions, classes and constants."""
    import ast
    banners = [(DQ_SOURCE.count("\n", 0, m.start()) + 1, m.group(1))
               for m in BANNER_RE.finditer(DQ_SOURCE)]
    out = {}
    for node in ast.parse(DQ_SOURCE).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in node.targets if isinstance(t, ast.Name)] \
            if isinstance(node, ast.Assign) else []
        section = ([title for line, title in banners if line < node.lineno] or [None])[-1]
        for name in names:
            out.setdefault(name, (node.lineno, section, node))
    return out


def global_loads(node, names):
    """The top-level names a function, class or constant uses (a name a
    function binds itself is its own)."""
    import ast
    used = set()
    for fn in [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.Lambda))] or []:
        bound = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        for sub in ast.walk(fn):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                bound.add(sub.id)
            elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)) and sub is not fn:
                bound.add(sub.name)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in sub.names}
        used |= {sub.id for sub in ast.walk(fn) if isinstance(sub, ast.Name)
                 and isinstance(sub.ctx, ast.Load) and sub.id not in bound}
    if not isinstance(node, ast.FunctionDef):     # a class body or constant itself
        inner = {id(x) for fn in ast.walk(node) if isinstance(fn, (ast.FunctionDef, ast.Lambda))
                 for x in ast.walk(fn)}
        used |= {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)
                 and isinstance(sub.ctx, ast.Load) and id(sub) not in inner}
    return used & names


def test_dq_py_uses_only_what_is_above():
    names = top_level_names()
    below = sorted(f"{name} (line {line}) uses {used} (line {names[used][0]})"
                   for name, (line, _, node) in names.items()
                   for used in global_loads(node, set(names) - {name})
                   if names[used][0] > line)
    assert below == []


def test_where_to_change_what_names_what_is_there():
    names = top_level_names()
    table = dq.__doc__.split("Where to change what")[1].split("\n\n")[1]
    rows = re.findall(r"^  (.+?)\s{2,}(\S.*?)\s+\[(.+)\]$", table, re.M)
    assert len(rows) >= 12 and len(rows) == len(table.splitlines())
    for what, where, section in rows:
        for name in where.split(", "):
            assert name in names, (what, name)
            assert names[name][1].startswith(section), (what, name, names[name][1])


def test_every_command_lives_with_its_feature():
    # the rule: a command is the last thing of its section, after what it uses
    names = top_level_names()
    sections = [m.group(1) for m in BANNER_RE.finditer(DQ_SOURCE)]
    assert len(sections) == len(set(sections))
    commands = list(dq.COMMANDS.values()) + list(dq.INTERNAL.values())
    for cmd in commands:
        assert names[cmd.__name__][1] not in ("Main", None), cmd.__name__
