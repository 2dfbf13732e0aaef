"""GPU sharing by declared memory (issue 19): DQ_MEM jobs packed onto GPUs
by their bookings and the memory used by hand, exclusive jobs kept apart,
each job's GPU use sampled by its wrapper, a job over its booking flagged
or stopped while its neighbour runs on, CUDA out-of-memory named.

On the test cluster node1 has four A100 80GB (81920 MiB: 80281 MiB may be
booked once share_margin keeps its 2%).  Most tests keep node1's GPUs 1-3
full by hand and ask for node1, so that every sharing job meets on GPU 0."""
import json
import os
import time
import types

import dq as dqmod
from dqtest import (ALICE, BOB, DAN, configure, job, jobs, log_of, planner_rules,
                    refused_at_submit, script, submit, wait_state, wait_until)

FAST = dict(poll_interval=0.5, sample_interval=1)
# A job that records where it ran, then holds its GPU with DQ_USE MiB
JOB = '''
echo "$DQ_JOB_ID $(hostname) $CUDA_VISIBLE_DEVICES" >> started
exec fake-cuda --mem "${DQ_USE:-500}" --util "${DQ_UTIL:-97}" --hold "${DQ_T:-60}"
'''


def only_gpu0_of_node1(cluster):
    """Fill node1's GPUs 1-3 by hand (no room to share either)."""
    for g in (1, 2, 3):
        cluster.hold_gpu("node1", BOB, g, memory_mb=81000)


def queue_reason(dq, job_id):
    return next(j["reason"] for j in jobs(dq, view="queue") if j["id"] == job_id)


def running_on(dq, ids):
    return {j["id"]: (j["host"], tuple(j["gpus"])) for j in jobs(dq) if j["id"] in ids
            and j["state"] == "running"}


def test_four_16g_jobs_share_one_80g_gpu_and_the_fifth_waits_for_memory(cluster, dq):
    configure(dq, cluster.hosts, **FAST)
    only_gpu0_of_node1(cluster)
    d, path = script(cluster, ALICE, "share.sh", JOB)
    env = {"DQ_MEM": "16G", "DQ_HOSTS": "node1", "DQ_USE": "15000"}
    ids = [submit(dq, "node1", ALICE, path, env=env)[0] for _ in range(5)]
    first = wait_until(lambda: (lambda r: r if len(r) == 4 else None)(running_on(dq, ids)),
                       timeout=30, what="four sharing jobs running")
    assert set(first.values()) == {("node1", (0,))}, first
    fifth = next(i for i in ids if i not in first)
    # 80281 - 4 x 16384 = 14745 MiB left: not enough for a fifth 16G booking
    assert queue_reason(dq, fifth) == "GPU memory: 14.4G free at most, needs 16G"
    # every one of them runs at once, on the same GPU
    procs = cluster.gpu_processes("node1")
    assert len([p for p in procs if p[0] == 0]) == 4, procs
    # dq-jobs shows the booking; the JSON has it in MiB
    listed = {j["id"]: j for j in jobs(dq)}
    assert all(listed[i]["mem_mib"] == 16384 for i in ids)
    r = dq.run("node1", ALICE, "jobs")
    assert "Mem" in r.stdout.splitlines()[1] and "/16G" in r.stdout, r.stdout
    # an exclusive job never joins them
    d2, excl = script(cluster, ALICE, "excl.sh", "fake-cuda --hold 60\n")
    solo, _ = submit(dq, "node1", ALICE, excl, env={"DQ_HOSTS": "node1"})
    time.sleep(2)
    # (the GPUs free elsewhere are on hosts DQ_HOSTS rules out)
    assert job(dq, solo)["state"] == "queued" and queue_reason(dq, solo) == "hosts"
    # one ends: the fifth takes its place on GPU 0, the exclusive job still waits
    assert dq.run("node1", ALICE, "kill", sorted(first)[0]).returncode == 0
    assert wait_state(dq, fifth, "running", timeout=20)["gpus"] == [0]
    assert job(dq, solo)["state"] == "queued"


def test_memory_used_by_hand_is_counted(cluster, dq):
    configure(dq, cluster.hosts, **FAST)
    only_gpu0_of_node1(cluster)
    cluster.hold_gpu("node1", BOB, 0, memory_mb=70 * 1024)
    d, path = script(cluster, ALICE, "share.sh", JOB)
    # 80281 - 71680 = 8601 MiB left: an 8G job fits, a 16G one does not
    big, r = submit(dq, "node1", ALICE, path, env={"DQ_MEM": "16G", "DQ_HOSTS": "node1"})
    assert "is queued" in r.stderr, r.stderr
    small, _ = submit(dq, "node1", ALICE, path, env={"DQ_MEM": "8G", "DQ_HOSTS": "node1"})
    assert wait_state(dq, small, "running", timeout=20)["gpus"] == [0]
    time.sleep(1)
    assert queue_reason(dq, big) == "GPU memory: 409M free at most, needs 16G"
    # dq-free: no GPU wholly free on node1, GPU 0 has 409M left for sharing jobs
    free = {h["host"]: h for h in json.loads(dq.run("node1", ALICE, "free",
                                                    "--json").stdout)}
    assert free["node1"]["free"] == []
    assert [(g["index"], g["free_mem_mib"], g["jobs"]) for g in free["node1"]["shared_gpus"]] \
        == [(0, 409, 1)]
    assert "node1: shared: 0 (409M free)" in dq.run("node1", ALICE, "free").stdout
    # dq-users: the sharing job on its GPU, with its booking, beside the hand process
    rows = json.loads(dq.run("node1", ALICE, "users", "--json").stdout)
    on0 = [r for r in rows if r["host"] == "node1" and r["gpu"] == 0]
    assert sorted((r["user"], r["job"], r["booked_mib"]) for r in on0) == \
        sorted([(BOB, None, None), (ALICE, small, 8192)]), on0
    assert "8G" in dq.run("node1", ALICE, "users").stdout


def test_share_foreign_no_keeps_sharing_jobs_off_gpus_used_by_hand(cluster, dq):
    configure(dq, cluster.hosts, share_foreign="no", **FAST)
    only_gpu0_of_node1(cluster)
    holder = cluster.hold_gpu("node1", BOB, 0, memory_mb=1000)
    d, path = script(cluster, ALICE, "share.sh", JOB)
    j, _ = submit(dq, "node1", ALICE, path, env={"DQ_MEM": "1G", "DQ_HOSTS": "node1"})
    time.sleep(2)
    assert queue_reason(dq, j) == "hosts"       # (free GPUs elsewhere only)
    cluster.run("node1", BOB, ["kill", str(holder)], check=True)
    assert wait_state(dq, j, "running", timeout=20)["gpus"] == [0]


def test_sharing_jobs_never_join_an_exclusive_job(cluster, dq):
    configure(dq, cluster.hosts, **FAST)
    only_gpu0_of_node1(cluster)
    d, path = script(cluster, ALICE, "share.sh", JOB)
    solo, _ = submit(dq, "node1", ALICE, path, env={"DQ_HOSTS": "node1"})
    wait_state(dq, solo, "running", timeout=20)
    small, _ = submit(dq, "node1", BOB, path, env={"DQ_MEM": "1G", "DQ_HOSTS": "node1"})
    time.sleep(2)
    assert job(dq, small)["state"] == "queued"
    assert queue_reason(dq, small) == "hosts"   # (free GPUs elsewhere only)
    dq.run("node1", ALICE, "kill", solo, check=True)
    assert wait_state(dq, small, "running", timeout=20, user=BOB)["gpus"] == [0]


def test_a_job_over_its_booking_is_flagged_and_its_neighbour_unharmed(cluster, dq):
    configure(dq, cluster.hosts, **FAST)
    only_gpu0_of_node1(cluster)
    d, path = script(cluster, ALICE, "share.sh", JOB)
    env = {"DQ_MEM": "8G", "DQ_HOSTS": "node1"}
    greedy, _ = submit(dq, "node1", ALICE, path, env=dict(env, DQ_USE="30720", DQ_UTIL="30"))
    good, _ = submit(dq, "node1", ALICE, path, env=dict(env, DQ_USE="4000", DQ_UTIL="20"))
    for i in (greedy, good):
        wait_state(dq, i, "running", timeout=20)
    # sampled by its wrapper every second: flagged in dq-jobs, --json and its log
    j = wait_until(lambda: (lambda j: j if (j["gpu_use"] or {}).get("over") else None)(
        job(dq, greedy)), timeout=15, what="the greedy job flagged")
    assert j["gpu_use"]["mem_mib"] == 30720 and j["gpu_use"]["booked_mib"] == 8192
    wait_until(lambda: (job(dq, good)["gpu_use"] or {}).get("mem_mib") == 4000, timeout=10,
               what="the good job's sample")
    # the GPU's utilisation, as nvidia-smi says it (both jobs on it: 30% + 20%)
    wait_until(lambda: job(dq, good)["gpu_use"]["util"] == 50, timeout=10,
               what="a sample of both jobs' utilisation")
    use = job(dq, good)["gpu_use"]
    assert use["samples"] >= 1 and use["peak_mem_mib"] == 4000 and use["last"][-1][1:] == \
        [4000, 50], use
    assert job(dq, good)["gpu_use"]["over"] is None
    r = dq.run("node1", ALICE, "jobs")
    assert "OVER 30G/8G" in r.stdout and "3.9G/8G" in r.stdout, r.stdout
    assert f"{greedy} on node1: used 30G of GPU memory, over its DQ_MEM=8G" in r.stdout
    assert "uses 30G of GPU memory, over its DQ_MEM=8G" in log_of(dq, greedy)
    # mem_overuse = warn (the default): both run on
    assert job(dq, greedy)["state"] == "running" and job(dq, good)["state"] == "running"


def test_mem_overuse_kill_stops_the_offender_not_its_neighbour(cluster, dq):
    configure(dq, cluster.hosts, mem_overuse="kill", kill_grace=1, **FAST)
    only_gpu0_of_node1(cluster)
    d, path = script(cluster, ALICE, "share.sh", JOB)
    env = {"DQ_MEM": "8G", "DQ_HOSTS": "node1"}
    good, _ = submit(dq, "node1", BOB, path, env=dict(env, DQ_USE="6000"))
    greedy, _ = submit(dq, "node1", ALICE, path, env=dict(env, DQ_USE="30822"))
    assert wait_state(dq, good, "running", timeout=20, user=BOB)["gpus"] == [0]
    assert wait_state(dq, greedy, ("running", "failed"), timeout=20)["gpus"] == [0]
    end = wait_state(dq, greedy, "failed", timeout=20)
    assert "used 30.1G of GPU memory, DQ_MEM=8G" in end["reason"], end
    assert job(dq, good, user=BOB)["state"] == "running"
    # its processes are gone from the GPU; the neighbour's are still there
    wait_until(lambda: len([p for p in cluster.gpu_processes("node1") if p[0] == 0]) == 1,
               timeout=10, what="the offender's process to go")
    assert "stopping it (mem_overuse = kill)" in log_of(dq, greedy)


def test_cuda_out_of_memory_is_named_in_the_reason(cluster, dq):
    configure(dq, cluster.hosts, **FAST)
    d, path = script(cluster, ALICE, "oom.sh", '''
echo "Traceback (most recent call last):"
echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.35 GiB total capacity)"
exit 1
''')
    plain, _ = submit(dq, "node1", ALICE, path)
    shared, _ = submit(dq, "node1", ALICE, path, env={"DQ_MEM": "4G"})
    j = wait_state(dq, plain, "failed", timeout=20)
    assert j["reason"] == "CUDA out of memory (PyTorch), exit status 1", j
    j = wait_state(dq, shared, "failed", timeout=20)
    assert j["reason"] == ("CUDA out of memory (PyTorch), exit status 1; a larger DQ_MEM may "
                           "help (it booked 4G)"), j
    # dq-restart keeps the booking
    r = dq.run("node1", ALICE, "restart", shared)
    assert r.returncode == 0, r.stderr
    again = r.stdout.split("'")[1]
    assert wait_state(dq, again, "failed", timeout=20)["mem_mib"] == 4096


def test_bad_or_impossible_bookings_are_refused_at_submit(cluster, dq):
    configure(dq, cluster.hosts)
    d, path = script(cluster, ALICE, "s.sh", "exit 0\n")
    cases = [({"DQ_MEM": "lots"}, ["DQ_MEM='lots' is not a size", "DQ_MEM=24G"]),
             ({"DQ_MEM": "0"}, ["DQ_MEM='0' books no memory"]),
             ({"DQ_MEM": "100G"}, ["DQ_MEM=100G", "(80 GB) on node1"]),
             ({"DQ_MEM": "80G"}, ["DQ_MEM=80G is more than a job may book", "78.4G"]),
             ({"DQ_MEM": "16G", "DQ_GPUS": "0"}, ["DQ_MEM", "DQ_GPUS=0"])]
    refused_at_submit(dq, path, cases)
    assert jobs(dq) == []


# The planner's sharing rules, on data ########################################

def rules(**kw):
    return planner_rules(**dict(dict(order="fairshare"), **kw))


def node(name, count=4, total=81920, apps=None):
    """A poll of a host: apps {GPU: [(pid, MiB, dq job or None)]}."""
    st = dqmod.HostState(name, 0)
    for i in range(count):
        g = dqmod.Gpu(i, f"GPU-{name}-{i}", 0, total, "NVIDIA A100-SXM4-80GB")
        for pid, mem, owner in (apps or {}).get(i, []):
            g.apps.append((pid, mem))
            if owner:
                g.owners[pid] = owner
        st.gpus.append(g)
    return st


def placing(queues, polls, places=None, **kw):
    qs = {u: [dqmod.Queued(j, gpus, need, 0) for j, gpus, need in q]
          for u, q in queues.items()}
    return dqmod.plan(qs, [], polls, places or {}, 10, rules(**kw))


def test_sharing_jobs_pack_and_leave_whole_gpus_free():
    out = placing({"x": [(f"{i}-x", 1, {"mem": 8192}) for i in range(1, 10)]},
                  {"a": node("a", 2), "b": node("b", 2)})
    # all nine on one GPU would be over max_jobs_per_gpu: eight on one, the ninth beside
    gpus = [(h, g[0]) for _, h, g in out.placed]
    assert gpus[:8] == [("a", 0)] * 8 and gpus[8] in {("a", 1), ("b", 0)}
    assert out.shares["1-x"] == (8192, 0.1)


def test_an_exclusive_job_takes_no_gpu_with_sharing_jobs_and_the_reverse():
    places = {"1-x": {"user": "x", "host": "a", "gpus": [0], "state": "running", "since": 0,
                      "mem": 8192, "share": 0.1},
              "2-y": {"user": "y", "host": "a", "gpus": [1], "state": "running", "since": 0}}
    polls = {"a": node("a", 3, apps={0: [(10, 500, "1-x")], 1: [(11, 500, "2-y")]})}
    out = placing({"z": [("3-z", 1, None), ("4-z", 1, {"mem": 1024}), ("5-z", 1, None)]},
                  polls, places)
    assert out.placed == [("3-z", "a", [2]), ("4-z", "a", [0])]
    assert out.reasons == {"5-z": "GPUs busy"}


def test_memory_of_dq_jobs_on_gpus_not_their_own_counts_as_used_by_hand():
    places = {"1-x": {"user": "x", "host": "a", "gpus": [1], "state": "running", "since": 0,
                      "mem": 8192, "share": 0.1}}
    # 1-x's process strayed onto GPU 0 with 70G: GPU 0 has 80281 - 71680 left
    polls = {"a": node("a", 2, apps={0: [(10, 71680, "1-x")], 1: [(11, 500, "1-x")]})}
    g0 = polls["a"].gpus[0]
    assert dqmod.foreign_mib(g0, "a", places) == 71680
    assert dqmod.gpu_room(g0, "a", places, rules()) == (8601, 0)
    # GPU 1 has 80281 - 8192 left: the most either has is 70.4G
    out = placing({"y": [("2-y", 1, {"mem": 73728})]}, polls, places)
    assert out.placed == [] and out.reasons == {"2-y": "GPU memory: 70.4G free at most, needs 72G"}
    assert placing({"y": [("3-y", 1, {"mem": 8601})]}, polls, places).placed == \
        [("3-y", "a", [0])]


def test_fair_share_and_limits_count_a_sharing_job_as_its_share():
    # x runs four sharing jobs of a fifth of a GPU each (0.8 GPUs), y one
    # whole GPU: the next free GPU goes to x, who holds less
    places = {f"{i}-x": {"user": "x", "host": "a", "gpus": [0], "state": "running", "since": 0,
                         "mem": 16384, "share": 0.2} for i in range(1, 5)}
    places["5-y"] = {"user": "y", "host": "a", "gpus": [1], "state": "running", "since": 0}
    polls = {"a": node("a", 3, apps={0: [(10 + i, 500, f"{i}-x") for i in range(1, 5)]})}
    out = placing({"x": [("6-x", 1, None)], "y": [("7-y", 1, None)]}, polls, places)
    assert out.placed == [("6-x", "a", [2])]
    assert dqmod.gpus_held(places) == {"x": 0.8, "y": 1}
    # a limit of one GPU: x may book one more fifth (1.0), not two
    out = placing({"x": [("8-x", 1, {"mem": 16384}), ("9-x", 1, {"mem": 16384})]}, polls,
                  places, gpu_limit={"x": 1}.get)
    assert [j for j, _, _ in out.placed] == ["8-x"] and out.reasons == {"9-x": "user limit"}


def test_the_poll_names_the_dq_job_of_each_gpu_process():
    res = types.SimpleNamespace(ok=True, out=(
        "@@gpus\n0, GPU-a-0, 9000, 81920, NVIDIA A100-SXM4-80GB\n@@rc 0\n"
        "@@apps\nGPU-a-0, 4242, 8000\nGPU-a-0, 4343, 1000\n@@rc 0\n"
        "@@ps\nSCREEN -dmS dq-7-alice python3 dq.py _run 7-alice a 0 8192/0.1\n"
        "@job 4242 7-alice\n@@rc 0\n"))
    st = dqmod.parse_poll("a", res, 0)
    assert st.sessions == {"7-alice"}
    assert st.gpus[0].owners == {4242: "7-alice"} and st.gpus[0].apps == [(4242, 8000),
                                                                          (4343, 1000)]


def test_cuda_oom_patterns(tmp_path):
    lines = {"PyTorch": ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB",
                         "RuntimeError: CUDA out of memory. Tried to allocate 1.2 GiB",
                         "torch.cuda.OutOfMemoryError: CUDA out of memory.",
                         "RuntimeError: CUDA error: out of memory"],
             "TensorFlow": ["tensorflow.python.framework.errors_impl.ResourceExhaustedError: "
                            "OOM when allocating tensor with shape[8192,8192]"],
             "JAX": ["jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory "
                     "while trying to allocate 17179869184 bytes."]}
    log = tmp_path / "log"
    for name, texts in lines.items():
        for text in texts:
            log.write_text("step 1\n" * 100 + text + "\n")
            assert dqmod.cuda_oom(str(log)) == name, text
    for text in ("loss nan", "out of memory (host)", "ResourceExhaustedError: quota"):
        log.write_text(text + "\n")
        assert dqmod.cuda_oom(str(log)) is None, text


def test_fair_share_counts_a_sharing_jobs_fraction(cluster, dq):
    # node1 with three GPUs: alice's four 10G jobs share GPU 0 (4 x 1/8 =
    # half a GPU), bob's exclusive job has GPU 1, GPU 2 is held by hand
    configure(dq, ["node1"], poll_interval=0.5)
    cluster.set_gpus("node1", 3)
    hand = cluster.hold_gpu("node1", DAN, 2, memory_mb=81000)
    _, share = script(cluster, ALICE, "share.sh", JOB)
    _, solo_a = script(cluster, ALICE, "solo.sh", JOB)
    _, solo_b = script(cluster, BOB, "solo.sh", JOB)
    sharing = [submit(dq, "node1", ALICE, share, env={"DQ_MEM": "10G", "DQ_T": "8"})[0]
               for _ in range(4)]
    bobs, _ = submit(dq, "node1", BOB, solo_b)
    for i in sharing:
        assert wait_state(dq, i, "running")["gpus"] == [0]
    assert wait_state(dq, bobs, "running", user=BOB)["gpus"] == [1]
    # both queue a whole-GPU job, bob first; alice holds less (0.5 < 1): hers goes first
    bob_next, _ = submit(dq, "node1", BOB, solo_b)
    alice_next, _ = submit(dq, "node1", ALICE, solo_a)
    cluster.run("node1", DAN, ["kill", str(hand)], check=True)
    assert wait_state(dq, alice_next, "running", timeout=20)["gpus"] == [2]
    assert job(dq, bob_next, user=BOB)["state"] == "queued"
    # usage counts the share: four jobs of 1/8 GPU for ~8 s, about 4 GPU-seconds
    for i in sharing:
        wait_state(dq, i, "done", timeout=30)
    done = {j["id"]: j for j in jobs(dq, view="complete")}
    ran = sum(done[i]["ended"] - done[i]["started"] for i in sharing)
    with open(os.path.join(dq.root, "jobs", "done", ALICE)) as f:
        usage = json.load(f)["usage"]
    assert abs(usage - ran / 8) < 0.5, (usage, ran)
