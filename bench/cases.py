"""The benchmarks of dq's performance targets (see bench/run).

Each bench_N(ctx) returns [Row].  Times of dq commands are taken inside the
node, as the test user (lib.run_timed), so nsenter/setpriv are not counted.
"""
import json
import os
import pwd
import sys
import threading
import time

from lib import (ALICE, BOB, PY, Row, check, ensure_users, failed, fmt_s, hold_all, job_files,
                 job_id_of, median, new_install, next_id, percentile, read_json, release,
                 run_timed, synth_jobs, times, wait_for, write_conf, write_script)
from dqtest import MODELS

SIZES = {
    "full": dict(b1_nodes=4, b1_jobs=200, b2_n=10, b3_n=20, b3_queue=10000, b3_per=25,
                 b4_small=100, b4_big=100000, b4_n=15, b5_nodes=32, b5_n=10,
                 b6_bytes=2 << 30, b6_n=3, b8_queue=10000, b8_n=7,
                 b9_queue=10000, b9_users=50, b9_passes=7, b9_n=10,
                 b10_jobs=1000, b10_n=5, b11_viewers=50, b11_seconds=15),
    "smoke": dict(b1_nodes=2, b1_jobs=16, b2_n=3, b3_n=4, b3_queue=1000, b3_per=3,
                  b4_small=100, b4_big=2000, b4_n=3, b5_nodes=8, b5_n=2,
                  b6_bytes=64 << 20, b6_n=1, b8_queue=1000, b8_n=2,
                  b9_queue=1000, b9_users=50, b9_passes=2, b9_n=2,
                  b10_jobs=100, b10_n=1, b11_viewers=5, b11_seconds=3),
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
    r = dq.run("node1", ALICE, "jobs", "complete", "--json", "-a", timeout=120)
    done = {j["id"]: j for j in json.loads(r.stdout)}
    bad = [i for i in ids if done.get(i, {}).get("state") != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not end 'done', e.g. {done.get(bad[0])}")
    jobs = [done[i] for i in ids]
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


CASES = {1: ("idle GPUs", bench_idle), 7: ("lock hold times", bench_lock),
         2: ("placement latency", bench_place), 3: ("submit cost", bench_submit),
         4: ("history vs views", bench_history), 6: ("big logs", bench_logs),
         5: ("wide clusters", bench_wide), 8: ("constrained queue", bench_constrained),
         9: ("deep queue of many users", bench_deep), 10: ("sweep submit", bench_sweep),
         11: ("dq-web viewers", bench_web)}
ORDER = [1, 7, 2, 3, 4, 6, 8, 9, 10, 11, 5]   # 7 reads what 1 measured; 5 needs its own cluster
