"""Scheduling end to end: queueing on a full cluster, never two jobs on one
GPU, GPUs held by hand-started processes, many submitters at once."""
import json
import os
import threading

from dqtest import ALICE, BOB, configure, job, jobs, log_of, script, submit, wait_state

# Each job appends "start host gpu time" and "end ..." lines to a shared
# file, and opens its GPU only after a delay, like a job loading data first.
LATE_OPENER = r'''
echo "start $DQ_JOB_ID $(hostname) $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$DQ_TRACE"
fake-cuda --delay 1 --hold 3
echo "end $DQ_JOB_ID $(hostname) $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$DQ_TRACE"
'''


def intervals(trace):
    starts, spans = {}, []
    with open(trace) as f:
        for line in f:
            kind, job_id, host, gpu, t = line.split()
            if kind == "start":
                starts[job_id] = (host, gpu, float(t))
            else:
                h, g, t0 = starts[job_id]
                spans.append((h, g, t0, float(t), job_id))
    return spans


def test_full_cluster_queues_and_never_shares_a_gpu(cluster, dq):
    configure(dq, ["node1", "node2"])
    cluster.set_gpus("node1", 2)
    cluster.set_gpus("node2", 1)
    d, path = script(cluster, ALICE, "late.sh", LATE_OPENER)
    trace = os.path.join(d, "trace")
    ids, started_at_once, said = [], 0, []
    for i in range(7):
        job_id, r = submit(dq, "node1", ALICE, path, env={"DQ_TRACE": trace})
        ids.append(job_id)
        started_at_once += "Executing" in r.stdout
        said.append(r.stdout + r.stderr)
    # three GPUs in all: the rest waited, oldest first (a slow machine may
    # have finished a job or two during the submits)
    assert 3 <= started_at_once < 7, said
    q = [j["id"] for j in jobs(dq, view="queue")]
    assert q and q == ids[len(ids) - len(q):]
    r = dq.run("node2", ALICE, "jobs", "queue")
    assert r.stdout.startswith("Jobs in queue: ") and "Wait" in r.stdout
    for job_id in ids:
        wait_state(dq, job_id, "done", timeout=60)
    spans = intervals(trace)
    assert sorted(s[4] for s in spans) == sorted(ids)
    for a in spans:
        assert (a[0], a[1]) in {("node1", "0"), ("node1", "1"), ("node2", "0")}
        for b in spans:
            if a is not b and (a[0], a[1]) == (b[0], b[1]):
                assert a[3] <= b[2] or b[3] <= a[2], f"{a} overlaps {b}"


def test_gpu_held_by_hand_started_process_is_never_given_out(cluster, dq):
    configure(dq, ["node1"], poll_interval=0.5)
    cluster.set_gpus("node1", 2)
    holder = cluster.hold_gpu("node1", BOB, 0)
    r = dq.run("node1", ALICE, "free")
    # GPU 0 is not free; sharing jobs (DQ_MEM) could still use what bob leaves
    assert r.stdout.strip() == "node1: 1; shared: 0 (77.4G free)"
    _, path = script(cluster, ALICE, "hold.sh", "exec fake-cuda --hold 3\n")
    first, r = submit(dq, "node1", ALICE, path)
    assert f"Executing '{first}' on node1/1 " in r.stdout
    second, r = submit(dq, "node1", ALICE, path)
    assert "Executing" not in r.stdout
    assert dq.run("node1", ALICE, "free").stdout == "node1: shared: 0 (77.4G free)\n"
    j = wait_state(dq, first, "done", timeout=30)
    # GPU 1 is free again, so the queued job gets it, never GPU 0
    j = wait_state(dq, second, ("running", "done"), timeout=30)
    assert j["gpus"] == [1]
    # the hand-started process goes away: its GPU is free for dq again
    cluster.run("node1", "root", ["kill", str(holder)])
    third, r = submit(dq, "node1", ALICE, path)
    assert wait_state(dq, third, ("running", "done"), timeout=10)["gpus"] == [0]


def test_waiting_job_starts_when_a_hand_started_process_exits(cluster, dq):
    """No dq job ends here: only dq-schedule's polling can notice."""
    configure(dq, ["node1"], poll_interval=0.5)
    cluster.set_gpus("node1", 1)
    holder = cluster.hold_gpu("node1", BOB, 0)
    _, path = script(cluster, ALICE, "quick.sh", "echo ran on $CUDA_VISIBLE_DEVICES\n")
    job_id, r = submit(dq, "node1", ALICE, path)
    assert "Executing" not in r.stdout
    assert job(dq, job_id)["state"] == "queued"
    cluster.run("node1", "root", ["kill", str(holder)])
    wait_state(dq, job_id, "done", timeout=20)
    assert log_of(dq, job_id) == "ran on 0\n"


def test_other_users_queued_job_starts_within_seconds(cluster, dq):
    """Alice's job ends; Bob's job, placed by Alice's pass, is started by Bob's
    own dq-schedule loop, as Bob."""
    configure(dq, ["node1"], poll_interval=30)     # only the wake-up can be fast
    cluster.set_gpus("node1", 1)
    _, pa = script(cluster, ALICE, "a.sh", "sleep 2\n")
    _, pb = script(cluster, BOB, "b.sh", "id -un; date +%s.%N\n")
    a, _ = submit(dq, "node1", ALICE, pa)
    b, r = submit(dq, "node2", BOB, pb)
    assert "Executing" not in r.stdout
    ja = wait_state(dq, a, "done", timeout=30)
    jb = wait_state(dq, b, "done", timeout=30, user=BOB)
    assert log_of(dq, b).splitlines()[0] == BOB
    assert jb["started"] - ja["ended"] < 3, (jb["started"], ja["ended"])


def test_concurrent_submits_get_distinct_ids_and_none_is_lost(cluster, dq):
    configure(dq, ["node1"])
    cluster.set_gpus("node1", 1)
    cluster.hold_gpu("node1", BOB, 0)          # everything stays queued
    _, pa = script(cluster, ALICE, "q.sh", "true\n")
    _, pb = script(cluster, BOB, "q.sh", "true\n")
    results = []

    def many(host, user, path, n):
        for _ in range(n):
            results.append(dq.run(host, user, "submit", path, cwd=os.path.dirname(path)))
    threads = [threading.Thread(target=many, args=a) for a in
               [("node1", ALICE, pa, 6), ("node2", ALICE, pa, 6),
                ("node3", BOB, pb, 6), ("node4", BOB, pb, 6)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    ids = [r.stdout.split("'")[1] for r in results]
    assert len(set(ids)) == 24
    nums = sorted(int(i.split("-")[0]) for i in ids)
    assert len(set(nums)) == 24             # numbers are cluster-wide, not per user
    queued = {j["id"] for j in jobs(dq, view="queue")}
    assert queued == set(ids)


def test_free_and_failing_nvidia_smi(cluster, dq):
    configure(dq, ["node1", "node2", "node3", "node4"], timeout=4)
    cluster.set_gpus("node1", 4)
    cluster.hold_gpu("node1", BOB, 2)
    cluster.set_smi_mode("node2", "fail")
    cluster.set_smi_mode("node3", "hang")
    cluster.set_smi_mode("node4", "na")
    r = dq.run("node1", ALICE, "free", timeout=30)
    assert r.returncode == 0
    assert r.stdout == "node1: 3 1 0; shared: 2 (77.4G free)\n"
    assert "node2: nvidia-smi failed" in r.stderr
    assert "node3: " in r.stderr and "timed out" in r.stderr
    data = json.loads(dq.run("node1", ALICE, "free", "--json", timeout=30).stdout)
    assert [(h["host"], h["free"]) for h in data] == \
        [("node1", [3, 1, 0]), ("node2", []), ("node3", []), ("node4", [])]
    # each free GPU's type and memory, as nvidia-smi on the host says them
    smi = cluster.run("node1", ALICE, "nvidia-smi --query-gpu=index,name,memory.total "
                      "--format=csv,noheader,nounits", check=True).stdout
    gpus = {int(i): (n.strip(), int(m)) for i, n, m in (ln.split(",") for ln in
                                                         smi.splitlines())}
    # (free_mem_mib: what one sharing job may book, all but share_margin's 2%)
    assert data[0]["free_gpus"] == [{"index": i, "name": gpus[i][0],
                                     "memory_total_mib": gpus[i][1],
                                     "free_mem_mib": gpus[i][1] - (gpus[i][1] * 2 + 99) // 100}
                                    for i in (3, 1, 0)]
    assert [(g["index"], g["free_mem_mib"], g["jobs"]) for g in data[0]["shared_gpus"]] == \
        [(2, gpus[2][1] - (gpus[2][1] * 2 + 99) // 100 - 1000, 0)]      # bob's 1000 MiB
    # a job is never placed on a host whose GPUs dq cannot see
    _, path = script(cluster, ALICE, "x.sh", "sleep 5\n")
    for _ in range(4):
        job_id, r = submit(dq, "node1", ALICE, path)
    assert {j["host"] for j in jobs(dq) if j["state"] == "running"} == {"node1"}
