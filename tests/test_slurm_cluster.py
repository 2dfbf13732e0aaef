"""Tests of the Slurm test cluster itself (tests/slurmcluster.py, the `slurm`
fixture): jobs run inside the chosen node's namespaces with GPUs, queueing,
scancel, arrays, dependencies, node failures."""
import os
import pwd
import time


def wait_for(pred, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(0.02)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def states(slurm):
    """{jobid: (state, reason)} from squeue -o '%i %T %r'."""
    out = {}
    for line in slurm.squeue("%i %T %r"):
        jobid, state, reason = line.split(None, 2)
        out[jobid] = (state, reason)
    return out


def test_fixture_conf_and_env(slurm, cluster):
    assert slurm.env == {"SLURM_CONF": slurm.conf}
    assert slurm.conf.startswith(cluster.base + "/")
    assert os.stat(slurm.conf).st_mode & 0o004
    assert slurm.node_states() == {h: "idle" for h in cluster.hosts}
    r = slurm.run("node2", "dqbob", "sinfo -h -o '%P %D %G'", check=True)
    # three nodes of 4 GPUs, and node4's also shared out as shards (DQ_MEM)
    assert sorted(r.stdout.splitlines()) == ["gpu* 1 gpu:4,shard:44", "gpu* 3 gpu:4"], r.stdout
    assert slurm.squeue_ids() == []
    print("\nSlurm start: daemons up and nodes idle %.2f s, scheduler live %.2f s"
          % (slurm.daemons_seconds, slurm.startup_seconds))


def test_gpu_job_runs_inside_the_chosen_node(slurm, cluster):
    work = cluster.user_dir("dqalice", "slurm-gpu")
    script = ("hostname; echo CUDA=$CUDA_VISIBLE_DEVICES; nvidia-smi -L; id -un; "
              "screen -dmS x sleep 100; touch started; sleep 100")
    t0 = time.time()
    r = slurm.run("node1", "dqalice", ["sbatch", "--parsable", "--gres=gpu:2",
                                       "--nodelist=node3", "--wrap", script],
                  cwd=work, check=True)
    jobid = r.stdout.strip()
    assert jobid.isdigit(), r.stdout
    wait_for(lambda: os.path.exists(os.path.join(work, "started")), what="job start")
    print("\nsubmit to script start %.2f s" % (os.stat(os.path.join(work, "started")).st_mtime - t0))
    assert states(slurm)[jobid][0] == "RUNNING"
    assert slurm.squeue("%i %N %u") == ["%s node3 dqalice" % jobid]

    out = os.path.join(work, "slurm-%s.out" % jobid)
    assert os.stat(out).st_uid == pwd.getpwnam("dqalice").pw_uid
    lines = read(out).splitlines()
    assert lines[0] == "node3"
    assert lines[1] == "CUDA=0,1"
    node3_gpus = cluster.run("node3", "dqalice", "nvidia-smi -L", check=True).stdout.splitlines()
    assert len(node3_gpus) == 4 and "GTX 1080 Ti" in node3_gpus[0]
    assert lines[2:6] == node3_gpus
    assert lines[6] == "dqalice"

    # the job's screen lives in node3 (its /run/screen): a login there sees it,
    # through nsenter and through ssh, and other nodes don't
    for how in ("screen -ls", "%s node3 screen -ls" % cluster.ssh_command):
        r = cluster.run("node3" if how == "screen -ls" else "node1", "dqalice", how)
        assert ".x\t" in r.stdout, (how, r.stdout, r.stderr)
    assert ".x\t" not in cluster.run("node1", "dqalice", "screen -ls").stdout

    slurm.run("node1", "dqalice", ["scancel", jobid], check=True)
    assert slurm.wait_state(jobid, ("CANCELLED",), timeout=10) == "CANCELLED"
    wait_for(lambda: slurm.squeue_ids() == [], timeout=10, what="empty queue")
    # the daemonized screen escaped the job (proctrack/linuxproc): still there
    assert ".x\t" in cluster.run("node3", "dqalice", "screen -ls").stdout


def test_full_gpus_queue_the_next_job_with_reason_resources(slurm, cluster):
    work = cluster.user_dir("dqbob", "slurm-full")
    running = [slurm.sbatch("node2", "dqbob", "--gres=gpu:4", "--wrap", "sleep 100", cwd=work)
               for _ in cluster.hosts]
    wait_for(lambda: all(states(slurm).get(j, ("",))[0] == "RUNNING" for j in running),
             what="4 running jobs")
    assert sorted(slurm.squeue("%N")) == cluster.hosts
    waiting = slurm.sbatch("node2", "dqalice", "--gres=gpu:1", "--wrap", "touch started",
                           cwd=cluster.user_dir("dqalice", "slurm-full"))
    wait_for(lambda: states(slurm)[waiting] == ("PENDING", "Resources"),
             what="PENDING (Resources)")
    # scancel by the owner frees a node; the waiting job runs there
    t0 = time.monotonic()
    slurm.run("node1", "dqbob", ["scancel", running[0]], check=True)
    slurm.wait_state(waiting, ("COMPLETED",), timeout=15)
    print("\nscancel to next job done %.2f s" % (time.monotonic() - t0))
    assert slurm.job_state(running[0]) == "CANCELLED"
    # another user cannot cancel bob's jobs
    r = slurm.run("node1", "dqalice", ["scancel", running[1]])
    assert r.returncode != 0 and "Access/permission denied" in r.stderr, r
    assert states(slurm)[running[1]][0] == "RUNNING"


def test_job_array(slurm, cluster):
    work = cluster.user_dir("dqalice", "slurm-array")
    jobid = slurm.sbatch("node1", "dqalice", "--array=0-3", "--gres=gpu:2", "-o", "arr-%A_%a.out",
                         "--wrap", "echo $SLURM_ARRAY_TASK_ID $(hostname) $CUDA_VISIBLE_DEVICES",
                         cwd=work)
    paths = [os.path.join(work, "arr-%s_%d.out" % (jobid, i)) for i in range(4)]
    wait_for(lambda: all(read(p) for p in paths), what="4 array tasks")
    wait_for(lambda: slurm.squeue_ids() == [], timeout=10, what="empty queue")
    for i, p in enumerate(paths):
        task, host, cuda = read(p).split()
        assert task == str(i) and host in cluster.hosts and cuda in ("0,1", "2,3")


def test_dependency_afterok(slurm, cluster):
    work = cluster.user_dir("dqalice", "slurm-dep")
    first = slurm.sbatch("node1", "dqalice", "--wrap", "sleep 1; echo one > first", cwd=work)
    second = slurm.sbatch("node1", "dqalice", "--dependency=afterok:%s" % first,
                          "--wrap", "cat first > second", cwd=work)
    assert states(slurm)[second] == ("PENDING", "Dependency")
    t0 = time.monotonic()
    slurm.wait_state(second, ("COMPLETED",), timeout=20)
    print("\ndependency chain (1 s parent) %.2f s" % (time.monotonic() - t0))
    assert read(os.path.join(work, "second")) == "one\n"
    # a failed parent: the child can never run
    bad = slurm.sbatch("node1", "dqalice", "--wrap", "exit 3", cwd=work)
    child = slurm.sbatch("node1", "dqalice", "--dependency=afterok:%s" % bad, "--wrap", "true",
                         cwd=work)
    slurm.wait_state(bad, ("FAILED",))
    wait_for(lambda: states(slurm)[child] == ("PENDING", "DependencyNeverSatisfied"),
             what="DependencyNeverSatisfied")


def test_user_process_kill_ends_jobs_not_daemons(slurm, cluster):
    """Cluster.kill_user_processes (part of Cluster.reset) kills the jobs'
    processes but not slurmd/slurmstepd (root)."""
    work = cluster.user_dir("dqdan", "slurm-kill")
    jobid = slurm.sbatch("node4", "dqdan", "--nodelist=node4", "--wrap", "touch started; sleep 100",
                         cwd=work)
    wait_for(lambda: os.path.exists(os.path.join(work, "started")), what="job start")
    pid = slurm.slurmd_pid("node4")
    cluster.kill_user_processes()
    assert slurm.wait_state(jobid, ("FAILED", "CANCELLED", "COMPLETED")) == "FAILED"
    assert slurm.slurmd_pid("node4") == pid
    slurm.wait_idle()


def test_node_failure_and_restart(slurm, cluster):
    # a crashed slurmd comes back; the node takes jobs again
    slurm.kill_slurmd("node2")
    assert slurm.slurmd_pid("node2") is None
    slurm.start_slurmd("node2")
    # a crashed node (new namespaces): start_slurmd runs in the new ones
    old = slurm.slurmd_pid("node4")
    cluster.kill_node("node4")
    assert slurm.slurmd_pid("node4") is None
    cluster.start_node("node4")
    slurm.start_slurmd("node4")
    assert slurm.slurmd_pid("node4") not in (None, old)
    work = cluster.user_dir("dqalice", "slurm-fail")
    for host in ("node2", "node4"):
        jobid = slurm.sbatch("node1", "dqalice", "--nodelist=" + host, "--gres=gpu:1",
                             "--wrap", "hostname", cwd=work)
        slurm.wait_state(jobid, ("COMPLETED",))
        assert read(os.path.join(work, "slurm-%s.out" % jobid)) == host + "\n"
    # admin: drain; reset() resumes it
    slurm.root_run(["scontrol", "update", "nodename=node1", "state=drain", "reason=test"],
                   check=True)
    assert slurm.node_states()["node1"] == "drain"
    slurm.reset()
    assert slurm.node_states()["node1"] == "idle"
