"""The benchmarks of dq's performance targets (see bench/run).

Each bench_N(ctx) returns [Row].  Times of dq commands are taken inside the
node, as the test user (lib.run_timed), so nsenter/setpriv are not counted.
"""
import json
import os
import pwd
import re
import signal
import sys
import threading
import time

from lib import (ALICE, BOB, PY, Row, check, dq_module, ensure_users, failed, fmt_s, hold_all,
                 job_files, job_id_of, median, new_install, next_id, percentile,
                 queue_file_name, read_json, release, rmtree, run_timed, synth_jobs, Timed, times,
                 wait_for, write_conf, write_script)
from dqtest import MODELS

SIZES = {
    "full": dict(b1_nodes=4, b1_jobs=200, b2_n=10, b3_n=20, b3_queue=10000, b3_per=25,
                 b4_small=100, b4_big=100000, b4_n=15, b5_nodes=32, b5_n=10,
                 b6_bytes=2 << 30, b6_n=3, b8_queue=10000, b8_n=7,
                 b9_queue=10000, b9_users=50, b9_passes=7, b9_n=10,
                 b10_jobs=1000, b10_n=5, b11_viewers=50, b11_seconds=15,
                 b12_nodes=4, b12_jobs=128, b12_seconds=10,
                 b13_queue=10000, b13_users=50, b13_passes=7, b14_seconds=20, b14_n=3,
                 b15_files=2000, b15_mb=50, b15_n=5, b15_sweep=100,
                 b16_n=5, b16_grace=5, b17_n=5, b18_jobs=100000, b18_small=1000, b18_n=5,
                 b19_n=10, b19_queue=1000),
    "smoke": dict(b1_nodes=2, b1_jobs=16, b2_n=3, b3_n=4, b3_queue=1000, b3_per=3,
                  b4_small=100, b4_big=2000, b4_n=3, b5_nodes=8, b5_n=2,
                  b6_bytes=64 << 20, b6_n=1, b8_queue=1000, b8_n=2,
                  b9_queue=1000, b9_users=50, b9_passes=2, b9_n=2,
                  b10_jobs=100, b10_n=1, b11_viewers=5, b11_seconds=3,
                  b12_nodes=2, b12_jobs=16, b12_seconds=3,
                  b13_queue=1000, b13_users=50, b13_passes=2, b14_seconds=4, b14_n=1,
                  b15_files=200, b15_mb=4, b15_n=1, b15_sweep=20,
                  b16_n=1, b16_grace=2, b17_n=1, b18_jobs=2000, b18_small=200, b18_n=1,
                  b19_n=2, b19_queue=50),
}
JOB_SECONDS = 2
GPUS = 4


def say(msg):
    print(f"  {msg}", file=sys.stderr, flush=True)


def parallel(calls):
    """Run [(fn, args)] in threads; their results, or re-raise the first error."""
    results, errors = [None] * len(calls), []

    def one(i, fn, args):
        try:
            results[i] = fn(*args)
        except BaseException as e:     # noqa: B902 -- re-raised below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i, fn, args), daemon=True)
               for i, (fn, args) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def ended_done(dq, ids):
    """The jobs' dq-jobs complete entries, in the order of ids; an error
    if one of them did not end done."""
    r = dq.run("node1", ALICE, "jobs", "complete", "--json", "-a", timeout=120)
    done = {j["id"]: j for j in json.loads(r.stdout)}
    bad = [i for i in ids if done.get(i, {}).get("state") != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not end 'done', e.g. {done.get(bad[0])}")
    return [done[i] for i in ids]


def submit_items(dq, path, n, sleep=0.0, env=None):
    return [{"argv": [dq.path("submit"), path], "cwd": os.path.dirname(path),
             "sleep": sleep, "env": env or {}}] * n


def submitted_ids(res):
    ids = []
    for t in res:
        if t.rc != 0:
            raise failed("dq-submit", t)
        job_id = job_id_of(t.out)
        if job_id is None:
            raise RuntimeError(f"dq-submit printed no job id: {t.out!r} {t.err!r}")
        ids.append(job_id)
    return ids


def lock_holds(path, start=0, end=None):
    """Global-lock hold times (s) from a lock_stats file, lines [start:end]."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    for line in lines[start:end]:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "lock":
            out.append(float(parts[1]))
    return out


def count_lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def stats_file(dq):
    path = os.path.join(dq.root, "lock-stats.txt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    os.fchmod(fd, 0o666)
    os.close(fd)
    return path


def cpu_seconds():
    """Busy CPU seconds of the whole machine so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# 1 + 7: idle GPUs, lock hold times ############################################

def bench_idle(ctx):
    c = ctx.cluster(4)
    njobs = ctx.size["b1_jobs"]
    hosts = c.hosts[:ctx.size["b1_nodes"]]
    dq = new_install(c, "b1-idle")
    stats = stats_file(dq)
    write_conf(dq, hosts, lock_stats=stats)
    body = f"date +%s.%N\nsleep {JOB_SECONDS}\ndate +%s.%N\n"
    paths = {u: write_script(c, u, "b1.sh", body)[1] for u in (ALICE, BOB)}
    say(f"holding all {len(hosts) * GPUS} GPUs, submitting {njobs} jobs of "
        f"{JOB_SECONDS} s from 4 parallel submitters")
    held = hold_all(c, hosts, GPUS)
    submitters = [("node1", ALICE), ("node2", BOB), ("node3", ALICE), ("node4", BOB)]
    per = [njobs // 4 + (1 if i < njobs % 4 else 0) for i in range(4)]
    res = parallel([(run_timed, (c, h, u, submit_items(dq, paths[u], k)))
                    for (h, u), k in zip(submitters, per)])
    ids = submitted_ids([t for r in res for t in r])
    if len(set(ids)) != njobs:
        raise RuntimeError(f"{njobs} submits gave {len(set(ids))} distinct ids")
    submit_lines = count_lines(stats)
    say("releasing the GPUs; waiting for every job to end")
    t_release = time.time()
    cpu0 = cpu_seconds()
    release(c, held)
    ideal = njobs * JOB_SECONDS / (len(hosts) * GPUS)
    ends = lambda: all(os.path.exists(os.path.join(dq.root, "jobs", "backend", i, "end.json"))
                       for i in ids)
    try:
        wait_for(ends, 60 + 4 * ideal, 0.5, f"{njobs} jobs to end")
    except RuntimeError as e:
        ended = sum(os.path.exists(os.path.join(dq.root, "jobs", "backend", i, "end.json"))
                    for i in ids)
        raise RuntimeError(f"{e} ({ended} ended)") from None
    cpu_run, wall_run = cpu_seconds() - cpu0, time.time() - t_release
    jobs = ended_done(dq, ids)
    if os.environ.get("BENCH_DUMP"):        # development: the jobs, for a closer look
        with open(os.environ["BENCH_DUMP"], "w") as f:
            json.dump({"jobs": jobs, "release": t_release}, f)
    first_start = min(j["started"] for j in jobs)
    last_end = max(j["ended"] for j in jobs)
    makespan = last_end - first_start
    by_gpu = {}
    for j in jobs:
        by_gpu.setdefault((j["host"], tuple(j["gpus"])), []).append(j)
    gaps, overlaps, chains = [], 0, []
    for seq in by_gpu.values():
        seq.sort(key=lambda j: j["started"])
        chains.append((seq[0]["started"], seq[-1]["ended"], len(seq)))
        for a, b in zip(seq, seq[1:]):
            gaps.append(b["started"] - a["ended"])
            overlaps += b["started"] < a["ended"]
    # inside each job: when its script really ran (the two dates in its log)
    wrap_in, wrap_out = [], []
    for j in jobs:
        try:
            with open(job_files(dq, j["id"])[3]) as f:
                stamps = [float(x) for x in f.read().split()]
            wrap_in.append(stamps[0] - j["started"])
            wrap_out.append(j["ended"] - stamps[-1])
        except (OSError, ValueError, IndexError):
            pass
    runtime = [j["ended"] - j["started"] for j in jobs]
    holds = lock_holds(stats)
    ctx.lock = {"all": holds, "run": lock_holds(stats, submit_lines),
                "submit": lock_holds(stats, 0, submit_lines)}
    sub_times = [t.wall for r in res for t in r]
    g_med, g_p95 = median(gaps), percentile(gaps, 95)
    # Where the makespan goes: how late each GPU's first job started, and
    # the overhead per job (runtime beyond JOB_SECONDS plus gap) on the GPU
    # that ended last.
    spread = max(c[0] for c in chains) - first_start
    last = max(chains, key=lambda c: c[1])
    per_job = (last[1] - last[0]) / last[2] - JOB_SECONDS
    return [
        Row(1, f"makespan, {njobs} x {JOB_SECONDS} s jobs on {len(by_gpu)} GPUs "
               "(first start to last end)",
            f"<= {1.1 * ideal:.1f} s (1.10 x {ideal:.1f} s)", fmt_s(makespan),
            check(makespan <= 1.1 * ideal),
            f"ideal {ideal:.1f} s ({-(-njobs // (len(hosts) * GPUS))} waves would be "
            f"{-(-njobs // (len(hosts) * GPUS)) * JOB_SECONDS} s); from the release of the "
            f"GPUs: {fmt_s(last_end - t_release)}; first start {fmt_s(first_start - t_release)} "
            f"after the release; job runtime (end.json - run.json) median "
            f"{fmt_s(median(runtime))}, of which before the script {fmt_s(median(wrap_in))}, "
            f"after it {fmt_s(median(wrap_out))}; the {len(chains)} GPUs' first jobs started within "
            f"{fmt_s(spread)}; the GPU that ended last ran {last[2]} jobs from "
            f"{fmt_s(last[0] - first_start)} with {fmt_s(per_job)} of overhead per job "
            f"(jobs per GPU: {min(c[2] for c in chains)}-{max(c[2] for c in chains)}); "
            f"{overlaps} overlaps on a GPU; machine CPU "
            f"busy {100 * cpu_run / (wall_run * os.cpu_count()):.0f}% while the jobs ran "
            f"({cpu_run / njobs:.2f} CPU-s per job, {os.cpu_count()} cores); submits "
            f"(4 parallel, all queued) median {fmt_s(median(sub_times))}"),
        Row(1, "idle gap on a GPU between jobs, median", "< 0.5 s", fmt_s(g_med),
            check(g_med < 0.5), f"{len(gaps)} gaps; max {fmt_s(max(gaps))}"),
        Row(1, "idle gap on a GPU between jobs, 95th percentile", "< 2 s", fmt_s(g_p95),
            check(g_p95 < 2)),
    ]


def bench_lock(ctx):
    if not getattr(ctx, "lock", None):
        raise RuntimeError("no lock statistics (benchmark 1 did not run)")
    holds, run = ctx.lock["all"], ctx.lock["run"]
    if not holds:
        raise RuntimeError("the lock_stats file of benchmark 1 names no global-lock hold")
    note = (f"{len(holds)} global-lock holds during benchmark 1 (submits + run); "
            f"while the jobs ran: {len(run)} holds, p99 {fmt_s(percentile(run, 99))}, "
            f"max {fmt_s(max(run) if run else float('nan'))}; during the submits: "
            f"p99 {fmt_s(percentile(ctx.lock['submit'], 99))}; total held "
            f"{sum(holds):.2f} s")
    return [
        Row(7, "global lock hold time, 99th percentile (during 1)", "report (short)",
            fmt_s(percentile(holds, 99)), "INFO", note),
        Row(7, "global lock hold time, longest (during 1)", "report (short)",
            fmt_s(max(holds)), "INFO"),
    ]


# 2: placement latency ########################################################

def bench_place(ctx):
    c = ctx.cluster(4)
    n = ctx.size["b2_n"]
    dq = new_install(c, "b2-place")
    d, path = write_script(c, ALICE, "b2.sh", "date +%s.%N\n")
    say(f"{n + 1} submits on a free cluster, 1 s apart (the first one is the cold one)")
    res = run_timed(c, "node1", ALICE, submit_items(dq, path, n + 1, sleep=1.0))
    ids = submitted_ids(res)
    lat = []
    for t, job_id in zip(res, ids):
        if "Executing" not in t.out:
            raise RuntimeError(f"{job_id} was not started by its dq-submit: {t.out!r} {t.err!r}")
        log = job_files(dq, job_id)[3]
        wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, 30, 0.1,
                 f"{job_id} to write its log")
        with open(log) as f:
            lat.append(float(f.read().split()[0]) - t.t0)
    cold, warm = lat[0], lat[1:]
    sub = [t.wall for t in res[1:]]
    return [Row(2, "dq-submit to the job running on its host, median", "< 0.5 s",
                fmt_s(median(warm)), check(median(warm) < 0.5),
                f"{len(warm)} submits; max {fmt_s(max(warm))}; the first submit (cold: no "
                f"ssh connection yet) {fmt_s(cold)}; dq-submit itself took median "
                f"{fmt_s(median(sub))}")]


# 3: submit cost vs queue length, parallel submitters #########################

def bench_submit(ctx):
    c = ctx.cluster(4)
    n, qlen, per = ctx.size["b3_n"], ctx.size["b3_queue"], ctx.size["b3_per"]
    say("holding every GPU")
    held = hold_all(c, c.hosts, GPUS)      # noqa: F841 -- killed by the reset afterwards
    dq = new_install(c, "b3-submit")
    d, path = write_script(c, ALICE, "b3.sh", "true\n")
    say(f"{n} submits with an empty queue")
    empty = run_timed(c, "node1", ALICE, submit_items(dq, path, n + 1))
    submitted_ids(empty)
    say(f"synthesizing {qlen} queued jobs; {n} submits again")
    t = time.monotonic()
    synth_jobs(dq, next_id(dq), qlen, [BOB], "queued", t0=time.time() - 120 - qlen * 0.01,
               step=0.01)
    synth_s = time.monotonic() - t
    full = run_timed(c, "node1", ALICE, submit_items(dq, path, n + 1))
    submitted_ids(full)
    e, f = median([t.wall for t in empty[1:]]), median([t.wall for t in full[1:]])
    # what one pass costs with that queue, without the ssh polls
    once = times(c, "node1", ALICE, [dq.path("schedule"), "--once", "--quiet"], 3)

    # throughput: 8 parallel submitters into a fresh queue
    tq = new_install(c, "b3-throughput")
    stats = stats_file(tq)
    write_conf(tq, c.hosts, lock_stats=stats)
    paths = {u: write_script(c, u, "b3t.sh", "true\n")[1] for u in (ALICE, BOB)}
    subs = [(h, u) for h in c.hosts for u in (ALICE, BOB)]
    # A warm-up round first: one submit each, all at once, on the fresh data
    # root (each user's first command on a node opens its ssh connections,
    # and the first submits poll every host).  Then the timed round: dq as
    # it is in a lab where it is in use.
    say(f"8 parallel submitters: one warm-up submit each, then {per} jobs each")
    warm = parallel([(run_timed, (c, h, u, submit_items(tq, paths[u], 1))) for h, u in subs])
    warm = [t for r in warm for t in r]
    warm_span = max(t.t1 for t in warm) - min(t.t0 for t in warm)
    skip = count_lines(stats)
    cpu0 = cpu_seconds()
    res = parallel([(run_timed, (c, h, u, submit_items(tq, paths[u], per))) for h, u in subs])
    cpu1 = cpu_seconds()
    flat = [t for r in res for t in r]
    failed = [t for t in flat if t.rc != 0]
    ids = [job_id_of(t.out) for t in flat if t.rc == 0]
    span = max(t.t1 for t in flat) - min(t.t0 for t in flat)
    rate = len(flat) / span
    r = tq.run("node1", ALICE, "jobs", "queue", "--json", "-a", timeout=120)
    queued = {j["id"] for j in json.loads(r.stdout)}
    lost = len(flat) - len(set(ids) & queued)
    failed += [t for t in warm if t.rc != 0]
    lost += len(warm) - len({job_id_of(t.out) for t in warm if t.rc == 0} & queued)
    holds = lock_holds(stats, skip)
    return [
        Row(3, f"dq-submit, {qlen} queued / empty queue (median)", "<= 1.2x",
            f"{f / e:.2f}x ({fmt_s(f)} / {fmt_s(e)})", check(f <= 1.2 * e),
            f"all GPUs busy, {n} submits each, as {ALICE} on node1; the {qlen} queued jobs "
            f"(of {BOB}) written as files in {synth_s:.1f} s; one 'dq-schedule --once' "
            f"with that queue: {fmt_s(median([t.wall for t in once]))}"),
        Row(3, "8 parallel submitters, jobs queued per second", ">= 60/s",
            f"{rate:.1f}/s", check(rate >= 60),
            f"{len(flat)} submits in {span:.1f} s, after a warm-up round of 8 (one per "
            f"submitter, all at once: {fmt_s(warm_span)}, each median "
            f"{fmt_s(median([t.wall for t in warm]))}); each took median "
            f"{fmt_s(median([t.wall for t in flat]))}; machine CPU per submit "
            f"{(cpu1 - cpu0) / len(flat):.2f} CPU-s ({os.cpu_count()} cores); global lock "
            f"held {sum(holds):.2f} s in all ({100 * sum(holds) / span:.0f}% of the time), "
            f"p99 {fmt_s(percentile(holds, 99))}"),
        Row(3, "8 parallel submitters, jobs lost", "0", str(lost + len(failed)),
            check(lost == 0 and not failed),
            f"{len(failed)} submits failed; {len(set(ids))} distinct ids (+{len(warm)} "
            f"warm-up); {len(queued)} in dq-jobs queue"),
    ]


# 4: views with a long history ################################################

VIEWS = [("dq-jobs", ["jobs"]), ("dq-jobs summary", ["jobs", "summary"]),
         ("dq-jobs queue", ["jobs", "queue"]),
         # what bash completion runs for job IDs (extras/dq.bash)
         ("completion of job IDs", ["_complete", "ids"])]


def bench_history(ctx):
    c = ctx.cluster(4)
    small, big, n = ctx.size["b4_small"], ctx.size["b4_big"], ctx.size["b4_n"]
    dq = new_install(c, "b4-history")
    mine = [0]

    def add(first, count):
        ids = synth_jobs(dq, first, count, [ALICE, BOB], "done")
        mine[0] += sum(1 for i in ids if i.endswith("-" + ALICE))

    def measure():
        out = {}
        for name, args in VIEWS:
            argv = [os.path.join(dq.root, "dq.py")] + args if args[0].startswith("_") \
                else [dq.path(args[0])] + args[1:]
            res = times(c, "node1", ALICE, argv, n + 1)
            out[name] = median([t.wall for t in res[1:]])
            if args[1:] == ["summary"] and f"Completed jobs: {mine[0]}\n" not in res[-1].out:
                raise RuntimeError(f"dq-jobs summary does not count {mine[0]} completed "
                                   f"jobs: {res[-1].out!r}")
        return out
    add(1, small)
    say(f"views with {small} completed jobs")
    few = measure()
    say(f"synthesizing {big - small} more completed jobs")
    t = time.monotonic()
    add(small + 1, big - small)
    synth_s = time.monotonic() - t
    say(f"views with {big} completed jobs")
    many = measure()
    rows = []
    for name, _ in VIEWS:
        a, b = many[name], few[name]
        rows.append(Row(4, f"{name}, {big} completed jobs (median)", "< 0.25 s", fmt_s(a),
                        check(a < 0.25)))
        rows.append(Row(4, f"{name}, {big} / {small} completed jobs", "<= 1.5x",
                        f"{a / b:.2f}x ({fmt_s(a)} / {fmt_s(b)})", check(a <= 1.5 * b)))
    rows[0].note = (f"as {ALICE}, half the jobs hers; {n} runs each after one warm-up; "
                    f"{big - small} jobs written in {synth_s:.0f} s")
    [t] = run_timed(c, "node1", ALICE, [{"argv": [dq.path("jobs"), "complete", "-n", "10"],
                                         "keep": 0, "timeout": 120}], timeout=300)
    rows.append(Row(4, f"(no target) dq-jobs complete -n 10, {big} completed jobs", "-",
                    fmt_s(t.wall) if t.rc == 0 else f"> {fmt_s(t.wall)} (killed)", "INFO"))
    return rows


# 5: wide clusters ############################################################

def canned_smi(cluster, hosts):
    """Replace each node's fake nvidia-smi (a Python program: ~25 ms of CPU a
    call, all 32 'hosts' sharing this machine's cores) by a shell script that
    prints the same answer, to separate dq's own cost from the simulation's."""
    for h in hosts:
        node = cluster._node(h)
        g = cluster.run(h, "root", "nvidia-smi --query-gpu=index,uuid,memory.used,"
                        "memory.total,name --format=csv,noheader,nounits", check=True).stdout
        path = os.path.join(node.bindir, "nvidia-smi")
        with open(path + ".new", "w") as f:
            f.write("#!/bin/sh\ncase \"$*\" in\n*--query-gpu=*) cat <<'EOF'\n" + g +
                    "EOF\n;;\n*) ;;\nesac\n")
        os.chmod(path + ".new", 0o755)
        os.rename(path + ".new", path)


def bench_wide(ctx):
    nodes, n = ctx.size["b5_nodes"], ctx.size["b5_n"]
    say(f"starting a {nodes}-node cluster")
    t = time.monotonic()
    c = ctx.cluster(nodes)
    boot = time.monotonic() - t
    wide = new_install(c, f"b5-{nodes}", c.hosts)
    narrow = new_install(c, "b5-4", c.hosts[:4])
    cmds = [("dq-free", "free"), ("dq-users", "users")]

    def measure():
        out = {}
        for inst in (narrow, wide):
            for name, cmd in cmds:
                first = times(c, "node1", ALICE, [inst.path(cmd)], 1)
                cpu0 = cpu_seconds()
                res = first + times(c, "node1", ALICE, [inst.path(cmd)], n)
                machine = (cpu_seconds() - cpu0) / n
                out[(inst, name)] = (res[0].wall, median([t.wall for t in res[1:]]),
                                     median([t.cpu for t in res[1:]]), machine)
        return out
    say("dq-free, dq-users over 4 and over all nodes")
    m = measure()
    # The floor: a no-op over the same multiplexed ssh connections, to all
    # hosts at once; the 'hosts' share this machine's cores.
    uid = pwd.getpwnam(ALICE).pw_uid
    mux = (f"{c.ssh_command} -o ControlMaster=auto -o ControlPath=/tmp/dq-ssh-{uid}/%C "
           "-o ControlPersist=60")
    noop = {k: median([t.wall for t in times(
        c, "node1", ALICE, ["/bin/sh", "-c", " ".join(f"{mux} {h} true &" for h in hs) + " wait"],
        n + 1)[1:]]) for k, hs in ((nodes, c.hosts), (4, c.hosts[:4]))}
    say("again with a canned (shell) nvidia-smi")
    canned_smi(c, c.hosts)
    mc = measure()
    rows = []
    for name, _ in cmds:
        (cold32, w32, cpu32, mcpu32), (_, w4, cpu4, mcpu4) = m[(wide, name)], m[(narrow, name)]
        _, cw32, _, cmcpu32 = mc[(wide, name)]
        _, cw4, _, cmcpu4 = mc[(narrow, name)]
        rows.append(Row(5, f"{name}, {nodes} nodes (median)", "< 1.5 s", fmt_s(w32),
                        check(w32 < 1.5),
                        f"first call (no ssh connection yet) {fmt_s(cold32)}; CPU per call, "
                        f"{nodes} / 4 nodes: the command and its ssh clients (wait4) "
                        f"{cpu32:.2f} / {cpu4:.2f} CPU-s, the whole machine (the 'hosts' "
                        f"too: sshd, nvidia-smi, ps) {mcpu32:.2f} / {mcpu4:.2f} CPU-s on "
                        f"{os.cpu_count()} cores; cluster booted in {boot:.1f} s"))
        rows.append(Row(5, f"{name}, {nodes} / 4 nodes", "<= 2x",
                        f"{w32 / w4:.2f}x ({fmt_s(w32)} / {fmt_s(w4)})", check(w32 <= 2 * w4),
                        f"with a canned nvidia-smi (a shell script, not Python, on the "
                        f"'hosts'): {fmt_s(cw32)} / {fmt_s(cw4)} = {cw32 / cw4:.2f}x, machine "
                        f"CPU per call {cmcpu32:.2f} / {cmcpu4:.2f} CPU-s"))
    rows.append(Row(5, f"(floor) 'ssh HOST true' to {nodes} / 4 hosts at once", "-",
                    f"{noop[nodes] / noop[4]:.2f}x ({fmt_s(noop[nodes])} / {fmt_s(noop[4])})",
                    "INFO", "the same multiplexed connections as dq, no command run: what "
                    "the simulated hosts' sshd and shells cost on this machine's cores alone"))
    return rows


# 6: big logs #################################################################

def make_log(path, size):
    lines = []
    for i in range(16384):
        loss = ((i * 7919) % 100000) / 100000
        lines.append(f"step {i:09d} loss={loss:.6f} lr=0.000300 grad_norm=1.2345 "
                     f"throughput=1234.5 samples/s\n")
    block = "".join(lines).encode()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            chunk = block[:size - written]
            f.write(chunk)
            written += len(chunk)
    return block.count(b"loss=0.99") * size // len(block)


def bench_logs(ctx):
    c = ctx.cluster(4)
    size, n = ctx.size["b6_bytes"], ctx.size["b6_n"]
    dq = new_install(c, "b6-logs")
    st = os.statvfs(dq.root)
    free = st.f_bavail * st.f_frsize
    note = ""
    if free < size * 1.5 + (4 << 30):
        size = min(size, 1 << 30)
        note = "only 1 GiB: not enough free disk for 2 GiB; "
    [job_id] = synth_jobs(dq, 1, 1, [ALICE], "done", log=True)
    log = job_files(dq, job_id)[3]
    say(f"writing a {size / 2 ** 30:.2f} GiB job log")
    matches = make_log(log, size)
    os.sync()       # its writeback must not land in the timings
    pattern = r"loss=0\.99"
    sink = "cat > /dev/null"
    cmds = [("dq-logs", [dq.path("logs"), job_id]), ("cat", ["cat", log]),
            ("dq-grep", [dq.path("grep"), job_id, pattern]),
            ("grep", ["grep", "-E", "--color=never", "-e", pattern, "--", log])]
    try:
        say("dq-logs / cat / dq-grep / grep, each into '| cat > /dev/null'")
        run_timed(c, "node1", ALICE, [{"argv": ["cat", log], "sink": sink}])   # page cache
        items = [{"argv": a, "sink": sink} for _ in range(n) for _, a in cmds]
        res = run_timed(c, "node1", ALICE, items, timeout=1200)
    finally:
        os.unlink(log)
    by = {name: [] for name, _ in cmds}
    for (name, _), t in zip(cmds * n, res):
        if t.rc not in (0, 1):
            raise failed(name, t)
        by[name].append(t)
    wall = {k: median([t.wall for t in v]) for k, v in by.items()}
    rss = {k: max(t.maxrss_kb for t in v) / 1000 for k, v in by.items()}
    gib = size / 2 ** 30
    rows = []
    for dqc, ref in (("dq-logs", "cat"), ("dq-grep", "grep")):
        speed = wall[ref] / wall[dqc]
        rows.append(Row(6, f"{dqc}, {gib:.2g} GiB log: peak RSS", "< 50 MB",
                        f"{rss[dqc]:.1f} MB", check(rss[dqc] < 50),
                        (note if dqc == "dq-logs" else "") +
                        f"{ref}: {rss[ref]:.1f} MB (max RSS from wait4, which covers "
                        f"the children it waited for, e.g. dq-grep's grep)"))
        rows.append(Row(6, f"{dqc}, {gib:.2g} GiB log: speed vs {ref}", ">= 0.5x",
                        f"{speed:.2f}x ({fmt_s(wall[dqc])} vs {fmt_s(wall[ref])})",
                        check(speed >= 0.5),
                        f"both piped into '{sink}' (so cat cannot splice to /dev/null); "
                        f"page cache warm; {n} runs each, interleaved; "
                        f"{gib / wall[dqc]:.2f} GiB/s"
                        + (f"; about {matches} matching lines" if ref == "grep" else "")))
    return rows


# 8: passes with constrained jobs waiting #####################################

def bench_constrained(ctx):
    """A pass when every queued job asks for node1 (DQ_HOSTS=node1), whose
    GPUs are all busy, while the other hosts have GPUs free: none of the
    queue fits, so how much of it does a pass read?"""
    c = ctx.cluster(4)
    qlen, n = ctx.size["b8_queue"], ctx.size["b8_n"]
    say("node1's GPUs held; node2-4 free")
    held = hold_all(c, ["node1"], GPUS)      # noqa: F841 -- killed by the reset afterwards
    dq = new_install(c, "b8-constrained")
    users = [ALICE, BOB]
    env, need = {"DQ_HOSTS": "node1"}, {"hosts": ["node1"]}
    once = [dq.path("schedule"), "--once", "--quiet"]

    def pass_time():
        return median([t.wall for t in times(c, "node2", BOB, once, n + 1)[1:]])
    synth_jobs(dq, next_id(dq), 10, users, "queued", env=env, need=need)
    small = pass_time()
    say(f"synthesizing {qlen - 10} more queued jobs for node1")
    synth_jobs(dq, next_id(dq), qlen - 10, users, "queued", env=env, need=need)
    big = pass_time()
    r = dq.run("node1", ALICE, "jobs", "summary", "-a", "--json", timeout=120)
    queued = json.loads(r.stdout)["queued"]
    return [Row(8, f"pass (dq-schedule --once), {qlen} / 10 queued jobs that fit only busy "
                f"hosts", "<= 1.5x", f"{big / small:.2f}x ({fmt_s(big)} / {fmt_s(small)})",
                check(big <= 1.5 * small),
                f"DQ_HOSTS=node1 for every job, node1's 4 GPUs held by hand, 12 GPUs free "
                f"elsewhere; {n} passes each (median), as {BOB} on node2, polls included; "
                f"{queued} jobs still queued after them")]


# 9: a deep queue of many users ###############################################

# The queue's jobs, in turn (job i of the queue is of kind i % 7, and of
# user i % users): what dq-submit writes for each (job.json's env, the
# jobs/active entry's gpus and need, as job_needs() makes it).
B9_KINDS = [
    ("DQ_HOSTS=node1", 1, {"DQ_HOSTS": "node1"}, {"hosts": ["node1"]}),
    ("DQ_GPU_TYPE=A100", 1, {"DQ_GPU_TYPE": "A100"}, {"gpu_type": "A100"}),
    ("DQ_GPU_MEM=40G", 1, {"DQ_GPU_MEM": "40G"}, {"gpu_mem": 40960}),
    ("DQ_GPUS=2", 2, {"DQ_GPUS": "2"}, None),
    ("plain", 1, {}, None), ("plain", 1, {}, None), ("plain", 1, {}, None),
]
B9_LIMITS = {ALICE: 2, BOB: 3}      # [limits]; each runs that many real jobs
B9_MAX = 4                          # max_gpus_per_user
B9_SMALL = 10

# Runs a dq command under cProfile inside a node, as the user (BENCH_PROFILE).
PROFILE = r"""
import cProfile, io, pstats, sys
sys.path.insert(0, sys.argv[1])
import dq
pr = cProfile.Profile()
out = sys.stdout
sys.stdout = io.StringIO()
pr.enable()
try:
    dq.main(sys.argv[2:])
except SystemExit:
    pass
pr.disable()
sys.stdout = out
pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats(30)
pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(15)
"""


def b9_users(count):
    """dqalice, dqbob and count - 2 users that exist only to own queued jobs."""
    return [ALICE, BOB] + [f"dqu{i:02d}" for i in range(1, count - 1)]


def bench_deep(ctx):
    """Issue 11's speed targets: a pass, dq-jobs, dq-jobs summary and
    dq-free with a deep queue of many users, per-user limits and
    constraints, on a busy cluster; against the same with 10 jobs queued."""
    qlen, nusers = ctx.size["b9_queue"], ctx.size["b9_users"]
    npass, n = ctx.size["b9_passes"], ctx.size["b9_n"]
    if nusers < B9_SMALL or qlen <= B9_SMALL:
        raise RuntimeError(f"benchmark 9 needs b9_users >= {B9_SMALL} and b9_queue > "
                           f"{B9_SMALL}")
    users = b9_users(nusers)
    t = time.monotonic()
    created = ensure_users(users)
    users_s = time.monotonic() - t
    c = ctx.cluster(4)
    for host, (name, mib) in zip(c.hosts, MODELS):     # A100, 3090, 1080 Ti x2
        c.set_gpu_model(host, name, mib)
    dq = new_install(c, "b9-deep")
    # assign_timeout: a placement nobody claims (the synthetic users run no
    # dq-schedule) is dropped by the next pass, so every pass finds the same
    # free GPUs and places the same jobs: one job change, repeated.  The
    # loops of dqalice and dqbob (started by their submits) poll seldom, so
    # that no pass of theirs runs during the timings.
    write_conf(dq, c.hosts, max_gpus_per_user=B9_MAX, assign_timeout=0.001,
               poll_interval=3600, watch_interval=3600)
    with open(os.path.join(dq.root, "dq.conf"), "a") as f:
        f.write("[limits]\n" + "".join(f"{u} = {k}\n" for u, k in B9_LIMITS.items()))
    say(f"{sum(B9_LIMITS.values())} running jobs (each user at their limit); all GPUs "
        f"but one on node3 and one on node4 held by hand")
    real = []
    for u, k in B9_LIMITS.items():
        _, path = write_script(c, u, "b9.sh", "sleep 3600\n")
        res = run_timed(c, "node1", u, submit_items(dq, path, k))
        for t, job_id in zip(res, submitted_ids(res)):
            if "Executing" not in t.out:
                raise RuntimeError(f"{job_id} did not start at submit: {t.out!r} {t.err!r}")
            real.append(job_id)
    wait_for(lambda: all(os.path.exists(os.path.join(dq.root, "jobs", "backend", j, "run.json"))
                         for j in real), 30, 0.2, f"{len(real)} jobs to run")
    r = dq.run("node1", ALICE, "free", "--json", timeout=60, check=True)
    free = {h["host"]: h["free"] for h in json.loads(r.stdout)}
    left = {h: max(free.get(h) or [None]) for h in ("node3", "node4")}
    if None in left.values():
        raise RuntimeError(f"node3 and node4 should have free GPUs: dq-free says {free}")
    held = {h: [g for g in gs if left.get(h) != g] for h, gs in free.items()}
    for h, gs in held.items():
        for g in gs:
            c.hold_gpu(h, BOB, g)
    busy = len(c.hosts) * GPUS - len(left)
    once = [dq.path("schedule"), "--once", "--quiet"]
    views = [("dq-jobs", [dq.path("jobs")]), ("dq-jobs summary", [dq.path("jobs"), "summary"]),
             ("dq-free", [dq.path("free")]), ("dq-jobs queue", [dq.path("jobs"), "queue"])]
    base = next_id(dq)

    def shape(num):
        i = num - base
        _, gpus, env, need = B9_KINDS[i % len(B9_KINDS)]
        return {"user": users[i % nusers], "gpus": gpus, "env": env, "need": need}

    def mine(count):
        return sum(1 for i in range(count) if users[i % nusers] == ALICE)

    def measure(count):
        out = {"pass": times(c, "node2", BOB, once, npass + 1)}
        places = read_json(os.path.join(dq.root, "state", "placements.json"), {})
        placed = sorted((j, p["host"], tuple(p["gpus"])) for j, p in
                        (places.get("jobs") or {}).items() if p.get("state") == "assigned")
        for name, argv in views:
            out[name] = times(c, "node1", ALICE, argv, n + 1)
        s = out["dq-jobs summary"][-1].out
        want = f"Active jobs: {B9_LIMITS[ALICE]}\nJobs in queue: {mine(count)}\n"
        if want not in s:
            raise RuntimeError(f"dq-jobs summary as {ALICE} should say {want!r}: {s!r}")
        r = dq.run("node1", ALICE, "jobs", "summary", "-a", "--json", timeout=300)
        queued = json.loads(r.stdout)["queued"] if r.returncode == 0 else None
        if queued != count:
            raise RuntimeError(f"{count} jobs should be queued after the timings, dq-jobs "
                               f"summary -a says {queued} ({r.stderr.strip()[-300:]})")
        return out, placed

    now = time.time()
    say(f"{B9_SMALL} queued jobs of {B9_SMALL} users: {npass + 1} passes as {BOB}, "
        f"{n + 1} of each view as {ALICE}")
    synth_jobs(dq, base, B9_SMALL, users, "queued", t0=now - 300, step=0.01, shape=shape)
    small, placed_small = measure(B9_SMALL)
    say(f"synthesizing {qlen - B9_SMALL} more queued jobs of {nusers} users")
    t = time.monotonic()
    synth_jobs(dq, base + B9_SMALL, qlen - B9_SMALL, users, "queued", t0=now - 200, step=100 / qlen, shape=shape)
    synth_s = time.monotonic() - t
    say(f"{qlen} queued jobs: the same again")
    big, placed_big = measure(qlen)
    if os.environ.get("BENCH_PROFILE"):     # development: where the time goes
        with open(os.environ["BENCH_PROFILE"], "w") as f:
            for user, host, argv in [(BOB, "node2", ["dq-schedule", "--once", "--quiet"])] + \
                    [(ALICE, "node1", ["dq-" + a[0].rsplit("dq-", 1)[1]] + a[1:])
                     for _, a in views]:
                r = c.run(host, user, [PY, "-S", "-c", PROFILE, dq.root] + argv, timeout=300)
                f.write(f"=== {' '.join(argv)} as {user} on {host} ({qlen} queued)\n"
                        f"{r.stdout}{r.stderr[-3000:]}\n")
    rows = []
    med = {k: (median([t.wall for t in small[k][1:]]), median([t.wall for t in big[k][1:]]))
           for k in small}
    cpu = {k: (median([t.cpu for t in small[k][1:]]), median([t.cpu for t in big[k][1:]]))
           for k in small}

    def row(key, what, note):
        s, b = med[key]
        rows.append(Row(9, what, "<= 1.5x", f"{b / s:.2f}x ({fmt_s(b)} / {fmt_s(s)})",
                        check(b <= 1.5 * s), note))
    kinds = ", ".join(f"{sum(1 for k in B9_KINDS if k[0] == w)} {w}"
                      for w in dict.fromkeys(k[0] for k in B9_KINDS))
    placed = "; ".join(f"{j} on {h} GPU {','.join(map(str, g))}" for j, h, g in placed_big)
    row("pass", f"pass (dq-schedule --once), {qlen} / {B9_SMALL} queued jobs of {nusers} "
        f"users, limits and constraints",
        f"{npass} passes each (median, after a warm-up), as {BOB} on node2, polls included; "
        f"GPUs A100 / 3090 / 1080 Ti / 1080 Ti (node1-4), {busy} of 16 busy: "
        f"{sum(B9_LIMITS.values())} by real dq jobs (sleep) of users at their limit "
        f"({', '.join(f'{u} {k}' for u, k in B9_LIMITS.items())}; max_gpus_per_user "
        f"{B9_MAX}), the rest held by hand; queue in turn of 7: {kinds}; jobs under "
        f"starve_after; each pass placed the same {len(placed_big)} jobs in both cases"
        f"{'' if placed_big == placed_small else ' (NOT: ' + str(placed_small) + ')'} "
        f"({placed}), dropped by the next pass (assign_timeout 0.001); CPU per pass "
        f"{cpu['pass'][1]:.3f} / {cpu['pass'][0]:.3f} CPU-s; {qlen} jobs still queued "
        f"after the timings; the {qlen - B9_SMALL} jobs written in {synth_s:.1f} s"
        + (f"; {created} users created ({users_s:.1f} s)" if created else ""))
    cold = {k: (small[k][0].wall, big[k][0].wall) for k in small}
    row("dq-jobs", f"dq-jobs, {qlen} / {B9_SMALL} queued jobs (as a user with {mine(qlen)} / "
        f"{mine(B9_SMALL)} of them)",
        f"as {ALICE} on node1, who also runs {B9_LIMITS[ALICE]} jobs (her dq-schedule loop "
        f"runs, idle); {n} runs each (median) after a cold one ({fmt_s(cold['dq-jobs'][1])} / "
        f"{fmt_s(cold['dq-jobs'][0])}); CPU {cpu['dq-jobs'][1]:.3f} / "
        f"{cpu['dq-jobs'][0]:.3f} CPU-s")
    row("dq-jobs summary", f"dq-jobs summary, {qlen} / {B9_SMALL} queued jobs",
        f"as {ALICE}, {n} runs each; says 'Jobs in queue: {mine(qlen)}'; CPU "
        f"{cpu['dq-jobs summary'][1]:.3f} / {cpu['dq-jobs summary'][0]:.3f} CPU-s")
    row("dq-free", f"dq-free, {qlen} / {B9_SMALL} queued jobs",
        f"as {ALICE}, {n} runs each (polls 4 hosts); CPU {cpu['dq-free'][1]:.3f} / "
        f"{cpu['dq-free'][0]:.3f} CPU-s")
    # The queue's reasons come from the planner run on the whole queue
    # (every user's), while the listing reads only the caller's jobs.
    s, b = med["dq-jobs queue"]
    r = dq.run("node1", ALICE, "jobs", "queue", "--json", timeout=300, check=True)
    reasons = sorted({j["reason"] or "-" for j in json.loads(r.stdout)})
    rows.append(Row(9, f"(no target) dq-jobs queue, {qlen} queued jobs (as a user with "
                       f"{mine(qlen)} of them)", "-", fmt_s(b), "INFO",
                    f"as {ALICE}, {n} runs (median); {fmt_s(s)} with {B9_SMALL} queued "
                    f"({mine(B9_SMALL)} hers); every reason from the planner over all "
                    f"{qlen} jobs of {nusers} users; reasons seen: {', '.join(reasons)}; CPU "
                    f"{cpu['dq-jobs queue'][1]:.3f} / {cpu['dq-jobs queue'][0]:.3f} CPU-s"))
    return rows


def bench_sweep(ctx):
    """dq-submit --grid of b10_jobs jobs with every GPU busy: how long until
    all of them are queued (one process, one hold of the lock)?"""
    c = ctx.cluster(4)
    n, runs = ctx.size["b10_jobs"], ctx.size["b10_n"]
    held = hold_all(c, c.hosts, GPUS)      # noqa: F841 -- killed by the reset afterwards
    dq = new_install(c, "b10-sweep")
    stats = stats_file(dq)
    write_conf(dq, c.hosts, lock_stats=stats)
    d, path = write_script(c, ALICE, "grid.sh", "true\n")
    values = ",".join(str(i) for i in range(n))
    argv = [dq.path("submit"), "--grid", f"DQ_I={values}", path]
    res = times(c, "node1", ALICE, argv, runs + 1, cwd=d)
    walls = [t.wall for t in res[1:]]
    r = dq.run("node1", ALICE, "jobs", "summary", "--json", timeout=120)
    queued = json.loads(r.stdout)["queued"]
    holds = lock_holds(stats)
    big = median(walls)
    return [Row(10, f"dq-submit --grid of {n} jobs, all queued (median)", "< 2 s", fmt_s(big),
                check(big < 2),
                f"every GPU held by hand, so none starts; {runs} sweeps after a first one "
                f"(the first: {fmt_s(res[0].wall)}), as {ALICE} on node1, each with the "
                f"queue of the ones before; {queued} jobs queued after them; CPU per sweep "
                f"{median([t.cpu for t in res[1:]]):.2f} CPU-s; global lock held "
                f"{len(holds)} times, longest {fmt_s(max(holds) if holds else 0)}")]


def bench_web(ctx):
    """dq-web with 50 viewers polling /api/state every second against one
    viewer: how many polls of the cluster, how long an answer takes?"""
    import threading
    import urllib.request
    c = ctx.cluster(4)
    viewers, seconds = ctx.size["b11_viewers"], ctx.size["b11_seconds"]
    dq = new_install(c, "b11-web")
    held = hold_all(c, ["node2"], GPUS)      # noqa: F841 -- killed by the reset afterwards
    port = 18000 + os.getpid() % 1000
    proc = dq.popen("node1", ALICE, "web", "--port", port)
    url = f"http://127.0.0.1:{port}/api/state"

    def fetch():
        t = time.monotonic()
        with urllib.request.urlopen(url, timeout=60) as r:
            polls = json.loads(r.read())["polls"]
        return polls, time.monotonic() - t
    try:
        wait_for(lambda: _web_up(fetch), 20, what="dq-web to answer")

        def run(n):
            first = fetch()[0]
            waits, lock = [], threading.Lock()
            end = time.monotonic() + seconds

            def viewer():
                while time.monotonic() < end:
                    _, w = fetch()
                    with lock:
                        waits.append(w)
                    time.sleep(1)
            threads = [threading.Thread(target=viewer) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return fetch()[0] - first, waits
        one, one_waits = run(1)
        many, many_waits = run(viewers)
    finally:
        proc.terminate()
        proc.wait(10)
    return [Row(11, f"dq-web, polls of the cluster in {seconds} s: {viewers} viewers / 1",
                "<= 1.2x", f"{many / max(one, 1):.2f}x ({many} / {one})",
                check(many <= 1.2 * max(one, 1)),
                f"each viewer asks /api/state every second (a tab refreshes every 5 s); "
                f"{len(many_waits)} answers to {viewers} viewers, {len(one_waits)} to one; "
                f"4 nodes, node2's GPUs held by hand"),
            Row(11, f"dq-web, /api/state answer with {viewers} viewers (median)", "< 1 s",
                fmt_s(median(many_waits)), check(median(many_waits) < 1),
                f"95th percentile {fmt_s(percentile(many_waits, 95))}, the longest "
                f"{fmt_s(max(many_waits))} (a viewer that came when a poll was due waits "
                f"for it); one viewer: median {fmt_s(median(one_waits))}")]


def _web_up(fetch):
    try:
        return fetch() is not None
    except OSError:
        return False


# 12-14: GPU sharing, DQ_MEM (issue 19) ########################################

SHARE_MODEL = ("NVIDIA A100-SXM4-80GB", 81920)     # every node's GPUs in 12
B12_MEM = "8G"
B12_PER_GPU = 8         # max_jobs_per_gpu (dq's default, written out)
JOB_ID_RE = re.compile(r"^Job ID: '([^']+)'$", re.M)


class CpuTrace:
    """The machine's busy CPU seconds, sampled in a thread every `every` s,
    so that the CPU of a phase of a run can be told afterwards."""

    def __init__(self, every=0.1):
        self.points = [(time.time(), cpu_seconds())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every):
        while not self._stop.wait(every):
            self.points.append((time.time(), cpu_seconds()))

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.points.append((time.time(), cpu_seconds()))

    def at(self, t):
        pts = self.points
        if t <= pts[0][0]:
            return pts[0][1]
        for (t0, c0), (t1, c1) in zip(pts, pts[1:]):
            if t <= t1:
                return c1 if t1 <= t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return pts[-1][1]

    def busy(self, a, b):
        """CPU seconds the machine was busy between times a and b."""
        return self.at(b) - self.at(a)


def most_at_once(spans):
    """The most of these (start, end) spans that overlap at one time."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = cur = 0
    for _, d in events:         # at one time an end (-1) sorts before a start
        cur += d
        most = max(most, cur)
    return most


def b12_run(c, hosts, name, njobs, secs, env):
    """njobs jobs of `date; sleep secs; date`, submitted as two sweeps at
    once (dq-submit --grid, dqalice on node1 and dqbob on node2, half each)
    on a fresh data root of these hosts; waits for them all to end.  env:
    the submitters' DQ_* variables (DQ_MEM or none).  Returns what was
    measured (a dict)."""
    dq = new_install(c, name, hosts, max_jobs_per_gpu=B12_PER_GPU)
    # the script's start and end, and between them its wrapper's CPU so far
    # (its parent's /proc stat line, read by the shell's builtin)
    body = (f"date +%s.%N\nread -r s < /proc/$PPID/stat; echo \"$s\"\nsleep {secs}\n"
            f"date +%s.%N\n")
    scripts = {u: write_script(c, u, f"{name}.sh", body) for u in (ALICE, BOB)}
    subs = [("node1", ALICE), ("node2", BOB)]
    per = [njobs // 2 + (1 if i < njobs % 2 else 0) for i in range(2)]

    def grid(u, k):
        d, path = scripts[u]
        return [{"argv": [dq.path("submit"), "--grid", "DQ_I=" + ",".join(map(str, range(k))),
                          path], "cwd": d, "env": env, "keep": 1 << 20}]
    gpus = len(hosts) * GPUS
    waves = -(-njobs // (gpus * (B12_PER_GPU if env else 1)))
    trace = CpuTrace()
    try:
        res = parallel([(run_timed, (c, h, u, grid(u, k))) for (h, u), k in zip(subs, per)])
        flat = [t for r in res for t in r]
        ids = []
        for t in flat:
            if t.rc != 0:
                raise failed("dq-submit --grid", t)
            ids += JOB_ID_RE.findall(t.out)
        if len(set(ids)) != njobs:
            raise RuntimeError(f"two sweeps of {njobs} jobs in all gave {len(set(ids))} ids")

        def ended():
            return sum(os.path.exists(os.path.join(dq.root, "jobs", "backend", i, "end.json"))
                       for i in ids)
        try:
            wait_for(lambda: ended() == njobs, 60 + 3 * waves * secs, 0.25,
                     f"{njobs} jobs to end")
        except RuntimeError as e:
            raise RuntimeError(f"{e} ({ended()} ended)") from None
    finally:
        trace.stop()
    jobs = ended_done(dq, ids)
    t_sub = min(t.t0 for t in flat)
    script_in, wrap_in, wrap_out, wrap_cpu, samples, booked = [], [], [], [], 0, set()
    for j in jobs:
        _, run, _, log = job_files(dq, j["id"])
        booked.add(run.get("mem"))
        try:
            with open(log) as f:
                lines = f.read().splitlines()
            first, last = float(lines[0]), float(lines[-1])
            script_in.append(first)
            wrap_in.append(first - j["started"])
            wrap_out.append(j["ended"] - last)
            wrap_cpu.append(proc_cpu(lines[1]))
        except (OSError, ValueError, IndexError):
            pass
        use = read_json(os.path.join(dq.root, "jobs", "backend", j["id"], "gpu.json"), {})
        samples += use.get("samples", 0) if isinstance(use, dict) else 0
    by_gpu = {}
    for j in jobs:
        for g in j["gpus"]:
            by_gpu.setdefault((j["host"], g), []).append((j["started"], j["ended"]))
    first_end = min(j["ended"] for j in jobs)
    last_end = max(j["ended"] for j in jobs)
    last_in = max(script_in) if script_in else float("nan")
    gaps = []
    for spans in by_gpu.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:]) if b[0] >= a[1]]
    return {
        "makespan": last_end - t_sub, "ideal": waves * secs, "waves": waves, "gpus": gpus,
        "submit": [t.wall for t in flat], "first_start": min(j["started"] for j in jobs) - t_sub,
        "all_in": last_in - t_sub, "first_wave": sum(j["started"] < first_end for j in jobs),
        "runtime": median([j["ended"] - j["started"] for j in jobs]),
        "wrap_in": median(wrap_in), "wrap_out": median(wrap_out),
        "end_spread": last_end - first_end, "used": len(by_gpu),
        "per_gpu": (min(map(len, by_gpu.values())), max(map(len, by_gpu.values()))),
        "most": max(most_at_once(s) for s in by_gpu.values()), "gaps": gaps,
        "cpu_in": trace.busy(t_sub, last_in), "cpu_all": trace.busy(t_sub, last_end),
        "cpu_end": trace.busy(first_end, last_end), "cpu_submit": sum(t.cpu for t in flat),
        "wrap_cpu": wrap_cpu, "samples": samples, "booked": booked, "njobs": njobs,
    }


def bench_pack(ctx):
    """Issue 19: sharing jobs (DQ_MEM) packed onto GPUs, against the same
    jobs exclusive."""
    c = ctx.cluster(4)
    nodes, njobs, secs = ctx.size["b12_nodes"], ctx.size["b12_jobs"], ctx.size["b12_seconds"]
    hosts = c.hosts[:nodes]
    for h in c.hosts:       # restored by the reset after the benchmark
        c.set_gpu_model(h, *SHARE_MODEL)
    say(f"{njobs} jobs of DQ_MEM={B12_MEM} x {secs} s on {nodes} nodes x {GPUS} "
        f"{SHARE_MODEL[0]} (two sweeps at once)")
    sh = b12_run(c, hosts, "b12-shared", njobs, secs, {"DQ_MEM": B12_MEM})
    c.kill_user_processes()     # the second run starts as cold as the first: no loops,
    say(f"the same {njobs} jobs exclusive (no DQ_MEM)")     # no ssh connections
    ex = b12_run(c, hosts, "b12-exclusive", njobs, secs, {})
    ncpu = os.cpu_count()
    m, ideal = sh["makespan"], sh["ideal"]
    ratio = ex["makespan"] / m
    want = 0.75 * ex["waves"] / sh["waves"]     # 6x for 8 waves against one
    return [
        Row(12, f"makespan, {njobs} jobs of DQ_MEM={B12_MEM} x {secs} s on {sh['gpus']} "
                f"GPUs of 80 GB (first submit to last end)",
            f"<= {1.15 * ideal:.1f} s (1.15 x {ideal:.0f} s)", fmt_s(m), check(m <= 1.15 * ideal),
            f"ideal {ideal:.0f} s ({sh['gpus']} GPUs x {B12_PER_GPU} jobs: {sh['waves']} "
            f"wave(s)); two sweeps at once (dq-submit --grid of {njobs // 2}, as {ALICE} on node1 "
            f"and {BOB} on node2; cold: no loop, no ssh connection yet), each took "
            f"{' and '.join(fmt_s(x) for x in sh['submit'])}; first job started "
            f"{fmt_s(sh['first_start'])} after the first submit, all {njobs} scripts running "
            f"{fmt_s(sh['all_in'])} after it ({sh['first_wave']} of {njobs} started before any "
            f"ended); job runtime (end.json - run.json) median {fmt_s(sh['runtime'])}, of which "
            f"before the script {fmt_s(sh['wrap_in'])}, after it {fmt_s(sh['wrap_out'])}; ends "
            f"spread over {fmt_s(sh['end_spread'])} (machine CPU then {sh['cpu_end']:.1f} CPU-s); "
            f"start-up (first submit to the last script start, "
            f"{100 * sh['all_in'] / m:.0f}% of the makespan): the machine's CPU busy "
            f"{sh['cpu_in']:.1f} CPU-s ({100 * sh['cpu_in'] / max(sh['all_in'], 1e-9) / ncpu:.0f}% "
            f"of {ncpu} cores, {sh['cpu_in'] / njobs * 1000:.0f} ms per job), of which the two "
            f"dq-submit (with their ssh clients, wait4) {sh['cpu_submit']:.2f} CPU-s and the "
            f"wrappers until their script started {sum(sh['wrap_cpu']):.2f} CPU-s (median "
            f"{1000 * median(sh['wrap_cpu']):.0f} ms each); the rest is screen, sshd, the shells "
            f"and dates of the jobs, polls' nvidia-smi, the loops; whole run "
            f"{sh['cpu_all']:.1f} CPU-s; "
            f"{sh['used']} GPUs used, {sh['per_gpu'][0]}-{sh['per_gpu'][1]} jobs each; booked "
            f"{', '.join(str(b) for b in sorted(sh['booked'], key=str))} MiB per job; "
            f"{sh['samples']} GPU samples taken (sample_interval 10)"),
        Row(12, f"makespan exclusive / shared, the same {njobs} jobs", f">= {want:.1f}x",
            f"{ratio:.2f}x ({fmt_s(ex['makespan'])} / {fmt_s(m)})", check(ratio >= want),
            f"exclusive: {ex['waves']} waves of {ex['gpus']}, ideal {ex['ideal']:.0f} s; the two "
            f"sweeps took {' and '.join(fmt_s(x) for x in ex['submit'])}; the last job's script "
            f"started {fmt_s(ex['all_in'])} after the first submit; its "
            f"wrapper before the script median {fmt_s(ex['wrap_in'])} "
            f"({1000 * median(ex['wrap_cpu']):.0f} ms CPU); machine CPU "
            f"{ex['cpu_all'] / njobs * 1000:.0f} ms per job over the run; gap "
            f"on a GPU between jobs median {fmt_s(median(ex['gaps']))}, max "
            f"{fmt_s(max(ex['gaps']) if ex['gaps'] else float('nan'))}; the goal is 0.75 x "
            f"the ideal {ex['waves'] // sh['waves']}x"),
        Row(12, "(check) most sharing jobs at once on one GPU", f"<= {B12_PER_GPU}",
            str(sh["most"]), check(sh["most"] <= B12_PER_GPU),
            f"max_jobs_per_gpu = {B12_PER_GPU}; {B12_PER_GPU} x {B12_MEM} + share_margin 2% "
            f"fits an 80 GB GPU, so the job count is what limits; exclusive run: at most "
            f"{ex['most']} at once on a GPU"),
    ]


# The deep queue of 13: job i is of kind i % 9 (a third of them sharing),
# and of user i % 50; what dq-submit writes for each (job.json's env, the
# jobs/active entry's gpus and need), checked against the snapshot's
# job_needs at the start.
B13_KINDS = [
    ("DQ_HOSTS=node1", 1, {"DQ_HOSTS": "node1"}, {"hosts": ["node1"]}),
    ("DQ_MEM=8G", 1, {"DQ_MEM": "8G"}, {"mem": 8192}),
    ("DQ_GPU_TYPE=A100", 1, {"DQ_GPU_TYPE": "A100"}, {"gpu_type": "A100"}),
    ("DQ_MEM=16G DQ_GPU_TYPE=A100", 1, {"DQ_MEM": "16G", "DQ_GPU_TYPE": "A100"},
     {"gpu_type": "A100", "mem": 16384}),
    ("DQ_GPUS=2", 2, {"DQ_GPUS": "2"}, None),
    ("plain", 1, {}, None),
    ("DQ_GPUS=2 DQ_MEM=12G", 2, {"DQ_GPUS": "2", "DQ_MEM": "12G"}, {"mem": 12288}),
    ("DQ_GPU_MEM=40G", 1, {"DQ_GPU_MEM": "40G"}, {"gpu_mem": 40960}),
    ("plain", 1, {}, None),
]
# Real sharing jobs (sleep 3600) that book the shared GPUs before the queue
# is written: (user, host, DQ_MEM, how many), submitted in this order; dq
# packs each onto the GPU with the least room that fits it.  node1 (4 x
# A100 80GB, 80,281 MiB bookable each): two 38G per GPU, 2,457 MiB left;
# node2 (4 x RTX 3090, 24,084 bookable): one 20G per GPU, 3,604 left, or in
# "room" one 12G on GPU 3 instead, 11,796 left: room for one 8G job.
B13_BOOKINGS = {
    "full": [(ALICE, "node1", "38G", 4), (BOB, "node1", "38G", 4), (BOB, "node2", "20G", 4)],
    "room": [(ALICE, "node1", "38G", 4), (BOB, "node1", "38G", 4), (BOB, "node2", "20G", 3),
             (BOB, "node2", "12G", 1)],
}
B13_HAND_MIB = 10240    # each GPU of node3 and node4 (1080 Ti, 11 GB): a process by hand


def b13_check_kinds(base):
    """What synth_jobs writes for B13_KINDS is what this dq.py writes."""
    dqm = dq_module()
    for label, gpus, env, need in B13_KINDS:
        got = dqm.job_needs(env, gpus)
        if got != (need or {}):
            raise RuntimeError(f"benchmark 13's kind {label}: dq's job_needs gives {got}, "
                               f"the benchmark writes {need}")
        entry = {"format": 1, "gpus": gpus, "submitted": 1234.5}
        if need:
            entry["need"] = need
        name = dqm.queue_name(f"{base}-{ALICE}", entry)
        if name != queue_file_name(base, gpus, need, 1234.5):
            raise RuntimeError(f"benchmark 13's kind {label}: dq's queue name is {name}, "
                               f"the benchmark writes {queue_file_name(base, gpus, need, 1234.5)}")


def b13_setup(c, variant):
    """The busy cluster of 13 (see B13_BOOKINGS); a fresh data root."""
    for host, (name, mib) in zip(c.hosts, MODELS):     # A100, 3090, 1080 Ti x2
        c.set_gpu_model(host, name, mib)
    dq = new_install(c, f"b13-{variant}")
    # As in 9: nobody claims a placement for a synthetic user, so the next
    # pass drops it (assign_timeout) and places the same again; the loops
    # of dqalice and dqbob stay idle; no GPU sampling by the wrappers of
    # the sleeping jobs during the timings.
    write_conf(dq, c.hosts, assign_timeout=0.001, poll_interval=3600, watch_interval=3600,
               sample_interval=0)
    real = []
    for user, host, mem, k in B13_BOOKINGS[variant]:
        _, path = write_script(c, user, "b13.sh", "sleep 3600\n")
        res = run_timed(c, "node1", user, submit_items(dq, path, k, env={
            "DQ_MEM": mem, "DQ_HOSTS": host}))
        for t, job_id in zip(res, submitted_ids(res)):
            if "Executing" not in t.out:
                raise RuntimeError(f"{job_id} (DQ_MEM={mem} on {host}) did not start at "
                                   f"submit: {t.out!r} {t.err!r}")
            real.append(job_id)
    wait_for(lambda: all(os.path.exists(os.path.join(dq.root, "jobs", "backend", j, "run.json"))
                         for j in real), 30, 0.2, f"{len(real)} jobs to run")
    for h in ("node3", "node4"):
        for g in range(GPUS):
            c.hold_gpu(h, BOB, g, memory_mb=B13_HAND_MIB)
    places = read_json(os.path.join(dq.root, "state", "placements.json"), {})
    booked = {}
    for p in (places.get("jobs") or {}).values():
        for g in p.get("gpus", []):
            booked.setdefault((p["host"], g), []).append(p.get("mem"))
    return dq, len(real), booked


def bench_deep_shared(ctx):
    """Issue 19's pass target: a deep queue of 50 users, a third of it
    sharing jobs (DQ_MEM), every GPU busy; once with no room for any
    sharing job (the shared GPUs' bookings leave less than the smallest
    DQ_MEM), once with room for one 8G job; each against the same pass
    with 10 jobs queued."""
    qlen, nusers, npass = ctx.size["b13_queue"], ctx.size["b13_users"], ctx.size["b13_passes"]
    if nusers < B9_SMALL or qlen <= B9_SMALL:
        raise RuntimeError(f"benchmark 13 needs b13_users >= {B9_SMALL} and b13_queue > "
                           f"{B9_SMALL}")
    # the synthetic users first: the 10 jobs of the small queue are theirs
    # (dqalice and dqbob run the real jobs, so fair share takes them last)
    users = b9_users(nusers)[2:] + [ALICE, BOB]
    created = ensure_users(users)
    c = ctx.cluster(4)
    rows = []
    for variant in ("full", "room"):
        if variant != "full":
            c.reset()       # no jobs, no holders, the default GPUs
        say(f"[{variant}] real sharing jobs on node1 and node2, node3 and node4 held by hand")
        dq, nreal, booked = b13_setup(c, variant)
        base = next_id(dq)
        b13_check_kinds(base)
        once = [dq.path("schedule"), "--once", "--quiet"]

        def shape(num):
            i = num - base
            _, gpus, env, need = B13_KINDS[i % len(B13_KINDS)]
            return {"user": users[i % nusers], "gpus": gpus, "env": env, "need": need}

        def measure():
            res = times(c, "node2", BOB, once, npass + 1)
            places = read_json(os.path.join(dq.root, "state", "placements.json"), {})
            placed = sorted((j, p["host"], tuple(p["gpus"]), p.get("mem")) for j, p in
                            (places.get("jobs") or {}).items() if p.get("state") == "assigned")
            return res, placed
        now = time.time()
        say(f"[{variant}] {B9_SMALL} queued jobs: {npass + 1} passes as {BOB}")
        synth_jobs(dq, base, B9_SMALL, users, "queued", t0=now - 300, step=0.01, shape=shape)
        small, placed_small = measure()
        say(f"[{variant}] {qlen} queued jobs of {nusers} users: the same again")
        t = time.monotonic()
        synth_jobs(dq, base + B9_SMALL, qlen - B9_SMALL, users, "queued", t0=now - 200,
                   step=100 / qlen, shape=shape)
        synth_s = time.monotonic() - t
        big, placed_big = measure()
        if os.environ.get("BENCH_PROFILE"):     # development: where a pass's time goes
            r = c.run("node2", BOB, [PY, "-S", "-c", PROFILE, dq.root, "dq-schedule", "--once",
                                     "--quiet"], timeout=300)
            with open(os.environ["BENCH_PROFILE"], "a") as f:
                f.write(f"=== [13 {variant}] dq-schedule --once as {BOB} on node2 ({qlen} "
                        f"queued)\n{r.stdout}{r.stderr[-3000:]}\n")
        # every job's reason, from the planner over the whole queue
        r = dq.run("node1", ALICE, "jobs", "queue", "--json", "-a", timeout=300, check=True)
        listed = json.loads(r.stdout)
        sharing_reasons, other_reasons = {}, {}
        for j in listed:
            n = int(j["id"].split("-", 1)[0]) - base
            if n < 0:
                continue
            kind = B13_KINDS[n % len(B13_KINDS)]
            into = sharing_reasons if kind[3] and "mem" in kind[3] else other_reasons
            into[j["reason"] or "-"] = into.get(j["reason"] or "-", 0) + 1
        nshare = sum(sharing_reasons.values())
        if len(listed) != qlen:
            raise RuntimeError(f"dq-jobs queue -a lists {len(listed)} jobs, not {qlen}")
        want = {"full": [], "room": [(f"{base + 1}-{users[1]}", "node2", (3,), 8192)]}[variant]
        if placed_big != want or placed_small != want:
            raise RuntimeError(
                f"[{variant}] each pass should place {want or 'nothing'}; with {B9_SMALL} "
                f"queued it placed {placed_small}, with {qlen} {placed_big}")
        if variant == "full" and not all(w.startswith("GPU memory") for w in sharing_reasons):
            raise RuntimeError(f"[full] every sharing job should wait for GPU memory: "
                               f"{sharing_reasons}")
        s, b = median([t.wall for t in small[1:]]), median([t.wall for t in big[1:]])
        cs, cb = median([t.cpu for t in small[1:]]), median([t.cpu for t in big[1:]])
        rooms = {}
        for (h, g), mems in sorted(booked.items()):
            rooms.setdefault(h, []).append("+".join(f"{m // 1024}G" for m in mems))
        what = {"full": "no room for any sharing job",
                "room": "room for one 8G job on one shared GPU"}[variant]
        top = lambda d: ", ".join(f"{w} ({k})" for w, k in
                                  sorted(d.items(), key=lambda x: -x[1])[:4])
        rows.append(Row(
            13, f"pass (dq-schedule --once), {qlen} / {B9_SMALL} queued jobs of {nusers} "
                f"users, a third sharing (DQ_MEM), {what}",
            "<= 1.5x", f"{b / s:.2f}x ({fmt_s(b)} / {fmt_s(s)})", check(b <= 1.5 * s),
            f"{npass} passes each (median, after a warm-up), as {BOB} on node2, polls "
            f"included; GPUs A100 80GB / 3090 / 1080 Ti / 1080 Ti (node1-4), all 16 busy: "
            f"{nreal} real sharing jobs (sleep) of {ALICE} and {BOB} booking node1 "
            f"({'; '.join(rooms.get('node1', []))}) and node2 "
            f"({'; '.join(rooms.get('node2', []))}), node3 and node4 each GPU held by hand "
            f"with {B13_HAND_MIB // 1024} GB; queue in turn of {len(B13_KINDS)}: "
            f"{', '.join(k[0] for k in B13_KINDS)}; "
            + (f"each pass placed nothing in both cases" if not want else
               f"each pass placed the same job in both cases ({want[0][0]}, 8G on node2 GPU 3), "
               f"dropped by the next pass (assign_timeout 0.001)")
            + f"; reasons (dq-jobs queue -a) of the {nshare} sharing jobs: "
              f"{top(sharing_reasons)}; of the others: {top(other_reasons)}; CPU per pass "
              f"{cb:.3f} / {cs:.3f} CPU-s; the {qlen - B9_SMALL} jobs written in {synth_s:.1f} s"
            + (f"; {created} users created" if created and variant == "full" else "")))
    return rows


# 14: what the GPU sampling costs a running job ################################

def proc_cpu(stat_line):
    """utime + stime + cutime + cstime (s) from a /proc/PID/stat line."""
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def bench_sampling(ctx):
    """Issue 19: the CPU a job's wrapper spends sampling its GPU use
    (two nvidia-smi calls per sample), at the default sample_interval."""
    c = ctx.cluster(4)
    secs, n = ctx.size["b14_seconds"], ctx.size["b14_n"]
    if n > GPUS:
        raise RuntimeError(f"b14_n is at most {GPUS} (one node's GPUs)")
    runs = {}
    for tag, interval, host in (("on", 1, "node1"), ("off", 0, "node2")):
        dq = new_install(c, f"b14-{tag}", sample_interval=interval)
        d = c.user_dir(ALICE, f"b14-{tag}")
        # The job holds a GPU for secs, then reads its wrapper's CPU (its
        # parent: the wrapper forks and execs the script) and the samples
        # taken so far, just before it ends.
        body = (f"/usr/local/bin/fake-cuda --hold {secs} --mem 2000 > /dev/null\n"
                f"cat /proc/$PPID/stat > {d}/$DQ_JOB_ID.stat\n"
                f"cat {dq.root}/jobs/backend/$DQ_JOB_ID/gpu.json > {d}/$DQ_JOB_ID.gpu "
                f"2>/dev/null\necho $PPID > {d}/$DQ_JOB_ID.ppid\n")
        _, path = write_script(c, ALICE, "b14.sh", body, subdir=f"b14-{tag}")
        runs[tag] = (dq, d, path, interval, host)
    say(f"{n} job(s) holding a GPU for {secs} s with sample_interval 1 (node1) and as many "
        f"with 0 (node2), at the same time")
    res = parallel([(run_timed, (c, host, ALICE, submit_items(dq, path, n,
                                                              env={"DQ_HOSTS": host})))
                    for dq, _, path, _, host in runs.values()])
    got = {}
    for (tag, (dq, d, _, interval, host)), r in zip(runs.items(), res):
        ids = submitted_ids(r)
        for t, job_id in zip(r, ids):
            if "Executing" not in t.out:
                raise RuntimeError(f"{job_id} did not start at submit: {t.out!r} {t.err!r}")
        got[tag] = (dq, d, ids)
    for tag, (dq, d, ids) in got.items():
        wait_for(lambda: all(os.path.exists(os.path.join(dq.root, "jobs", "backend", i,
                                                         "end.json")) for i in ids),
                 secs + 60, 0.5, f"the {tag} jobs to end")
    cpu, samples, spans = {}, [], {}
    for tag, (dq, d, ids) in got.items():
        cpu[tag] = []
        for job_id in ids:
            job, run, end, _ = job_files(dq, job_id)
            if end.get("state") != "done":
                raise RuntimeError(f"{job_id} ended {end.get('state')}: {end.get('reason')}")
            try:
                with open(os.path.join(d, job_id + ".stat")) as f:
                    stat = f.read()
                with open(os.path.join(d, job_id + ".ppid")) as f:
                    ppid = int(f.read())
            except (OSError, ValueError) as e:
                raise RuntimeError(f"{job_id} left no reading of its wrapper: {e}") from None
            if ppid != run.get("pid"):
                raise RuntimeError(f"{job_id}: the script's parent is {ppid}, run.json's "
                                   f"pid {run.get('pid')}: not the wrapper")
            cpu[tag].append(proc_cpu(stat))
            spans.setdefault(tag, []).append(end["ended"] - run["started"])
            if tag == "on":
                use = read_json(os.path.join(d, job_id + ".gpu"), {})
                if not use.get("samples"):
                    raise RuntimeError(f"{job_id} took no GPU sample with sample_interval 1: "
                                       f"{use}")
                samples.append(use["samples"])
    # one nvidia-smi of each of the two queries a sample makes, timed alone
    smi = {}
    for q in ("--query-gpu=index,uuid,utilization.gpu",
              "--query-compute-apps=gpu_uuid,pid,used_memory"):
        ts = times(c, "node1", ALICE, ["/usr/local/bin/nvidia-smi", q,
                                       "--format=csv,noheader,nounits"], 6)
        smi[q] = median([t.cpu for t in ts[1:]])
    on, off = sum(cpu["on"]) / n, sum(cpu["off"]) / n
    per = (on - off) / (sum(samples) / n)
    pct = 100 * per / 10
    return [Row(14, "GPU sampling, CPU of a job's wrapper at sample_interval 10 (one core)",
                "< 1%", f"{pct:.2f}%", check(pct < 1),
                f"{n} job(s) each with sample_interval 1 and 0, at once ({secs} s of fake-cuda "
                f"holding a GPU; runtime median {fmt_s(median(spans['on']))} / "
                f"{fmt_s(median(spans['off']))}); the wrapper's utime+stime+cutime+cstime "
                f"(/proc/PID/stat, read by the job's script as it ends) "
                f"{'/'.join(f'{x:.2f}' for x in cpu['on'])} CPU-s with sampling, "
                f"{'/'.join(f'{x:.2f}' for x in cpu['off'])} without; samples taken "
                f"{'/'.join(map(str, samples))}: {per * 1000:.1f} ms of CPU per sample, "
                f"{pct:.2f}% of a core at 10 s ({10 * pct:.1f}% at 1 s); the two nvidia-smi "
                f"calls of a sample alone (the tests' fake, a Python script; a real "
                f"nvidia-smi costs more) {1000 * sum(smi.values()):.1f} ms CPU "
                f"({' + '.join(f'{1000 * v:.1f}' for v in smi.values())})")]


# 15-17: snapshots, dq-kill --grace, dq-shell (issue 20) ######################

def write_tree(top, files, user):
    """Write {relative path: bytes} under top, files and directories owned
    by user (as if they had written them); executable where the name ends
    in .sh."""
    pw = pwd.getpwnam(user)
    made = set()
    for rel, data in files.items():
        path = os.path.join(top, rel)
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            d = parent
            while d != top and d not in made:
                os.chown(d, pw.pw_uid, pw.pw_gid)
                made.add(d)
                d = os.path.dirname(d)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fchown(fd, pw.pw_uid, pw.pw_gid)
            if rel.endswith(".sh"):
                os.fchmod(fd, 0o755)
        finally:
            os.close(fd)


def lab_repo(nfiles, mb):
    """A lab-typical repository's files, {path: bytes}: nfiles in all, about
    mb MB, 70% of it in five larger files (data and weights that are
    committed), the rest source files of 0.2-1.8x the average size in
    packages of 20; the job script scripts/train.sh.  Deterministic."""
    import random
    rnd = random.Random(20)
    total = mb * 1000 * 1000
    big = [int(total * 0.7 * w) for w in (0.34, 0.29, 0.17, 0.11, 0.09)]
    files = {f"data/shard{i}.bin" if i < 3 else f"weights/init{i}.pt": rnd.randbytes(b)
             for i, b in enumerate(big)}
    files["scripts/train.sh"] = b"#!/bin/sh\ntrue\n"
    files[".gitignore"] = b"*.ckpt\nruns/\n__pycache__/\n"
    nsmall = nfiles - len(files)
    avg = (total - sum(big)) / nsmall
    for i in range(nsmall):
        size = int(avg * rnd.uniform(0.2, 1.8))
        lines, n = [], 0
        j = 0
        while n < size:
            line = f"def f{i}_{j}(x, y={rnd.randrange(10 ** 6)}):\n    return x * y + {j}\n"
            lines.append(line)
            n += len(line)
            j += 1
        files[f"src/pkg{i // 20:03d}/mod{i % 20:02d}.py"] = "".join(lines)[:size].encode()
    return files


# Copies the files git lists (repository top, destination) with Python's
# shutil.copy2, as dq's snapshot does, then syncs.
COPY2 = r"""
import os, shutil, subprocess, sys
top, dest = sys.argv[1], sys.argv[2]
names = subprocess.run(["git", "-C", top, "ls-files", "-z", "-cmo", "--exclude-standard"],
                       stdout=subprocess.PIPE, check=True).stdout.split(b"\0")
made = set()
for rel in sorted({os.fsdecode(n) for n in names if n}):
    dst = os.path.join(dest, rel)
    parent = os.path.dirname(dst)
    if parent not in made:
        os.makedirs(parent, exist_ok=True)
        made.add(parent)
    shutil.copy2(os.path.join(top, rel), dst, follow_symlinks=False)
os.sync()
"""


def bench_snapshot(ctx):
    """Issue 20: dq-submit with DQ_SNAPSHOT=1 (a copy of the repository's
    files into the job's directory) against the same submit without; a
    sweep with one shared snapshot against the same sweep without."""
    c = ctx.cluster(4)
    nfiles, mb, n = ctx.size["b15_files"], ctx.size["b15_mb"], ctx.size["b15_n"]
    nsweep = ctx.size["b15_sweep"]
    say("holding every GPU (the jobs queue: the submit alone is timed)")
    held = hold_all(c, c.hosts, GPUS)      # noqa: F841 -- killed by the reset afterwards
    dq = new_install(c, "b15-snapshot")
    repo = c.user_dir(ALICE, "b15-repo")
    refs = c.user_dir(ALICE, "b15-ref")
    try:
        return _bench_snapshot(c, dq, repo, refs, nfiles, mb, n, nsweep)
    finally:
        rmtree(repo)
        rmtree(refs)


def _bench_snapshot(c, dq, repo, refs, nfiles, mb, n, nsweep):
    say(f"a git repository of {nfiles} files, ~{mb} MB, as {ALICE}")
    t = time.monotonic()
    files = lab_repo(nfiles, mb)
    write_tree(repo, files, ALICE)
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@example.org"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "v1"]):
        c.run("node1", ALICE, git + args, cwd=repo, timeout=300, check=True)
    # what a working tree has besides: edits not committed, new files git
    # does not ignore (both copied), an ignored checkpoint (not copied)
    edits = {rel: files[rel] + b"# edited\n"
             for rel in [r for r in sorted(files) if r.startswith("src/")][:10]}
    new = {f"src/new/scratch{i}.py": b"print('new')\n" * (50 + i) for i in range(10)}
    ignored = {"runs/last.ckpt": bytes(min(mb, 8) * 1000 * 1000)}
    write_tree(repo, dict(edits, **new, **ignored), ALICE)
    made_s = time.monotonic() - t
    want_files = len(files) + len(new)
    want_bytes = sum(len(v) for v in dict(files, **edits, **new).values())
    script = os.path.join(repo, "scripts", "train.sh")
    sub = [dq.path("submit"), script]
    plain = {"argv": sub, "cwd": repo}
    snap = dict(plain, env={"DQ_SNAPSHOT": "1"})
    # the same files copied at disk speed: git's list, cp -a, sync (what
    # dq does: list, copy with modes and times, sync before the rename)
    copy = {"argv": ["/bin/sh", "-c", 'mkdir -p "$1" && cd "$0" && git ls-files -z -cmo '
                     '--exclude-standard | sort -zu | xargs -0 cp -a --parents -t "$1" && sync',
                     repo, "DEST"]}
    # and by Python's shutil.copy2 (what dq copies each file with), file by
    # file from git's list, then sync: the floor of a copy in Python
    py = {"argv": [PY, "-S", "-c", COPY2, repo, "DEST"]}
    values = ",".join(f"0.{i:03d}" for i in range(1, nsweep + 1))
    grid = {"argv": [dq.path("submit"), "--grid", f"DQ_LR={values}", script], "cwd": repo,
            "keep": 1 << 20}
    # The copy's cost (the kernel's, creating files) drifts by 3x over a
    # run on this VM: every round times all six, one after the other.
    say(f"{n + 1} rounds of: a submit without DQ_SNAPSHOT, one with, 'git ls-files | cp -a; "
        f"sync' and a Python copy2 loop of the same files, dq-submit --grid of {nsweep} "
        f"jobs without and with DQ_SNAPSHOT=1")
    items = []
    for i in range(n + 1):
        items += [plain, snap, dict(copy, argv=copy["argv"][:-1] + [os.path.join(refs, str(i))]),
                  dict(py, argv=py["argv"][:-1] + [os.path.join(refs, f"py{i}")]),
                  grid, dict(grid, env={"DQ_SNAPSHOT": "1"})]
    res = run_timed(c, "node1", ALICE, items, timeout=1200)
    for t in res:
        if t.rc != 0:
            raise failed("dq-submit / cp", t)
    p_res, s_res, c_res, y_res, gp, gs = (res[k::6] for k in range(6))
    ids = submitted_ids(p_res + s_res)
    snap_ids = ids[len(p_res):]
    job = job_files(dq, snap_ids[-1])[0]
    got = job.get("snapshot") or {}
    if (got.get("files"), got.get("bytes"), got.get("git")) != (want_files, want_bytes, True):
        raise RuntimeError(f"the snapshot of {snap_ids[-1]} has {got.get('files')} files, "
                           f"{got.get('bytes')} bytes (git: {got.get('git')}); expected "
                           f"{want_files} files, {want_bytes} bytes from git")
    sdir = os.path.join(dq.root, "jobs", "backend", snap_ids[-1], "snapshot")
    if not os.path.isfile(os.path.join(sdir, "scripts", "train.sh")) or \
            os.path.exists(os.path.join(sdir, "runs")):
        raise RuntimeError(f"{sdir} lacks the script or holds the ignored checkpoint")
    pl, sn, cp = (median([t.wall for t in r[1:]]) for r in (p_res, s_res, c_res))
    extra = sn - pl
    sweep_ids = JOB_ID_RE.findall(gs[-1].out)
    if len(sweep_ids) != nsweep:
        raise RuntimeError(f"the sweep printed {len(sweep_ids)} job ids, not {nsweep}")
    shared = {(job_files(dq, i)[0].get("snapshot") or {}).get("job") for i in sweep_ids}
    copies = [i for i in sweep_ids if os.path.isdir(os.path.join(dq.root, "jobs", "backend", i,
                                                                 "snapshot"))]
    if shared != {sweep_ids[0]} or copies != [sweep_ids[0]]:
        raise RuntimeError(f"a sweep's jobs should share one snapshot, the first job's "
                           f"({sweep_ids[0]}): they name {sorted(shared, key=str)[:3]}, "
                           f"copies in {copies[:3]}")
    wp, ws = median([t.wall for t in gp[1:]]), median([t.wall for t in gs[1:]])
    goal_sweep = 1.2 * wp + extra
    r = dq.run("node1", ALICE, "jobs", "summary", "--json", timeout=120)
    queued = json.loads(r.stdout)["queued"]
    size_mb = want_bytes / 1e6
    big = sorted((len(v) for k, v in files.items() if k.startswith(("data/", "weights/"))),
                 reverse=True)
    nsrc = sum(1 for k in files if k.startswith("src/"))
    src_bytes = sum(len(v) for k, v in files.items() if k.startswith("src/"))

    def cpu(runs):
        return median([t.cpu for t in runs[1:]])
    rounds = ", ".join(f"{fmt_s(a.wall - b.wall)} / {fmt_s(c.wall)}"
                       for a, b, c in zip(s_res[1:], p_res[1:], c_res[1:]))
    sweeps = ", ".join(f"{fmt_s(a.wall)} / {fmt_s(b.wall)}" for a, b in zip(gs[1:], gp[1:]))
    return [
        Row(15, f"dq-submit with DQ_SNAPSHOT=1, a git repository of {want_files} files, "
                f"{size_mb:.0f} MB (median)", "<= plain + 1.5 x cp",
            f"{fmt_s(sn)} (plain {fmt_s(pl)}, cp {fmt_s(cp)})", check(extra <= 1.5 * cp),
            f"every GPU held, so the jobs queue; {n} of each after a cold one (plain "
            f"{fmt_s(p_res[0].wall)}, snapshot {fmt_s(s_res[0].wall)}), in rounds, as "
            f"{ALICE} on node1 in the repository's top; the snapshot adds {fmt_s(extra)} "
            f"(each round, the snapshot's extra / cp: {rounds}) "
            f"({size_mb / max(extra, 1e-9):.0f} MB/s; CPU {cpu(s_res):.2f} / {cpu(p_res):.2f} "
            f"CPU-s with / without); cp = 'git ls-files -z -cmo --exclude-standard | sort -zu "
            f"| xargs -0 cp -a --parents; sync' of the same files (CPU {cpu(c_res):.2f} "
            f"CPU-s); Python's shutil.copy2 file by file from git's list, then sync: "
            f"{fmt_s(median([t.wall for t in y_res[1:]]))} ({cpu(y_res):.2f} CPU-s); "
            f"the repository: {len(files)} committed files ({len(big)} larger ones "
            f"of {', '.join(f'{b / 1e6:.1f}' for b in big)} MB, random bytes; {nsrc} source "
            f"files of {src_bytes / nsrc / 1e3:.1f} kB on average), 10 of them edited, "
            f"{len(new)} new untracked files, an ignored "
            f"{len(ignored['runs/last.ckpt']) / 1e6:.0f} MB checkpoint (checked: not "
            f"copied); the snapshot checked to hold {want_files} files, {want_bytes:,} bytes; "
            f"repository made in {made_s:.1f} s"),
        Row(15, f"dq-submit --grid of {nsweep} jobs with DQ_SNAPSHOT=1 (one shared copy), "
                f"median", "<= 1.2 x without + one copy",
            f"{fmt_s(ws)} (goal {fmt_s(goal_sweep)}; without {fmt_s(wp)})",
            check(ws <= goal_sweep),
            f"{n} of each after a cold one ({fmt_s(gp[0].wall)} / {fmt_s(gs[0].wall)}), in "
            f"the same rounds as the single submits; one copy = the single submit's extra "
            f"above ({fmt_s(extra)}); each round with / without: "
            f"{sweeps}; the "
            f"sweep's {nsweep} jobs checked to name one snapshot, the first job's, and to have "
            f"one copy; CPU {median([t.cpu for t in gs[1:]]):.2f} / "
            f"{median([t.cpu for t in gp[1:]]):.2f} CPU-s; {queued} jobs queued at the end"),
    ]


def first_float(path):
    """The first line of a file as a number (a job's `date +%s.%N`), or None."""
    try:
        with open(path) as f:
            return float(f.readline())
    except (OSError, ValueError):
        return None


def bench_grace(ctx):
    """Issue 20: dq-kill --grace on a running job: how soon its warning
    arrives, and how soon after the grace's end its GPU runs the next job."""
    c = ctx.cluster(4)
    n, grace = ctx.size["b16_n"], ctx.size["b16_grace"]
    dq = new_install(c, "b16-grace")
    d = c.user_dir(ALICE, "b16")
    say("node2's GPUs 1-3 held by hand: the jobs (DQ_HOSTS=node2) take turns on GPU 0")
    for g in (1, 2, 3):
        c.hold_gpu("node2", BOB, g)
    # The job traps the warning (USR1, its DQ_SIGNAL) and goes on; it
    # traps the TERM at the grace's end and exits.  `wait` returns at once
    # on a trapped signal (the sleep gets it too: every process of the job).
    body = (f"trap 'date +%s.%N > {d}/$DQ_JOB_ID.warn' USR1\n"
            f"trap 'date +%s.%N > {d}/$DQ_JOB_ID.term; exit 0' TERM\n"
            "date +%s.%N\n"
            "while :; do sleep 3600 & wait $!; done\n")
    _, path = write_script(c, ALICE, "b16.sh", body, subdir="b16")
    env = {"DQ_HOSTS": "node2", "DQ_SIGNAL": "USR1"}
    say(f"{n + 1} jobs of {ALICE} submitted (one runs, the rest wait); {n} times "
        f"'dq-kill --grace {grace}s' of the running one, from node1")
    res = run_timed(c, "node1", ALICE, submit_items(dq, path, n + 1, env=env))
    ids = submitted_ids(res)
    if "Executing" not in res[0].out:
        raise RuntimeError(f"{ids[0]} did not start at submit: {res[0].out!r} {res[0].err!r}")
    logs = [job_files(dq, i)[3] for i in ids]
    kills = []
    for i in range(n):
        wait_for(lambda: first_float(logs[i]) is not None, 30, 0.05, f"{ids[i]} to run")
        # a different moment of the job's life each time (its wrapper looks
        # at its clock every 0.5 s while the job is silent)
        time.sleep(0.2 + (0.37 * i) % 1)
        [t] = run_timed(c, "node1", ALICE, [{"argv": [dq.path("kill"), "--grace", f"{grace}s",
                                                      ids[i]]}])
        if t.rc != 0:
            raise failed("dq-kill --grace", t)
        wait_for(lambda: first_float(logs[i + 1]) is not None, grace + 30, 0.05,
                 f"{ids[i + 1]} to start after {ids[i]}'s grace")
        kills.append(t)
    warn_lat, term_late, term_to_end, end_to_next, due_to_next, cmd_to_next = \
        [], [], [], [], [], []
    for i, t in enumerate(kills):
        job, run, end, _ = job_files(dq, ids[i])
        nrun = job_files(dq, ids[i + 1])[1]
        warned = first_float(os.path.join(d, ids[i] + ".warn"))
        termed = first_float(os.path.join(d, ids[i] + ".term"))
        nxt = first_float(logs[i + 1])
        if end.get("state") != "killed" or "--grace" not in (end.get("reason") or ""):
            raise RuntimeError(f"{ids[i]} ended {end.get('state')}: {end.get('reason')}")
        if warned is None or termed is None:
            raise RuntimeError(f"{ids[i]}'s traps wrote no warning ({warned}) or TERM ({termed})")
        if (run.get("host"), nrun.get("host"), run.get("gpus"), nrun.get("gpus")) != \
                ("node2", "node2", [0], [0]):
            raise RuntimeError(f"{ids[i]} and {ids[i + 1]} should have run on node2 GPU 0: "
                               f"{run.get('host')}/{run.get('gpus')}, {nrun.get('host')}/"
                               f"{nrun.get('gpus')}")
        warn_lat.append(warned - t.t0)
        term_late.append(termed - (warned + grace))
        term_to_end.append(end["ended"] - termed)
        end_to_next.append(nxt - end["ended"])
        due_to_next.append(nxt - (warned + grace))
        cmd_to_next.append(nxt - (t.t0 + grace))
    c.run("node1", ALICE, [dq.path("kill"), ids[n]], timeout=60)
    w, g = median(warn_lat), median(due_to_next)
    return [
        Row(16, f"dq-kill --grace {grace}s of a running job: the command to the job's "
                f"warning (median)", "< 0.5 s", fmt_s(w), check(w < 0.5),
            f"{n} jobs (DQ_SIGNAL=USR1, each the next of {ALICE}'s queue to run on node2's "
            f"one free GPU) killed from node1 (dq-kill pokes the wrapper over ssh); the job's "
            f"'trap ... USR1' writes the time; each {', '.join(fmt_s(x) for x in warn_lat)}; "
            f"dq-kill itself took median {fmt_s(median([t.wall for t in kills]))}"),
        Row(16, f"dq-kill --grace {grace}s: the grace's end (warning + {grace} s) to the next "
                f"queued job's script start (median)", "< 0.5 s", fmt_s(g), check(g < 0.5),
            f"each {', '.join(fmt_s(x) for x in due_to_next)}; of which the TERM came after "
            f"the grace's end (the job's TERM trap) {', '.join(fmt_s(x) for x in term_late)}; "
            f"the trap's exit to end.json median {fmt_s(median(term_to_end))}; end.json to the "
            f"next job's first line (the hand-over) median {fmt_s(median(end_to_next))}; from "
            f"the command + {grace} s: median {fmt_s(median(cmd_to_next))}; every job ended "
            f"killed with a --grace reason"),
    ]


# Runs inside the node as the test user: each command on a terminal of its
# own (a pty of 24 x 80, TERM=xterm), as a person would type it; when the
# terminal first shows `mark`, and when the command ends.
PTY_RUN = r"""
import fcntl, json, os, pty, select, struct, sys, termios, time
res = []
for item in json.loads(sys.argv[1]):
    t0 = time.time()
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.chdir(item["cwd"])
        os.execvp(item["argv"][0], item["argv"])
    buf, seen, mark = b"", None, item["mark"].encode()
    while True:
        r, _, _ = select.select([fd], [], [], 60)
        if not r:
            os.kill(pid, 9)
            break
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            break
        buf += data
        if seen is None and mark in buf:
            seen = time.time()
    _, status = os.waitpid(pid, 0)
    res.append({"t0": t0, "seen": seen, "t1": time.time(),
                "rc": os.waitstatus_to_exitcode(status),
                "out": buf[-4000:].decode(errors="replace")})
    time.sleep(item.get("sleep", 0))
print(json.dumps(res))
"""


def bench_shell(ctx):
    """Issue 20: dq-shell --now on a free cluster.  Non-interactively (the
    command ends before a terminal could attach, so dq-shell prints its
    output): how soon the job starts, how soon dq-shell returns, against
    dq-submit followed by dq-wait of the same one-line job.  On a terminal:
    how soon the job's output shows there (dq-shell attached)."""
    c = ctx.cluster(4)
    n = ctx.size["b17_n"]
    dq = new_install(c, "b17-shell")
    d, path = write_script(c, ALICE, "b17.sh", "date +%s.%N\n", subdir="b17")
    shell = {"argv": [dq.path("shell"), "--now", "date", "+%s.%N"], "cwd": d, "sleep": 1.0}
    sub_wait = {"argv": ["/bin/sh", "-c", 'out=$("$0" "$2") || exit; echo "$out"; '
                         'id=$(echo "$out" | sed -n "s/^Job ID: .\\(.*\\).$/\\1/p"); '
                         'exec "$1" "$id"', dq.path("submit"), dq.path("wait"), path],
                "cwd": d, "sleep": 1.0}
    say(f"{n + 1} of 'dq-shell --now date +%s.%N' and of dq-submit + dq-wait of a script "
        f"'date +%s.%N', interleaved, 1 s apart, as {ALICE} on node1 (the first pair cold)")
    res = run_timed(c, "node1", ALICE, [sub_wait, shell] * (n + 1), timeout=600)
    for t in res:
        if t.rc != 0:
            raise failed("dq-shell / dq-submit + dq-wait", t)
    # On a terminal: the job prints its time, then a mark the command line
    # does not contain (R42Y), and runs on for 3 s, so that dq-shell
    # attaches the terminal to it (ssh -t HOST screen -r) and screen shows it.
    job_cmd = "date +%s.%N; echo R$((6*7))Y; sleep 3"
    say(f"{n + 1} of 'dq-shell --now sh -c \"{job_cmd}\"' on a terminal")
    spec = [{"argv": [dq.path("shell"), "--now", "sh", "-c", job_cmd], "cwd": d,
             "mark": "R42Y", "sleep": 1.0}] * (n + 1)
    r = c.run("node1", ALICE, [PY, "-c", PTY_RUN, json.dumps(spec)], env={"TERM": "xterm"},
              timeout=120 + 10 * n)
    if r.returncode != 0:
        raise RuntimeError(f"the terminal harness failed: {r.stderr[-2000:]}")
    tty = [Timed(x) for x in json.loads(r.stdout)]
    for t in tty:
        if t.rc != 0 or t.seen is None or "detaches" not in t.out:
            raise RuntimeError(f"dq-shell on a terminal (exit {t.rc}) should attach and show "
                               f"R42Y: {t.out[-600:]!r}")
    r = dq.run("node1", ALICE, "jobs", "complete", "--json", "-n", str(6 * n + 20), timeout=120)
    done = json.loads(r.stdout)

    def job_of(t):
        mine = [j for j in done if t.t0 <= j["submitted"] <= t.t1]
        if len(mine) != 1 or mine[0]["state"] != "done":
            raise RuntimeError(f"expected one job done submitted within a run: {mine}")
        return mine[0]
    out = {}
    for tag, runs in (("submit", res[0::2]), ("shell", res[1::2]), ("tty", tty)):
        first, ended, wall, hosts, seen = [], [], [], [], []
        for t in runs:
            j = job_of(t)
            line = first_float(job_files(dq, j["id"])[3])
            if line is None:
                raise RuntimeError(f"{j['id']} wrote no time to its log")
            if tag == "shell":
                try:
                    printed = float(t.out.split()[0])
                except (ValueError, IndexError):
                    raise RuntimeError(f"dq-shell printed no job output: {t.out!r} "
                                       f"{t.err!r}") from None
                if abs(printed - line) > 1e-6:
                    raise RuntimeError(f"dq-shell printed {printed}, the log says {line}")
            first.append(line - t.t0)
            ended.append(j["ended"] - t.t0)
            wall.append(t.t1 - t.t0)
            hosts.append(j["host"])
            if tag == "tty":
                seen.append(t.seen - t.t0)
        out[tag] = {"first": first, "ended": ended, "wall": wall, "hosts": hosts, "seen": seen}
    sh, sw, tt = out["shell"], out["submit"], out["tty"]
    s1, w1 = median(sh["first"][1:]), median(sh["wall"][1:])
    b1, bw = median(sw["first"][1:]), median(sw["wall"][1:])
    a1 = median(tt["seen"][1:])
    return [
        Row(17, "dq-shell --now with a free GPU: the command's start to the job's first "
                "output line in its log (median)", "< 1.5 s", fmt_s(s1), check(s1 < 1.5),
            f"{n} runs after a cold one ({fmt_s(sh['first'][0])}), 4 free nodes, as {ALICE} on "
            f"node1, 'dq-shell --now date +%s.%N' (the job's first line is its time); "
            f"dq-submit of a script of the same line: {fmt_s(b1)} (cold "
            f"{fmt_s(sw['first'][0])}); hosts {' '.join(sorted(set(sh['hosts'] + sw['hosts'])))}"),
        Row(17, "dq-shell --now on a terminal, a free GPU: the command's start to the job's "
                "output on the terminal, attached (median)", "< 1.5 s", fmt_s(a1),
            check(a1 < 1.5),
            f"{n} runs after a cold one ({fmt_s(tt['seen'][0])}); 'dq-shell --now sh -c "
            f"\"{job_cmd}\"' on a pty (24 x 80, TERM=xterm): dq-shell says it runs, attaches "
            f"(ssh -t HOST screen -r) and screen draws the window; the job had started (its "
            f"log's first line) median {fmt_s(median(tt['first'][1:]))} after the command; "
            f"each {', '.join(fmt_s(x) for x in tt['seen'][1:])}; dq-shell returned when the "
            f"job ended, median {fmt_s(median(tt['wall'][1:]))} after its start"),
        Row(17, "dq-shell --now of a one-line command, to its return (job ended) / dq-submit "
                "+ dq-wait of the same (median)", "<= 1.2x",
            f"{w1 / bw:.2f}x ({fmt_s(w1)} / {fmt_s(bw)})", check(w1 <= 1.2 * bw),
            f"stdin not a terminal, so dq-shell prints the job's output (checked: the time in "
            f"its log) instead of attaching; the job's end.json came median "
            f"{fmt_s(median(sh['ended'][1:]))} / {fmt_s(median(sw['ended'][1:]))} after the "
            f"command's start; each dq-shell {', '.join(fmt_s(x) for x in sh['wall'][1:])}; "
            f"each dq-submit + dq-wait {', '.join(fmt_s(x) for x in sw['wall'][1:])}"),
    ]



# 18: dq-report and the wall page's history (issue 21) #######################

def b18_histories(dq, njobs, users, now, days=30):
    """njobs ended jobs of `users` over the last `days` days, written as the
    users' history files (with dq's own writer, owned by each user, as their
    wrappers leave them): a lab's mix of sizes, end states, shared GPUs and
    sampled GPU use; and each user's day summary where their history is
    past DAYS_TAIL, made by dq's own builder, as append_history would have.
    Returns the records."""
    import random
    mod = dq_module()
    rnd = random.Random(18)
    per = {u: [] for u in users}
    states = ["done"] * 14 + ["failed"] * 3 + ["killed", "timeout", "lost"]
    for i in range(njobs):
        user = users[i % len(users)]
        ended = now - rnd.uniform(60, days * 86400 - 3600)     # not at the edges
        runtime = rnd.choice((60, 600, 3600, 4 * 3600, 12 * 3600)) * rnd.uniform(0.5, 1.5)
        started = ended - runtime
        gpus = rnd.choice((1, 1, 1, 2, 4, 8))
        rec = {"format": 1, "id": f"{i + 1}-{user}", "state": rnd.choice(states),
               "host": f"node{rnd.randint(1, 40)}", "gpus": gpus,
               "share": rnd.choice((1, 1, 1, 0.25)) if gpus == 1 else 1,
               "gpu_type": rnd.choice(MODELS)[0],
               "submitted": started - rnd.expovariate(1 / 300), "started": started,
               "ended": ended, "logged": ended + rnd.uniform(0, 2),
               "util_mean": round(rnd.uniform(0, 100), 1), "util_peak": rnd.randint(0, 100),
               "mem_mean_mib": rnd.randint(0, 80000), "mem_peak_mib": rnd.randint(0, 80000),
               "idle_gpu_s": round(rnd.uniform(0, 0.3) * runtime * gpus, 1)}
        if not mod.history_ok(rec):
            raise RuntimeError(f"the benchmark wrote a history line dq would skip: {rec}")
        per[user].append(rec)
    cfg = type("Cfg", (), {"p": lambda self, *parts: os.path.join(dq.root, *parts)})()
    os.makedirs(os.path.join(dq.root, "jobs", "done"), exist_ok=True)
    for user, records in per.items():
        mod.write_history(cfg, user, records)
        pw = pwd.getpwnam(user)
        os.chown(mod.history_path(cfg, user), pw.pw_uid, pw.pw_gid)
        # and the day summary the owner's append_history would have made
        if os.path.getsize(mod.history_path(cfg, user)) > mod.DAYS_TAIL:
            mod.write_days(cfg, user)
            os.chown(mod.days_path(cfg, user), pw.pw_uid, pw.pw_gid)
    return [r for rs in per.values() for r in rs]


def bench_report(ctx):
    """Issue 21: dq-report --since 30d and dq-web's /api/history read the
    users' histories: with 100,000 ended jobs of 50 users, and against 1,000."""
    import urllib.request
    c = ctx.cluster(4)
    big, small, n = ctx.size["b18_jobs"], ctx.size["b18_small"], ctx.size["b18_n"]
    users = b9_users(50)
    ensure_users(users)
    now = time.time()
    report = {}
    for size in (small, big):
        dq = new_install(c, f"b18-{size}", hosts=["node1"])
        b18_histories(dq, size, users, now)
        argv = [dq.path("report"), "--since", "30d", "--json"]
        ts = times(c, "node1", ALICE, argv, n + 1, keep=1 << 20)
        rows = json.loads(ts[-1].out)
        if sum(r["jobs"] for r in rows) != size or len(rows) != len(users):
            raise RuntimeError(f"dq-report --since 30d counted {sum(r['jobs'] for r in rows)} "
                               f"jobs of {len(rows)} users, not {size} of {len(users)}")
        report[size] = (median([t.wall for t in ts[1:]]), dq)
    dq = report[big][1]
    made, cached = [], []
    for i in range(n):      # a fresh dq-web each time (its own port): its first answer is made
        port = 18000 + (os.getpid() + i) % 1000
        url = f"http://127.0.0.1:{port}/"

        def fetch(path):
            t = time.monotonic()
            with urllib.request.urlopen(url + path, timeout=60) as r:
                body = r.read()
            return time.monotonic() - t, body
        proc = dq.popen("node1", ALICE, "web", "--port", port)
        try:
            wait_for(lambda: _web_up(lambda: fetch("style.css")), 20, what="dq-web to answer")
            took, body = fetch("api/history")
            h = json.loads(body)
            if h["made"] != 1 or sum(r["jobs"] for r in h["week"]) == 0:
                raise RuntimeError(f"/api/history: made {h['made']}, {len(h['week'])} rows")
            made.append(took)
            cached.append(fetch("api/history")[0])
        finally:
            os.killpg(proc.pid, signal.SIGTERM)     # dq-web too, not only nsenter
            proc.wait(10)
    t_big, t_small = report[big][0], report[small][0]
    return [Row(18, f"dq-report --since 30d, {big:,} ended jobs of 50 users (median)", "< 0.5 s",
                fmt_s(t_big), check(t_big < 0.5),
                f"as dqalice on node1, {n} runs after a first; the histories written as dq "
                f"writes them, 30 days of jobs of 1 min to 18 h on 1-8 GPUs"),
            Row(18, f"dq-report --since 30d, {big:,} / {small:,} ended jobs", "<= 1.5x",
                f"{t_big / t_small:.2f}x ({fmt_s(t_big)} / {fmt_s(t_small)})",
                check(t_big <= 1.5 * t_small),
                "the command's whole run (Python's start, ~0.1 s, included)"),
            Row(18, f"dq-web /api/history, {big:,} ended jobs (median, made)", "< 0.3 s",
                fmt_s(median(made)), check(median(made) < 0.3),
                f"the first answer of a fresh dq-web ({n} runs): the two charts and the "
                f"week's table from the histories; the next answers come from its "
                f"once-a-minute copy: median {fmt_s(median(cached))}")]



# 19: dq on Slurm (issue 22) ###################################################

def bench_slurm(ctx):
    """Issue 22: dq-submit against a bare sbatch --wrap, and dq-jobs against
    squeue with many queued jobs, on a real Slurm (tests/slurmcluster.py:
    slurmctld plus a slurmd in each node).  Slurm's partition is set down,
    so that every job stays queued and only the commands are timed."""
    from slurmcluster import SlurmCluster, slurm_unavailable_reason
    reason = slurm_unavailable_reason()
    if reason:
        raise RuntimeError(f"no Slurm to measure: {reason}")
    c = ctx.cluster(4)
    n, queue = ctx.size["b19_n"], ctx.size["b19_queue"]
    slurm = SlurmCluster(c).start()
    try:
        dq = new_install(c, "b19-slurm", backend="slurm", slurm_conf=slurm.conf)
        r = slurm.root_run(["scontrol", "update", f"partitionname={slurm.partition}",
                            "state=down"])
        if r.returncode != 0:
            raise RuntimeError(f"cannot set the partition down: {r.stderr}")
        _, path = write_script(c, ALICE, "b19.sh", "true\n", subdir="b19")
        env = {"SLURM_CONF": slurm.conf}
        subs = times(c, "node1", ALICE, [dq.path("submit"), path], n + 1,
                     cwd=os.path.dirname(path))
        bare = times(c, "node1", ALICE, ["sbatch", "--parsable", "--gres=gpu:1",
                                         "--wrap", path], n + 1, env=env,
                     cwd=os.path.dirname(path))
        t_dq, t_bare = median([t.wall for t in subs[1:]]), median([t.wall for t in bare[1:]])
        # a deep queue: one sweep (a job array) of `queue` jobs
        r = times(c, "node1", ALICE, [dq.path("submit"), "--grid",
                                      "DQ_I=" + ",".join(map(str, range(queue))), path], 1,
                  cwd=os.path.dirname(path), timeout=600)
        jobs_t = times(c, "node1", ALICE, [dq.path("jobs"), "queue", "-a"], n + 1,
                       keep=1 << 22)
        squeue_t = times(c, "node1", ALICE, ["squeue", "-a"], n + 1, env=env, keep=1 << 22)
        listed = sum(1 for ln in jobs_t[-1].out.splitlines() if re.match(r"^[0-9]+-", ln))
        if listed < queue:
            raise RuntimeError(f"dq-jobs queue listed {listed} jobs, not {queue}+")
        t_jobs, t_squeue = median([t.wall for t in jobs_t[1:]]), \
            median([t.wall for t in squeue_t[1:]])
    finally:
        slurm.stop()
    return [Row(19, "dq-submit on Slurm / bare sbatch --wrap (median)", "<= 1.2x",
                f"{t_dq / t_bare:.2f}x ({fmt_s(t_dq)} / {fmt_s(t_bare)})",
                check(t_dq <= 1.2 * t_bare),
                f"as dqalice on node1, {n} of each after a first; dq-submit writes the job "
                f"and runs sbatch (through /bin/sh); Python's start is most of the "
                f"difference"),
            Row(19, f"dq-jobs queue -a / squeue -a, {queue:,} queued jobs (median)", "report",
                f"{t_jobs / t_squeue:.2f}x ({fmt_s(t_jobs)} / {fmt_s(t_squeue)})", "INFO",
                f"one sweep of {queue:,} jobs (a job array) queued in a down partition; "
                f"dq-jobs reads each job's files and asks squeue once for the reasons")]


CASES = {1: ("idle GPUs", bench_idle), 7: ("lock hold times", bench_lock),
         2: ("placement latency", bench_place), 3: ("submit cost", bench_submit),
         4: ("history vs views", bench_history), 6: ("big logs", bench_logs),
         5: ("wide clusters", bench_wide), 8: ("constrained queue", bench_constrained),
         9: ("deep queue of many users", bench_deep), 10: ("sweep submit", bench_sweep),
         11: ("dq-web viewers", bench_web), 12: ("GPU sharing: packing", bench_pack),
         13: ("deep queue with sharing jobs", bench_deep_shared),
         14: ("GPU sampling cost", bench_sampling), 15: ("snapshot submit", bench_snapshot),
         16: ("dq-kill --grace", bench_grace), 17: ("dq-shell --now", bench_shell),
         18: ("dq-report and /api/history", bench_report), 19: ("dq on Slurm", bench_slurm)}
# 7 reads what 1 measured; 5 needs its own cluster
ORDER = [1, 7, 2, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 5]
