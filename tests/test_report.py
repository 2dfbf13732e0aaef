"""dq-report (issue 21) end to end: the histories kept as jobs end, the
report's GPU-hours, counts and waits, --by day over midnight, idle GPUs, bad
input, and a history rebuilt when its file is gone."""
import csv
import io
import json
import os
import pwd
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dq as dqpy  # noqa: E402
from dqtest import ALICE, BOB, DAN, configure, jobs, script, submit, synthetic_history, \
    wait_until  # noqa: E402

FAST = dict(poll_interval=0.5, sample_interval=1)


def report(dq, user, *args):
    r = dq.run("node1", user, "report", *args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r


def expected(done, user):
    """What dq-report must say of user's ended jobs, from dq-jobs' own view."""
    mine = [j for j in done if j["user"] == user]
    waits = sorted(j["started"] - j["submitted"] for j in mine if j["started"])
    gpu_s = sum(len(j["gpus"]) * (j["ended"] - j["started"]) for j in mine if j["started"])
    counts = {s: sum(j["state"] == s for j in mine) for s in dqpy.REPORT_STATES}
    return dict(counts, jobs=len(mine), gpu_hours=gpu_s / 3600,
                wait_median_s=dqpy.percentile(waits, 50), wait_p95_s=dqpy.percentile(waits, 95))


def check_row(row, want):
    for k in ("jobs",) + dqpy.REPORT_STATES:
        assert int(row[k]) == want[k], (k, row, want)
    assert abs(float(row["gpu_hours"]) - want["gpu_hours"]) < 0.001, (row, want)
    for k in ("wait_median_s", "wait_p95_s"):
        assert abs(float(row[k]) - want[k]) <= 0.1, (k, row, want)


def test_report_of_real_and_synthetic_jobs(cluster, dq):
    configure(dq, ["node1", "node2"], **FAST)
    _, idle = script(cluster, ALICE, "idle.sh", "exec fake-cuda --util 0 --hold 4\n")
    _, fail = script(cluster, ALICE, "fail.sh", "sleep 1; exit 3\n")
    _, long = script(cluster, ALICE, "long.sh", "exec fake-cuda --hold 60\n")
    _, busy = script(cluster, BOB, "busy.sh", "exec fake-cuda --util 90 --hold 4\n")
    ids = [submit(dq, "node1", ALICE, idle)[0], submit(dq, "node1", ALICE, fail)[0],
           submit(dq, "node1", ALICE, long)[0], submit(dq, "node2", BOB, busy)[0]]
    wait_until(lambda: {j["id"]: j["state"] for j in jobs(dq)}.get(ids[2]) == "running", 20)
    time.sleep(1)
    assert dq.run("node1", ALICE, "kill", ids[2]).returncode == 0
    wait_until(lambda: {j["id"] for j in jobs(dq, view="complete")} >= set(ids), 30,
               what="the jobs to end")
    done = [j for j in jobs(dq, view="complete") if j["id"] in ids]
    assert {j["id"]: j["state"] for j in done} == dict(zip(ids, ["done", "failed", "killed",
                                                                  "done"]))
    # telemetry kept with the ended job, in --json and dq-jobs complete's GPU% column
    by_id = {j["id"]: j for j in done}
    assert by_id[ids[0]]["gpu_use"]["samples"] >= 2
    assert by_id[ids[0]]["gpu_use"]["idle_gpu_s"] > 0
    assert by_id[ids[3]]["gpu_use"]["util_peak"] == 90
    text = dq.run("node1", BOB, "jobs", "complete").stdout
    assert "GPU%" in text.splitlines()[1] and "90% 500M" in text, text

    now = time.time()
    night = synthetic_history(dq, DAN, now)
    rows = {r["user"]: r for r in json.loads(report(dq, DAN, "--by", "user", "--json").stdout)}
    check_row(rows[ALICE], expected(done, ALICE))
    check_row(rows[BOB], expected(done, BOB))
    assert rows[ALICE]["idle_gpu_hours"] > 0 and rows[BOB]["idle_gpu_hours"] == 0
    assert rows[DAN]["jobs"] == 6 and rows[DAN]["timeout"] == 1 and \
        abs(rows[DAN]["gpu_hours"] - (5 * 0.5 + 2 * 5)) < 0.001
    assert rows[DAN]["idle_gpu_hours"] == 5 * 0.25
    r = report(dq, ALICE, "--csv")
    parsed = list(csv.DictReader(io.StringIO(r.stdout)))
    assert r.stdout.splitlines()[0] == "user," + ",".join(dqpy.REPORT_COLUMNS) and not r.stderr
    check_row({row["user"]: row for row in parsed}[BOB], expected(done, BOB))
    text = report(dq, BOB).stdout.splitlines()
    assert text[-1].startswith("total ") and text[1].split()[:3] == ["User", "Jobs", "Done"]

    # --by day: the job over midnight, by the hours on each day
    days = {r["day"]: r for r in json.loads(report(dq, BOB, "--by", "day", "--user", DAN,
                                                   "--json").stdout)}
    before, after = dqpy.period_key(night - 1, "day"), dqpy.period_key(night, "day")
    assert abs(days[before]["gpu_hours"] - (2 * 2 + 0.5)) < 0.001 and days[before]["jobs"] == 1
    assert days[after]["timeout"] == 1 and days[after]["jobs"] == 2 and \
        abs(days[after]["gpu_hours"] - (2 * 3 + 0.5)) < 0.001
    assert len(days) == 5
    types = {r["gpu_type"] for r in json.loads(report(dq, BOB, "--by", "gpu-type",
                                                      "--json").stdout)}
    assert "Old GPU" in types and types & {"NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 3090"}

    # bad input: one line, naming the option and an example
    for args in (["--since", "last tuesday"], ["--until", "2026-02-30"], ["--by", "moon"],
                 ["--since", "1d", "--until", "2d"]):
        r = dq.run("node1", BOB, "report", *args)
        assert r.returncode != 0 and not r.stdout and len(r.stderr.splitlines()) == 1, r.stderr
        assert args[-2] in r.stderr and "Traceback" not in r.stderr

    # a deleted history is rebuilt from the job directories: read by
    # anyone, saved by its owner (and a corrupt line costs one warning)
    path = os.path.join(dq.root, "jobs", "done", ALICE + dqpy.HISTORY)
    os.unlink(path)
    again = {r["user"]: r for r in json.loads(report(dq, BOB, "--json").stdout)}
    assert again[ALICE] == rows[ALICE] and not os.path.exists(path)
    assert json.loads(report(dq, ALICE, "--json").stdout) == list(again.values())
    assert os.path.exists(path) and pwd.getpwuid(os.stat(path).st_uid).pw_name == ALICE
    with open(path, "a") as f:
        f.write("{not json\n")
    r = report(dq, BOB, "--json")
    assert json.loads(r.stdout) == list(again.values())
    assert len(r.stderr.splitlines()) == 1 and "skipped 1 line" in r.stderr


# Pure parts ################################################################

def rec(i, user="u", started=1000.0, ended=4600.0, gpus=1, **kw):
    return dict({"format": 1, "id": f"{i}-{user}", "state": "done", "host": "h", "gpus": gpus,
                 "share": 1, "gpu_type": None, "submitted": (ended if started is None else started) - 10 * i,
                 "started": started, "ended": ended, "logged": ended}, **kw)


def test_percentiles_interpolate_between_ranks():
    assert dqpy.percentile([], 50) is None
    assert dqpy.percentile([4, 1, 3, 2], 50) == 2.5
    assert dqpy.percentile([7], 95) == 7
    assert dqpy.percentile(list(range(101)), 95) == 95


def test_split_at_local_midnight():
    midnight = dqpy.period_start(time.time(), "day")
    pieces = dqpy.split_by_period(midnight - 7200, midnight + 10800, "day")
    assert pieces == [(dqpy.period_key(midnight - 1, "day"), 7200),
                      (dqpy.period_key(midnight, "day"), 10800)]
    assert dqpy.split_by_period(midnight + 60, midnight + 120, "day") == \
        [(dqpy.period_key(midnight, "day"), 60)]
    monday = dqpy.period_start(midnight, "week")
    assert time.localtime(monday).tm_wday == 0 and monday <= midnight
    assert [k for k, _ in dqpy.split_by_period(monday - 1, monday + 1, "week")] == \
        [dqpy.period_key(monday - 1, "week"), dqpy.period_key(monday, "week")]


def test_rows_group_clip_to_the_window_and_total():
    records = [rec(1, "a", gpus=2, state="failed"), rec(2, "a", share=0.5, idle_gpu_s=900),
               rec(3, "b", started=0.0, ended=2000.0, state="killed"),
               rec(4, "b", started=None, ended=1500.0, state="cancelled"),
               rec(5, "c", started=5000.0, ended=9000.0)]     # ends after the window
    rows, total = dqpy.report_rows(records, "user", 1000.0, 5000.0)
    by = {r["user"]: r for r in rows}
    assert by["a"]["jobs"] == 2 and by["a"]["failed"] == 1 and by["a"]["done"] == 1
    assert by["a"]["gpu_hours"] == 2.5 and by["a"]["idle_gpu_hours"] == 0.25
    # b's first job is clipped to the window's start; the cancelled one never ran
    assert by["b"]["jobs"] == 2 and by["b"]["killed"] == 1 and by["b"]["gpu_hours"] == 0.2778
    assert by["b"]["wait_median_s"] == 30 and by["b"]["wait_p95_s"] == 30
    # c ended after it: no count, and nothing of it ran inside
    assert "c" not in by
    assert total["user"] == "total" and total["jobs"] == 4 and total["gpu_hours"] == 2.7778
    assert total["wait_median_s"] == 20
    assert [r["host"] for r in dqpy.report_rows(records, "host", 0, 1e10)[0]] == ["h"]


def test_history_is_found_by_time_and_corrupt_lines_are_skipped(tmp_path, monkeypatch):
    (tmp_path / "jobs" / "done").mkdir(parents=True)
    cfg = type("Cfg", (), {"p": lambda self, *parts: str(tmp_path.joinpath(*parts))})()
    user = dqpy.me()
    records = [rec(i, user, started=i * 100.0, ended=i * 100.0 + 50) for i in range(1, 5001)]
    dqpy.write_history(cfg, user, records)
    with open(dqpy.history_path(cfg, user), "a") as f:
        f.write("garbage\n" + json.dumps(dict(rec(9, user), format=2)) + "\n")
    read = []
    monkeypatch.setattr(dqpy, "json", type("J", (), {
        "loads": staticmethod(lambda s: read.append(1) or json.loads(s)),
        "dumps": json.dumps}))
    warned = []
    monkeypatch.setattr(dqpy, "warn", warned.append)
    got = dqpy.read_history(cfg, user, since=400_000.0)
    assert [r["id"] for r in got] == [f"{i}-{user}" for i in range(4000, 5001)]
    assert len(read) < 1000 + 100 + 60      # the window (+ the slack), not the whole file
    assert len(warned) == 1 and "skipped 2 line(s)" in warned[0]
    assert len(dqpy.read_history(cfg, user)) == 5000


def test_report_times():
    now = 1_800_000_000.0
    assert dqpy.report_time("--since", "7d", now) == now - 7 * 86400
    assert dqpy.report_time("--since", "2026-11-01", now) == \
        time.mktime((2026, 11, 1, 0, 0, 0, 0, 0, -1))
    assert dqpy.report_time("--until", "2026-11-01T09:30", now) == \
        time.mktime((2026, 11, 1, 9, 30, 0, 0, 0, -1))
    for bad in ("yesterday", "2026-11-31", "7x", "-3d", ""):
        try:
            dqpy.report_time("--since", bad, now)
        except dqpy.Failure as e:
            assert "--since" in str(e) and "e.g. --since 7d" in str(e)
        else:
            raise AssertionError(bad)
