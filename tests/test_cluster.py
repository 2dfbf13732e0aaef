"""Tests of the test cluster itself: nodes, ssh, screen, fake GPUs, failures."""
import os
import shlex
import subprocess
import time

import pytest

from cluster import BASE_PARENT, Cluster, ClusterError, CommandFailed, install_dq, DQInstall
from dqtest import MODELS

SMI_GPU = "nvidia-smi --query-gpu=index,uuid,memory.used,memory.total --format=csv,noheader,nounits"
SMI_APPS = "nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits"


def ssh(cluster, host, cmd):
    """argv for ssh'ing to host the way dq will: <ssh_command> <host> <cmd>."""
    return shlex.split(cluster.ssh_command) + [host, cmd]


def smi_gpus(cluster, host, user="dqalice"):
    r = cluster.run(host, user, SMI_GPU, check=True)
    return [line.split(", ") for line in r.stdout.splitlines()]


# ---------------------------------------------------------------- nodes and ssh

def test_nodes_have_distinct_hostnames(cluster):
    assert cluster.hosts == ["node1", "node2", "node3", "node4"]
    for host in cluster.hosts:
        r = cluster.run(host, "dqalice", ["hostname"], check=True)
        assert r.stdout.strip() == host


def test_ssh_between_nodes_as_test_users(cluster):
    for user in ("dqalice", "dqbob"):
        for src in ("node1", "node3"):
            for dst in cluster.hosts:
                r = cluster.run(src, user, ssh(cluster, dst, "echo $(hostname) $(whoami) $PATH"),
                                check=True)
                assert r.stdout.split() == [dst, user, "/usr/local/bin:/usr/bin:/bin:/usr/games"]


def test_ssh_command_is_a_usable_prefix(cluster):
    r = cluster.run("node2", "dqbob", "%s node4 'hostname; nvidia-smi -L | wc -l'"
                    % cluster.ssh_command, check=True)
    assert r.stdout.split() == ["node4", "4"]
    assert not os.stat(cluster.ssh_config).st_mode & 0o022
    assert os.stat(cluster.ssh_config).st_mode & 0o004


def test_root_can_ssh_to_nodes(cluster):
    r = subprocess.run(shlex.split(cluster.root_ssh_command) + ["node3", "hostname"],
                       capture_output=True, text=True, timeout=20)
    assert r.stdout.strip() == "node3", r.stderr


def test_tmp_is_private_home_and_base_are_shared(cluster):
    work = cluster.user_dir("dqalice", "shared")
    cluster.run("node1", "dqalice", "echo one > /tmp/x; echo two > %s/y; echo three > ~/z" % work,
                check=True)
    r = cluster.run("node2", "dqalice", "cat /tmp/x; cat %s/y ~/z" % work)
    assert "No such file" in r.stderr
    assert r.stdout.split() == ["two", "three"]
    assert cluster.run("node1", "dqalice", "cat /tmp/x").stdout == "one\n"


def test_each_node_has_its_own_pid_namespace(cluster):
    ps = cluster.run("node1", "root", ["ps", "-o", "pid=,args=", "-p", "1"], check=True)
    assert ps.stdout.split()[:2] == ["1", "sshd:"]
    pid = cluster.hold_gpu("node2", "dqbob", 0)
    assert cluster.run("node2", "dqbob", ["kill", "-0", str(pid)]).returncode == 0
    assert os.readlink("/proc/%d/ns/pid" % cluster.node_pid("node1")) != \
        os.readlink("/proc/%d/ns/pid" % cluster.node_pid("node2"))


def test_run_gives_a_clean_login_environment(cluster):
    r = cluster.run("node1", "dqbob", ["env"], env={"FOO": "bar baz"}, check=True)
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert env == {"HOME": "/home/dqbob", "USER": "dqbob", "LOGNAME": "dqbob",
                   "SHELL": "/bin/bash", "PATH": "/usr/local/bin:/usr/bin:/bin",
                   "LANG": "C.UTF-8", "FOO": "bar baz", "PWD": "/home/dqbob"}
    assert cluster.run("node1", "dqbob", "pwd").stdout == "/home/dqbob\n"
    work = cluster.user_dir("dqbob", "cwdtest")
    assert cluster.run("node1", "dqbob", "pwd; id -un; touch f", cwd=work).stdout == \
        work + "\ndqbob\n"
    assert os.stat(os.path.join(work, "f")).st_uid == os.stat(work).st_uid
    assert cluster.run("node1", "dqbob", ["cat"], input="hello").stdout == "hello"


def test_run_failures(cluster):
    r = cluster.run("node1", "dqalice", "echo oops >&2; exit 3")
    assert (r.returncode, r.stderr) == (3, "oops\n")
    with pytest.raises(CommandFailed, match="oops"):
        cluster.run("node1", "dqalice", "echo oops >&2; exit 3", check=True)
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        cluster.run("node1", "dqalice", "sleep 30", timeout=1)
    assert time.monotonic() - t0 < 8
    time.sleep(0.2)
    assert cluster.run("node1", "dqalice", "pgrep -u dqalice -x sleep").returncode == 1
    with pytest.raises(ValueError):
        cluster.run("node9", "dqalice", "true")
    with pytest.raises(KeyError):
        cluster.run("node1", "nosuchuser", "true")


def test_popen_is_non_blocking(cluster):
    p = cluster.popen("node2", "dqalice", "read line; echo got $line $(hostname)",
                      stdin=subprocess.PIPE)
    assert p.poll() is None
    out, err = p.communicate("x\n", timeout=20)
    assert (p.returncode, out) == (0, "got x node2\n")


# ---------------------------------------------------------------- screen

def test_screen_works_on_a_node_over_ssh(cluster):
    work = cluster.user_dir("dqalice", "screen")
    cmd = "cd %s && screen -dmS job1 bash -c 'echo started on $(hostname) > out; sleep 300'" % work
    cluster.run("node1", "dqalice", ssh(cluster, "node3", cmd), check=True)
    for _ in range(100):
        if os.path.exists(os.path.join(work, "out")):
            break
        time.sleep(0.05)
    assert open(os.path.join(work, "out")).read() == "started on node3\n"
    ls3 = cluster.run("node3", "dqalice", "screen -ls")
    assert ".job1\t" in ls3.stdout
    ls1 = cluster.run("node1", "dqalice", "screen -ls")
    assert "job1" not in ls1.stdout          # screen sockets are per node
    assert "job1" not in cluster.run("node3", "dqbob", "screen -ls").stdout
    cluster.run("node3", "dqalice", "screen -S job1 -X quit", check=True)
    time.sleep(0.2)
    assert "job1" not in cluster.run("node3", "dqalice", "screen -ls").stdout


def test_kill_user_processes_leaves_nothing(cluster):
    cluster.run("node2", "dqbob", "screen -dmS s sleep 300", check=True)
    cluster.run("node2", "dqalice", ssh(cluster, "node4", "screen -dmS t sleep 300"), check=True)
    cluster.hold_gpu("node1", "dqalice", 1)
    cluster.kill_user_processes()
    for host in cluster.hosts:
        ps = cluster.run(host, "root", ["ps", "-eo", "pid=,ppid=,user=,stat=,args="], check=True).stdout
        live = [ln for ln in ps.splitlines() if ln.split()[3] != "Z"]   # zombies: being reaped
        assert "dq" not in "\n".join(live).replace(cluster.base, "")
    assert cluster.gpu_processes("node1") == []


# ---------------------------------------------------------------- fake nvidia-smi

def test_nvidia_smi_gpu_query_format(cluster):
    rows = smi_gpus(cluster, "node1")
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    for r in rows:
        assert r[1].startswith("GPU-") and len(r[1]) == 40
        assert r[2:] == ["0", str(MODELS[0][1])]
    # UUIDs: stable, distinct per node
    assert smi_gpus(cluster, "node1", "dqbob") == rows
    other = {r[1] for r in smi_gpus(cluster, "node2")}
    assert not other & {r[1] for r in rows}

    r = cluster.run("node1", "dqalice", "nvidia-smi --query-gpu=memory.used,index,name,"
                    "memory.free,utilization.gpu,pci.bus_id --format=csv -i 1", check=True)
    assert r.stdout.splitlines() == [
        "memory.used [MiB], index, name, memory.free [MiB], utilization.gpu [%], pci.bus_id",
        "0 MiB, 1, %s, %d MiB, 0 %%, 00000000:2A:00.0" % MODELS[0]]
    r = cluster.run("node1", "dqalice", "nvidia-smi --query-gpu=index,bogus --format=csv")
    assert (r.returncode, r.stdout.splitlines()[0]) == \
        (2, 'Field "bogus" is not a valid field to query.')


def test_nvidia_smi_reports_gpu_processes(cluster):
    assert cluster.run("node2", "dqbob", SMI_APPS, check=True).stdout == ""
    assert cluster.gpu_processes("node2") == []
    pid_a = cluster.hold_gpu("node2", "dqalice", 2, memory_mb=1234)
    pid_b = cluster.hold_gpu("node2", "dqbob", 0, memory_mb=100)
    uuids = [r[1] for r in smi_gpus(cluster, "node2")]
    apps = cluster.run("node2", "dqbob", SMI_APPS, check=True).stdout.splitlines()
    assert sorted(apps) == sorted(["%s, %d, 1234" % (uuids[2], pid_a),
                                   "%s, %d, 100" % (uuids[0], pid_b)])
    assert [r[2] for r in smi_gpus(cluster, "node2")] == ["100", "0", "1234", "0"]
    assert cluster.gpu_processes("node2") == [(0, pid_b, "dqbob"), (2, pid_a, "dqalice")]
    assert cluster.gpu_processes("node1") == []
    r = cluster.run("node2", "dqalice", "nvidia-smi --query-compute-apps=pid,process_name,"
                    "used_memory,gpu_bus_id --format=csv", check=True)
    assert r.stdout.splitlines()[0] == "pid, process_name, used_gpu_memory [MiB], gpu_bus_id"
    assert "%d, fake-cuda, 1234 MiB, 00000000:3A:00.0" % pid_a in r.stdout
    # a dead holder disappears, even if its file is left behind (SIGKILL)
    cluster.run("node2", "dqalice", ["kill", "-KILL", str(pid_a)], check=True)
    time.sleep(0.1)
    assert cluster.gpu_processes("node2") == [(0, pid_b, "dqbob")]
    assert "1234" not in cluster.run("node2", "dqbob", SMI_GPU).stdout
    # plain nvidia-smi and -L
    table = cluster.run("node2", "dqalice", "nvidia-smi", check=True).stdout
    assert "NVIDIA-SMI" in table and str(pid_b) in table
    lst = cluster.run("node2", "dqalice", "nvidia-smi -L", check=True).stdout.splitlines()
    assert lst[0] == "GPU 0: %s (UUID: %s)" % (MODELS[1][0], uuids[0])


def test_set_gpus(cluster):
    cluster.set_gpus("node3", 2)
    assert [r[0] for r in smi_gpus(cluster, "node3")] == ["0", "1"]
    with pytest.raises(ClusterError):
        cluster.hold_gpu("node3", "dqalice", 3)
    cluster.set_gpus("node3", 0)
    r = cluster.run("node3", "dqalice", SMI_GPU)
    assert (r.returncode, r.stdout) == (6, "No devices were found\n")


def test_gpu_models_per_node(cluster):
    name_mem = "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits"
    for host, model in zip(cluster.hosts, MODELS):
        out = cluster.run(host, "dqbob", name_mem, check=True).stdout.splitlines()
        assert out == ["%s, %d" % model] * 4
    cluster.set_gpu_model("node4", "Tesla V100-SXM2-32GB", 32510)
    assert cluster.run("node4", "dqbob", name_mem, check=True).stdout.splitlines()[0] == \
        "Tesla V100-SXM2-32GB, 32510"
    pid = cluster.hold_gpu("node4", "dqbob", 1)
    apps = cluster.run("node4", "dqbob", "nvidia-smi --query-compute-apps=pid,gpu_name "
                       "--format=csv,noheader", check=True).stdout
    assert apps == "%d, Tesla V100-SXM2-32GB\n" % pid
    cluster.reset()
    assert cluster.run("node4", "dqbob", name_mem, check=True).stdout.splitlines()[0] == \
        "%s, %d" % MODELS[3]


@pytest.mark.parametrize("mode,rc,out", [
    ("fail", 9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                "Make sure that the latest NVIDIA driver is installed and running.\n"),
    ("nodevices", 6, "No devices were found\n"),
    ("missing", 127, ""),
])
def test_nvidia_smi_failure_modes(cluster, mode, rc, out):
    pid = cluster.hold_gpu("node4", "dqbob", 1)
    cluster.set_smi_mode("node4", mode)
    r = cluster.run("node4", "dqalice", SMI_GPU)
    assert (r.returncode, r.stdout) == (rc, out)
    if mode == "missing":
        assert "nvidia-smi: not found" in r.stderr
        r = cluster.run("node1", "dqalice", ssh(cluster, "node4", SMI_GPU))
        assert r.returncode == 127 and "command not found" in r.stderr
    assert cluster.gpu_processes("node4") == [(1, pid, "dqbob")]   # the truth, regardless
    assert cluster.run("node3", "dqalice", SMI_GPU).returncode == 0  # other nodes fine
    cluster.set_smi_mode("node4", "ok")
    assert cluster.run("node4", "dqalice", SMI_GPU).returncode == 0


def test_nvidia_smi_hang_and_na(cluster):
    cluster.set_smi_mode("node1", "hang")
    with pytest.raises(subprocess.TimeoutExpired):
        cluster.run("node1", "dqalice", SMI_GPU, timeout=1)
    cluster.set_smi_mode("node1", "na")
    cluster.hold_gpu("node1", "dqalice", 0)
    rows = smi_gpus(cluster, "node1")
    assert [r[2] for r in rows] == ["[N/A]"] * 4 and rows[0][3] == str(MODELS[0][1])
    assert cluster.run("node1", "dqalice", SMI_APPS).stdout.endswith(", [N/A]\n")


def test_reset_restores_gpu_state(cluster):
    cluster.set_smi_mode("node1", "missing")
    cluster.set_smi_mode("node2", "fail")
    cluster.set_gpus("node3", 1)
    cluster.hold_gpu("node4", "dqalice", 3)
    cluster.stop_sshd("node4")
    cluster.reset()
    for host in cluster.hosts:
        assert [r[2] for r in smi_gpus(cluster, host)] == ["0"] * 4
        assert cluster.gpu_processes(host) == []
    assert cluster.run("node1", "dqalice", ssh(cluster, "node4", "hostname")).stdout == "node4\n"


# ---------------------------------------------------------------- fake-cuda

def fake_cuda(cluster, host, visible, order=None, args="--hold 0"):
    env = {"CUDA_VISIBLE_DEVICES": visible}
    if order:
        env["CUDA_DEVICE_ORDER"] = order
    return cluster.run(host, "dqalice", "fake-cuda " + args, env=env)


def test_fake_cuda_device_order(cluster):
    uuids = [r[1] for r in smi_gpus(cluster, "node1")]
    r = fake_cuda(cluster, "node1", "0,1", "PCI_BUS_ID")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    pid = lines[0].split()[2]
    assert lines[:2] == ["fake-cuda: pid %s using GPU 0 (%s)" % (pid, uuids[0]),
                         "fake-cuda: pid %s using GPU 1 (%s)" % (pid, uuids[1])]
    # without CUDA_DEVICE_ORDER=PCI_BUS_ID: "fastest first" = reversed
    r = fake_cuda(cluster, "node1", "0,1")
    assert [ln.split()[5] for ln in r.stdout.splitlines()[:2]] == ["3", "2"]
    r = fake_cuda(cluster, "node1", uuids[2])
    assert r.stdout.split()[5] == "2"


@pytest.mark.parametrize("visible", [None, "", "7"])
def test_fake_cuda_without_devices(cluster, visible):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    r = cluster.run("node1", "dqalice", "fake-cuda --hold 0", env=env)
    assert r.returncode == 100
    assert "no CUDA-capable device is detected" in r.stderr


def test_fake_cuda_delay_hold_and_sigterm(cluster):
    p = cluster.popen("node2", "dqbob", "exec fake-cuda --delay 0.5 --hold 60 --print-every 0.2",
                      env={"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    time.sleep(0.25)
    assert cluster.gpu_processes("node2") == []          # still "loading data"
    deadline = time.monotonic() + 10
    while not cluster.gpu_processes("node2") and time.monotonic() < deadline:
        time.sleep(0.05)
    [(gpu, pid, user)] = cluster.gpu_processes("node2")
    assert (gpu, user) == (1, "dqbob")
    time.sleep(0.5)
    cluster.run("node2", "dqbob", ["kill", str(pid)], check=True)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 128 + 15
    assert "using GPU 1" in out and "step 1" in out
    assert cluster.run("node2", "root", "ls /run/fakegpu/holders").stdout == ""


def test_fake_cuda_finishes(cluster):
    r = fake_cuda(cluster, "node3", "2", "PCI_BUS_ID", "--hold 0.3 --mem 10")
    assert r.returncode == 0 and r.stdout.splitlines()[-1].endswith("done")


# ---------------------------------------------------------------- failures of nodes

def test_kill_node_and_start_node(cluster):
    cluster.set_gpus("node2", 3)
    cluster.hold_gpu("node2", "dqalice", 0)
    cluster.run("node2", "dqalice", "screen -dmS s sleep 300; touch /tmp/marker", check=True)
    old = cluster.node_pid("node2")
    cluster.kill_node("node2")
    assert not cluster.node_alive("node2")
    assert not os.path.exists("/proc/%d" % old)
    t0 = time.monotonic()
    r = cluster.run("node1", "dqalice", ssh(cluster, "node2", "true"))
    assert r.returncode == 255 and time.monotonic() - t0 < 5
    with pytest.raises(ClusterError):
        cluster.run("node2", "dqalice", "true")
    cluster.start_node("node2")
    assert cluster.node_pid("node2") != old
    r = cluster.run("node1", "dqalice", ssh(cluster, "node2", "hostname; ls /tmp; screen -ls"))
    assert r.stdout.splitlines()[0] == "node2" and "marker" not in r.stdout
    assert "No Sockets" in r.stdout
    assert cluster.gpu_processes("node2") == []
    assert len(smi_gpus(cluster, "node2")) == 3           # set_gpus survives a reboot


def test_stop_sshd_hangs_new_connections(cluster):
    """Every sshd of the node stops (a hung host): new connections hang,
    and so does what open sessions send back, while the commands they
    started run on in the node."""
    long = cluster.popen("node1", "dqalice",
                         ssh(cluster, "node3", "sleep 1; touch /tmp/ran; echo still here"))
    time.sleep(0.5)
    cluster.stop_sshd("node3")
    try:
        t0 = time.monotonic()
        argv = ["ssh", "-o", "ConnectTimeout=1"] + shlex.split(cluster.ssh_command)[1:]
        r = cluster.run("node1", "dqalice", argv + ["node3", "true"], timeout=20)
        assert r.returncode == 255 and 0.9 < time.monotonic() - t0 < 10
        wait_for = time.monotonic() + 10
        while not os.path.exists(cluster._node("node3").path("/tmp/ran")):
            assert time.monotonic() < wait_for, "the session's command did not run on"
            time.sleep(0.1)
        time.sleep(1)
        assert long.poll() is None          # its output is held by the stopped sshd
    finally:
        cluster.cont_sshd("node3")
    out, _ = long.communicate(timeout=20)
    assert out == "still here\n"
    assert cluster.run("node1", "dqalice", ssh(cluster, "node3", "hostname")).stdout == "node3\n"


# ---------------------------------------------------------------- helpers, lifecycle

def test_user_dir(cluster):
    path = cluster.user_dir("dqbob", "a/b")
    assert path == os.path.join(cluster.base, "work", "dqbob", "a", "b")
    bob = cluster.run("node1", "dqbob", "id -u", check=True).stdout.strip()
    for p in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        assert str(os.stat(p).st_uid) == bob
    assert cluster.run("node2", "dqalice", ["touch", path + "/x"]).returncode != 0


def test_install_dq_with_a_stub(cluster):
    repo = os.path.join(cluster.base, "stub-repo")
    os.makedirs(repo)
    with open(os.path.join(repo, "dq.py"), "w") as f:
        f.write("#!/usr/bin/python3\nimport os, sys\n"
                "root = os.path.dirname(os.path.realpath(__file__))\n"
                "print(os.path.basename(sys.argv[0]), *sys.argv[1:])\n"
                "print(open(os.path.join(root, 'dq.conf')).read())\n"
                "open(os.path.join(root, 'made-by-' + os.environ['USER']), 'w').close()\n")
    root = install_dq(cluster, os.path.join(cluster.base, "dq", "stub"), repo=repo)
    d = DQInstall(cluster, root)
    r = d.run("node3", "dqalice", "submit", "--gpus", 2, "x y", check=True)
    lines = r.stdout.splitlines()
    assert lines[0] == "dq-submit --gpus 2 x y"
    assert lines[2] == "hosts = node1 node2 node3 node4"
    assert lines[3] == "ssh = " + cluster.ssh_command
    assert os.path.exists(os.path.join(root, "made-by-dqalice"))
    assert sorted(os.listdir(d.bin)) == sorted("dq-" + c for c in (
        "submit jobs kill hold release restart free schedule tail head logs grep attach shell report "
        "users on-all").split())


def test_dq_fixture(request, cluster):
    if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "dq.py")):
        pytest.skip("no dq.py yet")
    d = request.getfixturevalue("dq")
    assert d.root.startswith(cluster.base + "/")
    assert os.path.islink(d.path("submit")) or os.path.exists(d.path("submit"))
    assert "node4" in open(os.path.join(d.root, "dq.conf")).read()


def _leftovers(base):
    mine = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if base.encode() in open("/proc/%s/cmdline" % p, "rb").read():
                    mine.append(p)
            except OSError:
                pass
    return mine


def test_second_cluster_starts_and_stops_cleanly(cluster):
    """Runs beside the session cluster (other port), then leaves nothing behind."""
    t0 = time.monotonic()
    with Cluster(nodes=2, gpus=[1, 3], users=("dqalice", "dqbob", "dqcarol")) as c2:
        assert time.monotonic() - t0 < 10
        assert c2.port != cluster.port and c2.base.startswith(BASE_PARENT + "/")
        assert [len(smi_gpus(c2, h)) for h in c2.hosts] == [1, 3]
        c2.hold_gpu("node1", "dqcarol", 0)
        c2.run("node2", "dqcarol", "screen -dmS x sleep 300", check=True)
        base = c2.base
        assert _leftovers(base)
        session_holder = cluster.hold_gpu("node1", "dqcarol", 0) if "dqcarol" in cluster.users \
            else cluster.hold_gpu("node1", "dqalice", 0)
    assert not os.path.exists(base)
    assert _leftovers(base) == []
    # the session cluster's processes are untouched
    assert [p[1] for p in cluster.gpu_processes("node1")] == [session_holder]
    assert cluster.run("node1", "dqalice", ssh(cluster, "node2", "hostname")).stdout == "node2\n"


def test_fake_gpu_uuids_are_uuid5_of_host_and_index():
    """fakesmi.py and fake-cuda compute GPU UUIDs without the uuid module
    (start-up time); they must stay what uuid.uuid5 gives, in both tools."""
    import importlib.machinery
    import importlib.util
    import uuid
    fakedir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakegpu")

    def load(name, filename):
        loader = importlib.machinery.SourceFileLoader(name, os.path.join(fakedir, filename))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
        loader.exec_module(module)
        return module
    smi, cuda = load("fakesmi_t", "fakesmi.py"), load("fakecuda_t", "fake-cuda")
    for host in ("node1", "deep24"):
        for i in range(4):
            want = "GPU-%s" % uuid.uuid5(uuid.NAMESPACE_DNS, "%s.gpu%d.dq-test" % (host, i))
            assert smi.gpu_uuid(i, host) == want
    here = os.uname().nodename
    assert cuda.gpu_uuid(2) == smi.gpu_uuid(2, here) != smi.gpu_uuid(3, here)
