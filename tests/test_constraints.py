"""Host and GPU constraints at submit (issue 11): DQ_HOSTS, DQ_EXCLUDE,
DQ_GPU_TYPE, DQ_GPU_MEM, on the test cluster's mixed GPUs (node1: A100
80GB, node2: RTX 3090 24GB, node3 and node4: GTX 1080 Ti 11GB)."""
import json
import time

from dqtest import (ALICE, BOB, MODELS, configure, job, jobs, refused_at_submit, script,
                    submit, wait_state, wait_until)


def hosts_of(dq, ids):
    return {i: wait_state(dq, i, ("running", "done"), timeout=30)["host"] for i in ids}


def test_each_constraint_places_only_where_allowed(cluster, dq):
    configure(dq, cluster.hosts)
    d, path = script(cluster, ALICE, "s.sh", "sleep 3\n")
    asks = {
        "type 3090": ({"DQ_GPU_TYPE": "3090"}, {"node2"}),
        "type a100, any case": ({"DQ_GPU_TYPE": "a100"}, {"node1"}),
        "memory": ({"DQ_GPU_MEM": "20G"}, {"node1", "node2"}),
        "memory in MiB": ({"DQ_GPU_MEM": "30000"}, {"node1"}),
        "range": ({"DQ_HOSTS": "node[3-4]"}, {"node3", "node4"}),
        "list and glob": ({"DQ_HOSTS": "node4,nodeX*"}, {"node4"}),
        "exclude": ({"DQ_EXCLUDE": "node[1,2],node3"}, {"node4"}),
        "include and exclude": ({"DQ_HOSTS": "node*", "DQ_EXCLUDE": "node[2-4]"}, {"node1"}),
        "cpu job on a host": ({"DQ_GPUS": "0", "DQ_HOSTS": "node3"}, {"node3"}),
    }
    placed = {}
    for what, (env, allowed) in asks.items():
        for _ in range(2):
            job_id, r = submit(dq, "node1", ALICE, path, env=env)
            placed[job_id] = (what, allowed)
    for job_id, host in hosts_of(dq, placed).items():
        what, allowed = placed[job_id]
        assert host in allowed, f"{what}: {job_id} ran on {host}"
    # the constraints are shown with the job, as its DQ_* variables
    for job_id in placed:
        wait_state(dq, job_id, "done")
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert "DQ_GPU_TYPE=3090" in r.stdout and "DQ_HOSTS=node[3-4]" in r.stdout


def test_a_constrained_job_waits_for_its_kind_of_gpu(cluster, dq):
    configure(dq, cluster.hosts)
    holders = [cluster.hold_gpu("node1", BOB, g) for g in range(4)]
    d, path = script(cluster, ALICE, "s.sh", "exit 0\n")
    job_id, r = submit(dq, "node2", ALICE, path, env={"DQ_GPU_MEM": "40G"})
    assert "is queued" in r.stderr, r.stdout + r.stderr
    # twelve other GPUs are free, none big enough: it keeps waiting
    free = json.loads(dq.run("node1", ALICE, "free", "--json").stdout)
    assert sum(len(h["free"]) for h in free) == 12
    assert job(dq, job_id)["state"] == "queued"
    cluster.run("node1", BOB, ["kill", str(holders[2])], check=True)
    j = wait_state(dq, job_id, ("running", "done"), timeout=20)
    assert (j["host"], j["gpus"]) == ("node1", [2])


def test_impossible_constraints_are_refused_at_submit(cluster, dq):
    configure(dq, cluster.hosts)
    d, path = script(cluster, ALICE, "s.sh", "exit 0\n")
    cases = [
        ({"DQ_GPU_TYPE": "V100"}, ["DQ_GPU_TYPE=V100", MODELS[0][0], "(80 GB)", "node3,node4"]),
        ({"DQ_GPU_MEM": "100G"}, ["DQ_GPU_MEM", "(24 GB) on node2"]),
        ({"DQ_GPU_TYPE": "3090", "DQ_GPUS": "5"}, ["5 GPU(s)", "DQ_GPU_TYPE=3090"]),
        ({"DQ_HOSTS": "deep[1-4]"}, ["DQ_HOSTS=deep1,deep2,deep3,deep4", "node1 node2"]),
        ({"DQ_EXCLUDE": "node*"}, ["DQ_EXCLUDE=node*", "leaves no host"]),
        ({"DQ_HOSTS": "node[4-2]"}, ["bad range", "deep[1-4]"]),
        ({"DQ_GPU_MEM": "lots"}, ["DQ_GPU_MEM='lots' is not a size", "24G"]),
        ({"DQ_GPU_TYPE": "A100", "DQ_GPUS": "0"}, ["DQ_GPUS=0"]),
    ]
    refused_at_submit(dq, path, cases)
    assert jobs(dq, view="complete") == [] and jobs(dq) == []


def test_restart_keeps_the_constraints(cluster, dq):
    configure(dq, cluster.hosts)
    d, path = script(cluster, ALICE, "s.sh", "exit 0\n")
    first, _ = submit(dq, "node1", ALICE, path, env={"DQ_GPU_TYPE": "1080", "DQ_EXCLUDE": "node3"})
    assert wait_state(dq, first, "done")["host"] == "node4"
    r = dq.run("node2", ALICE, "restart", first)
    assert r.returncode == 0, r.stderr
    again = r.stdout.split("'")[1]
    j = wait_state(dq, again, "done")
    assert j["host"] == "node4" and j["env"]["DQ_GPU_TYPE"] == "1080"


def test_the_queue_says_why_each_job_waits(cluster, dq):
    configure(dq, ["node1", "node2"])
    for g in range(4):
        cluster.hold_gpu("node1", BOB, g)
    for g in (1, 2, 3):
        cluster.hold_gpu("node2", BOB, g)       # node2's GPU 0 (24 GB) stays free
    d, path = script(cluster, ALICE, "s.sh", "exit 0\n")
    want = {}
    for env, reason in [({"DQ_GPU_MEM": "40G"}, "GPU kind"),      # only node1's are that big
                        ({"DQ_HOSTS": "node1"}, "hosts"),
                        ({"DQ_GPUS": "2"}, "GPUs busy")]:
        job_id, r = submit(dq, "node1", ALICE, path, env=env)
        assert "is queued" in r.stderr, r.stdout + r.stderr
        want[job_id] = reason
    got = {j["id"]: j["reason"] for j in jobs(dq, view="queue")}
    assert got == want
    r = dq.run("node2", ALICE, "jobs", "queue")
    header, _, *rows = r.stdout.splitlines()[1:]
    assert header.split()[:3] == ["JobID", "Wait", "Reason"]
    for row in rows:
        job_id = row.split()[0]
        assert f"  {want[job_id]}  " in row, row


def test_the_queue_says_hosts_down_cpu_slots_and_kept_for(cluster, dq):
    # The reasons the planner gives beyond the constraints', as a user reads
    # them in dq-jobs queue: a job whose only host is down, a CPU-only job
    # with every slot taken, and a job waiting behind the starvation guard.
    configure(dq, ["node1", "node2", "node3"], cpu_slots=1, starve_after=1, timeout=3)
    cluster.set_gpus("node1", 2)
    cluster.hold_gpu("node1", BOB, 0)       # by hand: node1 has one GPU free
    for g in range(4):
        cluster.hold_gpu("node2", BOB, g)
    cluster.stop_sshd("node3")
    _, long = script(cluster, ALICE, "long.sh", "sleep 60\n")
    cpu = [submit(dq, "node1", ALICE, long, env={"DQ_GPUS": "0"})[0] for _ in range(3)]
    wait_until(lambda: sum(job(dq, j)["state"] == "running" for j in cpu) == 2, timeout=30,
               what="two CPU-only jobs running (node1, node2)")
    down, _ = submit(dq, "node1", ALICE, long, env={"DQ_HOSTS": "node3"})
    big, _ = submit(dq, "node1", ALICE, long, env={"DQ_GPUS": "2", "DQ_HOSTS": "node1"})
    # once alice's 2-GPU job has waited starve_after, node1 is kept for it
    wait_until(lambda: time.time() - job(dq, big)["submitted"] > 1.5, timeout=10,
               what="the 2-GPU job to starve")
    _, short = script(cluster, BOB, "short.sh", "exit 0\n")
    small, _ = submit(dq, "node1", BOB, short, env={"DQ_HOSTS": "node1"})
    waiting = [j for j in cpu if job(dq, j)["state"] == "queued"]
    want = {waiting[0]: "CPU slots", down: "hosts down", big: "GPUs busy",
            small: f"kept for {big}"}
    reasons = wait_until(lambda: (lambda r: r if r == want else None)(
        {j["id"]: j["reason"] for j in jobs(dq, view="queue")}), timeout=20,
        what=f"the queue's reasons to be {want}")
    assert reasons == want
    # and the pass agrees: bob's job, which node1's free GPU would fit, waits
    assert job(dq, small, user=BOB)["state"] == "queued"
