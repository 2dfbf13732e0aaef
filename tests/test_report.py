"""dq-report (issue 21) end to end: the histories kept as jobs end, the
report's GPU-hours, counts and waits, --by day over midnight, idle GPUs, bad
input, and a history rebuilt when its file is gone."""
import csv
import io
import json
import math
import os
import pwd
import random
import sys
import time

import pytest

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



def test_report_from_a_day_summary(cluster, dq):
    """A history past DAYS_TAIL: its owner's dq-report makes the summary
    (jobs/done/<user>.days) and answers as the records do; anyone else's
    uses it, but never writes it, and only while it is the owner's."""
    configure(dq, ["node1"], **FAST)
    now = time.time()
    records = random_history(random.Random(4), DAN, now - 35 * 86400, days=35, n=450)
    for r in records:
        r["logged"] = min(r["logged"], now)
    cfg = type("Cfg", (), {"p": lambda self, *parts: os.path.join(dq.root, *parts)})()
    dqpy.write_history(cfg, DAN, records)
    pw = pwd.getpwnam(DAN)
    path, days = dqpy.history_path(cfg, DAN), dqpy.days_path(cfg, DAN)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    assert os.path.getsize(path) > dqpy.DAYS_TAIL
    since = time.strftime("%Y-%m-%dT%H:%M", time.localtime(now - 20.3 * 86400))
    until = time.strftime("%Y-%m-%d", time.localtime(now - 3 * 86400))
    asks = [("--since", "30d"), ("--since", "9d", "--by", "day", "-u", DAN),
            ("--since", since, "--until", until, "--by", "week", "-u", DAN),
            ("--since", since, "--until", until)]

    def answers(user):
        return [json.loads(report(dq, user, *a, "--json").stdout) for a in asks]
    before = answers(BOB)       # from the records: BOB does not write DAN's summary
    assert not os.path.exists(days)
    assert [r["user"] for r in before[0]] == [DAN] and before[0][0]["jobs"] > 300
    mine = answers(DAN)
    assert pwd.getpwuid(os.stat(days).st_uid).pw_name == DAN
    for got, want in zip(mine, before):
        same_rows((got, {}), (want, {}))
    for got, want in zip(answers(BOB), before):
        same_rows((got, {}), (want, {}))
    # BOB's report reads it: 1000 GPU-hours more in the totals of the
    # days of the window's second half make them DAN's
    with open(days) as f:
        head, *body = [json.loads(line) for line in f]
    offset = 0
    for i, (day, *_) in enumerate(head["index"]):
        totals, detail = body[2 * i], body[2 * i + 1]
        if day > now - 15 * 86400:
            totals["gpu_s"] += 3.6e6
        head["index"][i][1:] = [offset, offset + len(json.dumps(totals)) + 1]
        offset += len(json.dumps(totals)) + len(json.dumps(detail)) + 2
    with open(days, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in [head] + body)
    os.chown(days, pw.pw_uid, pw.pw_gid)
    got = json.loads(report(dq, BOB, "--since", "30d", "--json").stdout)
    assert abs(got[0]["gpu_hours"] - before[0][0]["gpu_hours"] - 1000) < 0.01, (got, before)
    # ...but not once it is another user's
    os.chown(days, pwd.getpwnam(BOB).pw_uid, pw.pw_gid)
    got = json.loads(report(dq, ALICE, "--since", "30d", "--json").stdout)
    same_rows((got, {}), (before[0], {}))


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


# Day summaries (jobs/done/<user>.days) ######################################

USERS = ("ann", "ben", "cyd")


class Owner(str):
    """user_of_uid's answer in the pure tests, where one uid owns every
    file: whichever of USERS a file is checked against."""

    def __eq__(self, other):
        return other in USERS

    def __ne__(self, other):
        return not self == other

    __hash__ = str.__hash__


def tmp_cfg(tmp_path):
    (tmp_path / "jobs" / "done").mkdir(parents=True, exist_ok=True)
    return type("Cfg", (), {"p": lambda self, *parts: str(tmp_path.joinpath(*parts))})()


def random_history(rnd, user, start, days=40, n=400, first=1):
    """n records of user's jobs ending over `days` days from `start`: 1 min
    to 30 h, some over one or several midnights, some that never ran, CPU
    jobs, shares, idle GPU-seconds, every end state, some logged late."""
    out = []
    for i in range(first, first + n):
        ended = start + rnd.uniform(0, days * 86400)
        runtime = math.exp(rnd.uniform(math.log(60), math.log(30 * 3600)))
        started = None if rnd.random() < 0.08 else ended - runtime
        submitted = (ended if started is None else started) - rnd.choice(
            (0.0, 0.005, rnd.expovariate(1 / 300), rnd.uniform(0, 86400)))
        gpus = rnd.choice((0, 1, 1, 1, 2, 4, 8))
        rec = {"format": 1, "id": f"{i}-{user}", "state": rnd.choice(dqpy.END_STATES),
               "host": "h", "gpus": gpus, "share": rnd.choice((1, 0.25, 0.3)) if gpus == 1 else 1,
               "gpu_type": None, "submitted": submitted, "started": started, "ended": ended,
               "logged": ended + (rnd.uniform(0, 3 * 86400) if rnd.random() < 0.05
                                  else rnd.uniform(0, 2))}
        if started is not None and gpus and rnd.random() < 0.7:
            rec["idle_gpu_s"] = round(rnd.uniform(0, 1.2) * runtime * gpus, 1)
        assert dqpy.history_ok(rec), rec
        out.append(rec)
    return out


def append(cfg, user, records):
    with open(dqpy.history_path(cfg, user), "a") as f:
        f.writelines(dqpy.history_line(r) for r in records)


def same_rows(got, want, exact_waits=False):
    """got (from summaries) is want (from records): counts exact, GPU-hours
    to 1e-3, waits to the bucket (4.4%) or exactly."""
    (rows, total), (wrows, wtotal) = got, want
    assert len(rows) == len(wrows), (rows, wrows)
    for r, w in zip(rows + [total], wrows + [wtotal]):
        for k in w:
            if k in ("gpu_hours", "idle_gpu_hours"):
                assert abs(r[k] - w[k]) <= 1e-3, (k, r, w)
            elif k in ("wait_median_s", "wait_p95_s") and not exact_waits:
                assert (r[k] is None) == (w[k] is None), (k, r, w)
                if w[k] is not None:
                    assert abs(r[k] - w[k]) <= 0.05 * w[k] + 0.1, (k, r, w)
            else:
                assert r[k] == w[k], (k, r, w)


def windows(rnd, start, days):
    """--since/--until pairs: at any time, at midnights, inside one day,
    the last 30 days, and some past the history's ends."""
    out = []
    for _ in range(12):
        a, b = sorted(rnd.uniform(start - 86400, start + (days + 1) * 86400) for _ in range(2))
        out.append((a, b))
    for _ in range(6):
        a = dqpy.period_start(rnd.uniform(start, start + days * 86400), "day")
        out.append((a, dqpy.period_start(a + rnd.uniform(1, 20) * 86400, "day")))
        out.append((a, a + rnd.uniform(1, 5 * 86400)))
        out.append((rnd.uniform(a - 86400, a), a))
    for _ in range(6):
        day = dqpy.period_start(rnd.uniform(start, start + days * 86400), "day")
        a = day + rnd.uniform(0, 86000)
        out.append((a, rnd.uniform(a + 1, dqpy.next_period(day, "day"))))
    end = start + days * 86400
    out += [(end - 30 * 86400, end), (start - 86400, end + 86400), (start + 0.5, end - 0.5)]
    return out


def compare_all(cfg, monkeypatch, records, start, days, seed, exact_waits=False):
    rnd = random.Random(seed)
    for since, until in windows(rnd, start, days):
        for by in ("user", "day", "week"):
            want = dqpy.report_rows([r for u in USERS for r in records[u]], by, since, until)
            tally = dqpy.Tally(by, since, until)
            for u in USERS:
                assert dqpy.summary_report(cfg, u, tally), u
            same_rows(tally.rows(), want, exact_waits)
            same_rows(dqpy.user_report(cfg, list(USERS), by, since, until), want, exact_waits)


@pytest.mark.parametrize("zone", [None, "Europe/Berlin"])
def test_day_summaries_give_the_records_answer(tmp_path, monkeypatch, zone):
    if zone:        # 40 days over the end of summer time: a day of 25 hours
        monkeypatch.setenv("TZ", zone)
        time.tzset()
    try:
        start = time.mktime((2026, 10, 5, 13, 17, 0, 0, 0, -1))
        cfg = tmp_cfg(tmp_path)
        monkeypatch.setattr(dqpy, "user_of_uid", lambda uid: Owner())
        rnd = random.Random(21)
        records = {}
        for k, u in enumerate(USERS):
            records[u] = random_history(rnd, u, start, n=300 + 100 * k)
            dqpy.write_history(cfg, u, records[u])
            dqpy.write_days(cfg, u)
        compare_all(cfg, monkeypatch, records, start, 40, 1)
        # a tail the summaries do not cover: more jobs, and one that ended
        # on a summarized day but was logged after the summary was made
        for k, u in enumerate(USERS):
            more = random_history(rnd, u, start + 30 * 86400, days=12, n=40, first=1000)
            late = dict(more[0], id=f"2000-{u}", ended=start + 10.5 * 86400,
                        started=start + 9.7 * 86400, logged=start + 50 * 86400)
            for r in more:
                r["logged"] = start + 50 * 86400
            records[u] += more + [late]
            append(cfg, u, more + [late])
        compare_all(cfg, monkeypatch, records, start, 45, 2)
    finally:
        if zone:
            monkeypatch.delenv("TZ")
            time.tzset()


def test_day_summaries_of_equal_waits_are_exact(tmp_path, monkeypatch):
    cfg = tmp_cfg(tmp_path)
    monkeypatch.setattr(dqpy, "user_of_uid", lambda uid: Owner())
    start = time.mktime((2026, 3, 2, 9, 0, 0, 0, 0, -1))
    rnd = random.Random(7)
    records = {}
    for k, u in enumerate(USERS):
        records[u] = random_history(rnd, u, start, days=20, n=150)
        for r in records[u]:
            if r["started"] is not None:
                r["submitted"] = r["started"] - (37.3 if k else 0.004)
        dqpy.write_history(cfg, u, records[u])
        dqpy.write_days(cfg, u)
    compare_all(cfg, monkeypatch, records, start, 20, 3, exact_waits=True)


def test_day_summary_is_used_only_when_it_fits_the_history(tmp_path, monkeypatch):
    cfg = tmp_cfg(tmp_path)
    owner = [None]
    monkeypatch.setattr(dqpy, "user_of_uid", lambda uid: Owner() if owner[0] is None
                        else owner[0])
    monkeypatch.setattr(dqpy, "warn", lambda msg: None)
    start = time.mktime((2026, 5, 4, 0, 0, 0, 0, 0, -1))
    u = USERS[0]
    records = random_history(random.Random(5), u, start, days=20, n=500)
    since, until = start + 2.5 * 86400, start + 15.2 * 86400

    def check(records):
        tally = dqpy.Tally("day", since, until)
        used = dqpy.summary_report(cfg, u, tally)
        want = dqpy.report_rows(records, "day", since, until)
        got = dqpy.user_report(cfg, [u], "day", since, until)
        assert got == want      # read from the records, so exactly
        return used

    dqpy.write_history(cfg, u, records)
    dqpy.write_days(cfg, u)
    assert dqpy.summary_report(cfg, u, dqpy.Tally("day", since, until))
    owner[0] = "mallory"        # another user's files
    assert not check([])
    owner[0] = None
    # the history written anew (another inode), the summary left over
    os.rename(dqpy.days_path(cfg, u), str(tmp_path / "old.days"))
    dqpy.write_history(cfg, u, records)
    os.rename(str(tmp_path / "old.days"), dqpy.days_path(cfg, u))
    assert not check(records)
    # a truncated history: it holds less than the summary covers
    dqpy.write_days(cfg, u)
    path = dqpy.history_path(cfg, u)
    with open(path, "rb") as f:
        kept = f.read().splitlines(True)[:300]
    with open(path, "r+b") as f:
        f.truncate(sum(map(len, kept)))
    assert not check(dqpy.read_history(cfg, u))
    # a corrupt line, and a summary of another time zone or format
    dqpy.write_history(cfg, u, records)
    dqpy.write_days(cfg, u)
    days = dqpy.days_path(cfg, u)
    with open(days) as f:
        lines = f.readlines()
    for i, bad in ((7, lines[7][:40] + "\n"), (8, lines[8].replace('"ev":[', '"ev":["x",')),
                   (0, lines[0].replace('"format":1', '"format":9')),
                   (0, lines[0].replace('"tz":[', '"tz":[1,'))):
        with open(days, "w") as f:
            f.writelines(lines[:i] + [bad] + lines[i + 1:])
        assert not check(records), i
    os.unlink(days)
    assert not check(records)


def test_day_summary_is_made_when_the_history_outgrows_it(tmp_path, monkeypatch):
    cfg = tmp_cfg(tmp_path)
    monkeypatch.setattr(dqpy, "user_of_uid", lambda uid: Owner())
    monkeypatch.setattr(dqpy, "DAYS_TAIL", 20000)
    u = USERS[1]
    rnd = random.Random(9)
    start = time.mktime((2026, 6, 1, 0, 0, 0, 0, 0, -1))
    records = random_history(rnd, u, start, n=40)
    dqpy.write_history(cfg, u, records)
    dqpy.refresh_days(cfg, u)
    assert not os.path.exists(dqpy.days_path(cfg, u))      # small: none needed
    records += random_history(rnd, u, start, n=60, first=100)
    dqpy.write_history(cfg, u, records)
    dqpy.refresh_days(cfg, u)
    size = os.path.getsize(dqpy.history_path(cfg, u))
    with open(dqpy.days_path(cfg, u)) as f:
        assert json.loads(f.readline())["through"] == size
    assert dqpy.history_users(cfg) == [u]       # <user>.days is no user's history
    append(cfg, u, random_history(rnd, u, start, n=10, first=200))
    dqpy.refresh_days(cfg, u)
    with open(dqpy.days_path(cfg, u)) as f:
        assert json.loads(f.readline())["through"] == size      # a tail, read as records
    append(cfg, u, random_history(rnd, u, start, n=120, first=300))
    dqpy.refresh_days(cfg, u)
    with open(dqpy.days_path(cfg, u)) as f:
        assert json.loads(f.readline())["through"] == os.path.getsize(dqpy.history_path(cfg, u))
    # a summary it cannot write: skipped, without a word
    monkeypatch.setattr(dqpy, "write_atomically", lambda *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    os.unlink(dqpy.days_path(cfg, u))
    dqpy.refresh_days(cfg, u)
    assert not os.path.exists(dqpy.days_path(cfg, u))
