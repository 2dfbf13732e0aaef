"""A busy, healthy cluster never loses, kills or doubles a job (issue 10).

Three users submit a few hundred short mixed jobs (1 GPU, 2 GPUs, CPU
only, and sharing ones with DQ_MEM; 0.2-3 s) from parallel shells, while
GPU processes are started and stopped by hand beside dq and a few jobs are
dq-killed; every host stays up.  Then, as a user would check: every job
ended as it should (done, or killed when it was killed), none ran twice,
no exclusive job ever shared its GPU, no GPU was ever booked over (the
sharing jobs' bookings summed per GPU, at every start, fit its memory less
share_margin, at most max_jobs_per_gpu of them), and no exclusive job
started on a GPU a hand-started process had been holding.

DQ_SOAK_RUNS=N repeats it N times (each on a fresh install), DQ_SOAK_JOBS
sets the jobs per run (default 150); the suite runs it once.
"""
import math
import os
import random
import re
import threading
import time

import pytest

from dqtest import ALICE, BOB, DAN, MODELS, configure, job, jobs, log_of, script, \
    wait_until


def job_state(dq, job_id):
    j = job(dq, job_id)
    return j and j["state"]

RUNS = int(os.environ.get("DQ_SOAK_RUNS", "1"))
JOBS = int(os.environ.get("DQ_SOAK_JOBS", "150"))
USERS = (ALICE, BOB, DAN)
HOLD_EVERY = 1.5        # seconds between hand-started GPU processes
# A job may start on a GPU whose hand-started process began after the poll
# that placed it; one that began this long before the start was missable.
POLL_SLACK = 2.0

# Each run of a job appends a line to its own file (so a job run twice
# shows two), and start/end lines with its GPUs and booking (DQ_MEM in MiB,
# '-': exclusive) to the user's trace.
JOB = r'''
echo "$(hostname) $CUDA_VISIBLE_DEVICES" >> "$DQ_RUNS/$DQ_JOB_ID"
echo "start $DQ_JOB_ID $(hostname) ${CUDA_VISIBLE_DEVICES:--} $(date +%s.%N) ${DQ_MEM:--}" >> "$DQ_TRACE"
trap 'echo "end $DQ_JOB_ID $(hostname) ${CUDA_VISIBLE_DEVICES:--} $(date +%s.%N) ${DQ_MEM:--}" >> "$DQ_TRACE"; exit 143' TERM
if [ "$DQ_GPUS" = 0 ]; then sleep "$DQ_T"; else fake-cuda --hold "$DQ_T" --mem "${DQ_USE:-500}" >/dev/null; fi
echo "end $DQ_JOB_ID $(hostname) ${CUDA_VISIBLE_DEVICES:--} $(date +%s.%N) ${DQ_MEM:--}" >> "$DQ_TRACE"
'''
TOTAL = {f"node{i}": mib for i, (_, mib) in enumerate(MODELS, 1)}    # memory.total
MAX_JOBS_PER_GPU = 8
SHARE_MARGIN = 0.02


def job_mix(rng, n):
    """n (gpus, seconds, booking MiB or None) triples: mostly 1-GPU jobs,
    some 2-GPU and CPU-only, and a share of sharing jobs (DQ_MEM)."""
    out = []
    for _ in range(n):
        gpus = rng.choices([1, 2, 0, "share"], weights=[5, 2, 2, 4])[0]
        mem = rng.choice([1024, 2048, 4096, 8192]) if gpus == "share" else None
        out.append((1 if mem else gpus, round(rng.uniform(0.2, 3.0), 1), mem))
    return out


def submit_loop(dq, host, user, path, mix, trace, runs, faults=False):
    """One user's shell: a loop of dq-submit, as typed into a terminal.
    faults: a submit refused (the data root full) is tried again."""
    # A short pause now and then: submits (each a pass) go on while jobs run
    again = "until {}; do sleep 0.5; done" if faults else "{}"
    lines = [again.format(f"DQ_GPUS={g} DQ_T={t} " +
                          (f"DQ_MEM={mem} DQ_USE={mem - 300} " if mem else "") +
                          f"{dq.path('submit')} {path}")
             + (" && sleep 0.3" if i % 4 == 3 else "")
             for i, (g, t, mem) in enumerate(mix)]
    r = dq.cluster.run(host, user, "\n".join(lines), cwd=os.path.dirname(path),
                       env={"DQ_TRACE": trace, "DQ_RUNS": runs}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = re.findall(r"^Job ID: '([0-9]+-[a-z]+)'$", r.stdout, re.M)
    assert len(ids) == len(mix), r.stdout[-2000:] + r.stderr[-2000:]
    return ids


def read_trace(path, killed):
    """{job_id: [host, [gpus], start, end, booking MiB or None]}; end None
    if it never wrote one.
    A job killed as it wrote a line may have lost a field of it (the kill
    hit the `date` or `hostname` it ran): such a job is left out."""
    out, torn = {}, set()
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) != 6:
                assert fields[1] in killed, f"a torn line of a job not killed: {line!r}"
                torn.add(fields[1])
                continue
            kind, job_id, host, gpus, t, mem = fields
            if kind == "start":
                out[job_id] = [host, [] if gpus == "-" else gpus.split(","), float(t), None,
                               None if mem == "-" else int(mem)]
            else:
                out[job_id][3] = float(t)
    for job_id in torn:
        out.pop(job_id, None)
    return out


@pytest.mark.parametrize("run", range(RUNS))
def test_busy_cluster_loses_kills_and_doubles_nothing(cluster, dq, run):
    soak(cluster, dq, run)


# The fault soak (issue 17): node2's sshd frozen past lost_after, and the
# data root full for a few seconds, while the lab is busy.
FAULT_CONF = dict(poll_interval=0.5, timeout=3, lost_after=8, kill_grace=1)


@pytest.mark.parametrize("run", range(RUNS))
def test_busy_cluster_with_a_hung_host_and_a_full_disk_runs_each_job_once(cluster, small_dq,
                                                                          run):
    soak(cluster, small_dq, run, faults=True)


def soak(cluster, dq, run, faults=False):
    rng = random.Random(run)
    # Loops that poll often: more passes deciding beside each other
    configure(dq, cluster.hosts, **(FAULT_CONF if faults else dict(poll_interval=0.5)))
    per_user = JOBS // len(USERS)
    files = {}
    for user in USERS:
        # A directory of this run's own: job numbers start again at 1
        d, path = script(cluster, user, "soak.sh", JOB, subdir=os.path.basename(dq.root))
        runs = os.path.join(d, "runs")
        os.makedirs(runs, exist_ok=True)
        os.chown(runs, *[getattr(os.stat(d), k) for k in ("st_uid", "st_gid")])
        files[user] = (path, os.path.join(d, "trace"), runs)

    stop = threading.Event()
    holds, errors = [], []

    def hand_started():
        """Someone starting GPU processes by hand every HOLD_EVERY s."""
        while not stop.wait(HOLD_EVERY):
            host, gpu, seconds = rng.choice(cluster.hosts), rng.randrange(4), rng.uniform(1, 3)
            t0 = time.time()
            try:
                cluster.hold_gpu(host, BOB, gpu, seconds=seconds)
            except Exception as e:       # reported after the run
                errors.append(e)
                continue
            holds.append((host, gpu, t0, t0 + seconds))

    submitted, killed = {}, set()

    def shell(user, host):
        path, trace, runs = files[user]
        submitted[user] = submit_loop(dq, host, user, path, job_mix(rng, per_user), trace, runs,
                                      faults)

    def killer():
        """A few dq-kills, of running and of queued jobs."""
        for _ in range(6):
            if stop.wait(4):
                return
            user = rng.choice(USERS)
            mine = [j for j in jobs(dq, user=user) if j["user"] == user]
            queued = [j for j in jobs(dq, user=user, view="queue") if j["user"] == user]
            pick = [j for j in (mine[:1] + queued[-1:])]
            for j in pick:
                r = dq.run(cluster.hosts[0], user, "kill", j["id"])
                if r.returncode == 0:
                    killed.add(j["id"])
                elif faults and job_state(dq, j["id"]) == "killed":
                    # recorded, but its host did not answer (its wrapper
                    # stops it), or tidying after it found the disk full
                    killed.add(j["id"])
                elif faults and "is full" in r.stderr:
                    pass        # refused before anything changed
                else:
                    assert "is not active" in r.stderr, r.stderr

    fault_log = []

    def faulty():
        """node2's sshd hangs past lost_after; later the data root fills up."""
        if stop.wait(8):
            return
        cluster.stop_sshd("node2")
        fault_log.append(("sshd stopped", time.time()))
        stop.wait(FAULT_CONF["lost_after"] * 1.5)
        cluster.cont_sshd("node2")
        fault_log.append(("sshd back", time.time()))
        if stop.wait(6):
            return
        cluster.fill_small()
        fault_log.append(("full", time.time()))
        stop.wait(4)
        cluster.free_small()
        fault_log.append(("room", time.time()))

    threads = [threading.Thread(target=hand_started), threading.Thread(target=killer)]
    if faults:
        threads.append(threading.Thread(target=faulty))
    shells = [threading.Thread(target=shell, args=(u, cluster.hosts[i % len(cluster.hosts)]))
              for i, u in enumerate(USERS)]
    for t in threads + shells:
        t.start()
    for t in shells:
        t.join()
    try:
        assert set(submitted) == set(USERS), "a submitting shell failed (see above)"
        all_ids = [i for ids in submitted.values() for i in ids]
        wait_until(lambda: not jobs(dq), timeout=60 + JOBS, interval=1,
                   what="every job to end")
    finally:
        stop.set()
        for t in threads:
            t.join()
        if faults:
            cluster.cont_sshd("node2")
            cluster.free_small()
    assert not errors, errors
    if faults:
        assert [what for what, _ in fault_log] == ["sshd stopped", "sshd back", "full",
                                                   "room"], fault_log

    ended = {j["id"]: j for j in jobs(dq, view="complete")}
    assert sorted(ended) == sorted(all_ids)
    wrong = {i: (j["state"], j["reason"], j["host"], j["started"], j["ended"],
                 log_of(dq, i)[-600:]) for i, j in ended.items()
             if j["state"] != ("killed" if i in killed else "done")}
    assert not wrong, f"jobs that ended wrongly: {wrong}; faults {fault_log}"

    traces = {}
    for user in USERS:
        path, trace, runs = files[user]
        traces.update(read_trace(trace, killed))
        for job_id in submitted[user]:
            try:
                with open(os.path.join(runs, job_id)) as f:
                    times_run = len(f.read().splitlines())
            except FileNotFoundError:
                times_run = 0
            j = ended[job_id]
            expected = (0, 1) if job_id in killed else (1,)
            assert times_run in expected, f"{job_id} ran {times_run} times: {j}"
    for job_id, (host, gpus, start, end, mem) in traces.items():
        j = ended[job_id]
        assert (host, [int(g) for g in gpus]) == (j["host"], j["gpus"]), job_id
        assert end is not None, f"{job_id} left no end line: {j}"
        assert mem == j["mem_mib"], (job_id, mem, j["mem_mib"])

    spans = sorted((h, g, s, e, i, mem) for i, (h, gs, s, e, mem) in traces.items()
                   for g in gs)
    for b in spans:     # at each start, what else held that GPU
        on = [a for a in spans if a[:2] == b[:2] and a[2] <= b[2] < a[3]]
        said = "; ".join(f"{a[4]} {'(dq-killed) ' if a[4] in killed else ''}"
                         f"{'booked ' + str(a[5]) if a[5] else 'exclusive'} "
                         f"{a[2]:.3f}-{a[3]:.3f}" for a in on)
        where = f"{b[0]} GPU {b[1]} at {b[2]:.3f}: {said}; faults {fault_log}"
        if len(on) > 1:
            assert all(a[5] for a in on), f"an exclusive job shared {where}"
            room = TOTAL[b[0]] - math.ceil(SHARE_MARGIN * TOTAL[b[0]])
            assert sum(a[5] for a in on) <= room, f"over-booked ({room} MiB) {where}"
            assert len(on) <= MAX_JOBS_PER_GPU, f"too many jobs on {where}"
    for host, gpu, t0, t1 in holds:
        for h, g, s, e, i, mem in spans:
            if (h, g) == (host, str(gpu)) and not mem and t0 + POLL_SLACK < s < t1 - 0.5:
                raise AssertionError(f"{i} started on {h} GPU {g} at {s:.2f}, "
                                     f"held by hand since {t0:.2f}")
