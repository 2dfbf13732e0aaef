"""A real Slurm cluster on top of the namespace test cluster (tests/cluster.py).

Test infrastructure only: dq itself is not involved. Needs root, the Debian
packages slurmctld, slurmd, slurm-client and munge (see .ci/run), and a
started `Cluster`. Python 3.9+ stdlib only.

How it is set up
----------------
Everything lives under <cluster.base>/slurm/ (world-traversable, configs
world-readable), so stop() and Cluster.stop() remove all of it:

    etc/slurm.conf, etc/gres.conf   SLURM_CONF for daemons, clients and jobs
    munge/                          our own munged: key, socket, pid, log, seed
    state/                          slurmctld's StateSaveLocation
    spool/nodeN/                    each slurmd's SlurmdSpoolDir
    log/                            slurmctld.log, slurmd-nodeN.log, *.out,
                                    jobcomp.txt (jobcomp/filetxt, for `sacct -c`)
    dev/fakegpu0..K                 GRES "devices" (mknod c 1 3, i.e. /dev/null)

- munged: a private one (`munged -F --socket=<base>/slurm/munge/munge.socket`
  with its own key, run as the munge user), not the system's /run/munge, so
  that it can't collide with another munged on the machine. slurm.conf's
  `AuthInfo=socket=...` points auth/munge and cred/munge at it, so clients
  (sbatch as dqalice on node1), daemons and jobs all find it through
  SLURM_CONF. The socket is under the shared filesystem: node namespaces see
  it (their /run is shared too, except /run/screen and /run/fakegpu).
- slurmctld runs in the host namespaces (`slurmctld -D`, own session),
  listening on a free port (first of 17817.. whose whole block is free), and
  SlurmctldHost=<this machine's hostname>(127.0.0.1).
- one slurmd per Slurm node, *inside* that node's UTS, mount and pid
  namespaces: `nsenter -t <node pid> -u -m -p -- slurmd -D -f slurm.conf`.
  The network namespace is shared, so each node has its own `Port=` (the
  next ports of the block) and `NodeAddr=127.0.0.(N+1)`; slurmd finds its
  NodeName from its hostname (NodeHostname=nodeN). A job therefore sees the
  node's hostname, its fake nvidia-smi in /usr/local/bin, its private /tmp
  and /run/screen: a `screen -dmS x` started by a job is listed by
  `screen -ls` in a login (ssh or Cluster.run) to that node.
  `SlurmdParameters=config_overrides` lets a 2-core machine claim CPUs=8 per
  node. Gres=gpu:<the node's configured GPU count>, gres.conf maps them to
  dev/fakegpu[0-K], so Slurm sets CUDA_VISIBLE_DEVICES=0,1... (which the fake
  GPUs understand).
- scheduling is tuned for fast tests: batch_sched_delay=0, KillWait=2,
  MinJobAge=10, SlurmdTimeout=10, ReturnToService=2; no accounting daemon
  (accounting_storage/none; `sacct -c` reads jobcomp.txt).

Timings (2-core Debian 12 VM, slurm-wlm 22.05.8; `pytest -s
tests/test_slurm_cluster.py` prints some; the whole file takes ~21 s):
    start: munged + slurmctld + 4 slurmd up, all nodes idle     0.07-0.11 s
    start: until the main scheduler has run once (the default)   ~3.0 s
    stop (cancel the jobs, TERM the daemons, all gone)          0.10-0.16 s
    sbatch round trip                                           ~12 ms
    submit to script start                 0.04-1.0 s (next 1 s scheduler tick;
                                           the launch itself takes ~20 ms)
    scancel of a running job to the queued job done              0.07 s
    dependency: 1 s parent submitted, to its afterok child done  ~2.9 s
    reset() with nothing to do                                  ~15 ms
    Cluster.reset() + reset() after Cluster.kill_node            0.33 s
    start_slurmd after kill_slurmd (node responding again)       0.02 s

Interplay with Cluster
----------------------
- Cluster.kill_user_processes() / reset() kill test-user processes in the
  nodes: that includes job processes (the job then ends FAILED or
  CANCELLED), but not slurmd/slurmstepd (root). Daemonized job children
  (screen -dmS) escape Slurm's proctrack/linuxproc and outlive their job;
  Cluster.reset() kills them.
- Cluster.kill_node(host) kills the node's slurmd and slurmstepds (all in
  the node's pid namespace); after Cluster.start_node(host),
  start_slurmd(host) starts a new slurmd in the new namespaces (reset()
  does that for every node whose slurmd is gone).
- conftest's `slurm` fixture calls Cluster.reset() then SlurmCluster.reset()
  after each test that used it.

Pitfalls met
------------
- slurmctld's main scheduler first runs ~3 s after slurmctld starts, then on
  a 1 s tick (batch_sched_delay=0 only removes the default 3 s batching): a
  job submitted earlier waits for it. start() waits for that first run; it
  is the "SchedulerParameters=..." line in slurmctld.log (read only past the
  old end of the log: a restart in the same dir appends to it).
- Every client needs SLURM_CONF (no /etc/slurm/slurm.conf here); without it:
  "fetch_config: DNS SRV lookup failed ... Could not establish a
  configuration source". run() and .env set it; jobs inherit it (srun
  inside a batch job works).
- slurmd started by `nsenter -p` is nsenter's *child*: nsenter must fork to
  enter a pid namespace. Its host pid is looked up among nsenter's children;
  signals go to it, not to nsenter.
- A SIGTERMed or killed slurmd leaves its running slurmstepds and their jobs
  behind (a restarted slurmd takes them over: the job completes normally).
  stop() cancels all jobs first, then kills remaining slurmstepds in our
  nodes' pid namespaces. slurmctld's child slurmscriptd exits with it.
- setsid'ed daemons survive a killed test run (no atexit); start() kills
  stale daemons whose command line names a dq-cluster base dir whose owner
  is gone (Cluster's own stale cleanup only kills sshd/unshare, which takes
  the slurmds with the nodes, but not slurmctld or munged).
- `sacct -c` works only as root (root_run): slurmctld fchmods jobcomp.txt to
  0644 and sacct opens it for writing ("sacct: fatal: open ...jobcomp.txt:
  Permission denied" as a user), like on a real cluster without slurmdbd.
- Slurm's GPU count per node is fixed at start (the node's configured count):
  Cluster.set_gpus changes only what nvidia-smi reports.
- A job's daemonized children (screen -dmS) escape proctrack/linuxproc and
  outlive the job and scancel; Cluster.reset()/kill_user_processes kill them.
- The node's /run is the host's (only /run/screen and /run/fakegpu are
  private), so the system /run/munge socket would be reachable too; a private
  munged with its own socket and key avoids sharing one with anything else on
  the machine (AuthInfo=socket=... serves auth/munge and cred/munge).
- The spool dir of each node is made before slurmd starts (else "Domain
  socket directory ... No such file or directory").
- Harmless log noise: "mpi/pmix_v4: ... can not load PMIx library", "Could
  not open ... state file" on the first start, "Node configuration differs
  from hardware" (CPUs=8 on 2 cores, allowed by config_overrides).

Use
---
    s = SlurmCluster(cluster, nodes=None, cpus=8, conf=None).start()  # or `with`
    s.conf, s.env                    # slurm.conf path, {"SLURM_CONF": path}
    s.run(host, user, cmd)           # Cluster.run with SLURM_CONF set
    s.sbatch(host, user, *args, cwd=None) -> job id   (--parsable)
    s.root_run(cmd)                  # client command as root, host namespaces
    s.squeue(fmt="%i %T %r"), s.squeue_ids(), s.job_state(id), s.wait_state(id, states)
    s.node_states(), s.wait_idle()
    s.kill_slurmd(host, sig=SIGKILL), s.start_slurmd(host), s.slurmd_pid(host)
    s.cancel_all(), s.reset(), s.stop(), s.logs()
In tests: the session fixture `slurm` (tests/conftest.py).
"""
import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

from cluster import (BASE_PARENT, BASE_PREFIX, ClusterError, CommandFailed, _children,
                     _can_bind, _host_pids, _pid_alive, _read, _read_bytes)

REQUIRED_SLURM = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel",
                  "munged", "munge", "unmunge")
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
FIRST_PORT = 17817
PARTITION = "gpu"
# sinfo %t states in which a node takes jobs (no '*': its slurmd answers)
UP_STATES = ("idle", "mix", "alloc", "comp")


def slurm_unavailable_reason():
    """Why SlurmCluster cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "Slurm tests need root"
    missing = [t for t in REQUIRED_SLURM
               if not shutil.which(t, path=SBIN_PATH)]
    if missing:
        return ("Slurm tests need missing tools: %s (apt-get install slurmctld slurmd "
                "slurm-client munge)" % ", ".join(missing))
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "Slurm tests need the munge user (Debian's munge package)"
    return None


def _free_block(count):
    """First port >= FIRST_PORT with `count` consecutive ports free (0.0.0.0:
    slurmctld and slurmd listen on every address)."""
    for port in range(FIRST_PORT, FIRST_PORT + 2000, 10):
        if all(_can_bind("0.0.0.0", p) for p in range(port, port + count)):
            return port
    raise ClusterError("no free block of %d ports from %d" % (count, FIRST_PORT))


def _comm(pid):
    return (_read("/proc/%d/comm" % pid) or "").strip()


def _pidns(pid):
    try:
        return os.readlink("/proc/%d/ns/pid" % pid)
    except OSError:
        return None


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_pid(pid, proc=None, timeout=10):
    """SIGTERM, then SIGKILL after `timeout`; reaps `proc` (the Popen) if given."""
    if pid is None:
        return
    _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        time.sleep(0.01)
    if _pid_alive(pid):
        _kill(pid, signal.SIGKILL)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def cleanup_stale_slurm():
    """Kill Slurm daemons and munged left by killed test runs: their command
    lines name a dq-cluster base dir whose owner process is gone."""
    marker = os.path.join(BASE_PARENT, BASE_PREFIX).encode()
    for pid in _host_pids():
        if _comm(pid) not in ("slurmctld", "slurmd", "munged", "nsenter"):
            continue
        cmdline = _read_bytes("/proc/%d/cmdline" % pid) or b""
        i = cmdline.find(marker)
        if i < 0 or b"/slurm/" not in cmdline:
            continue
        base = cmdline[i:].split(b"\0")[0].decode(errors="replace").split("/slurm/")[0]
        owner = (_read(os.path.join(base, "owner"), "") or "").strip()
        if os.path.isdir(base) and (not owner or (owner.isdigit() and _pid_alive(int(owner)))):
            continue
        for kid in _children(pid) if _comm(pid) == "nsenter" else ():
            _kill(kid, signal.SIGKILL)
        _kill(pid, signal.SIGKILL)


SLURM_CONF = """\
# written by tests/slurmcluster.py
ClusterName=dqtest
SlurmctldHost={ctld_host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
MailProg=/bin/true
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu,shard
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
"""

DEFAULTS = {
    "SchedulerParameters": "batch_sched_delay=0,enable_user_top",
    "SlurmdTimeout": "10",
    "ReturnToService": "2",
    "KillWait": "2",
    "MinJobAge": "10",
    "InactiveLimit": "0",
}


class SlurmCluster:
    """slurmctld + one slurmd per node (in the node's namespaces) + munged.

    cluster: a started tests/cluster.py Cluster.
    nodes: which of cluster.hosts become Slurm nodes (default all); each gets
        Gres=gpu:<its configured GPU count> and `cpus` CPUs; the last one's
        GPUs are also shared out as shards, one per GiB of each (gres shard,
        for dq's DQ_MEM: node4's four 11 GB GPUs give shard:44).
    conf: extra or overriding slurm.conf settings, e.g.
        {"SchedulerParameters": "batch_sched_delay=0,kill_invalid_depend"}.
    """

    def __init__(self, cluster, nodes=None, cpus=8, conf=None):
        self.cluster = cluster
        self.nodes = list(nodes or cluster.hosts)
        for host in self.nodes:
            if host not in cluster.hosts:
                raise ValueError("unknown host %r (have %s)" % (host, cluster.hosts))
        self.cpus = cpus
        # the last node's GPUs are also shared out as shards, one per GiB of
        # each (gres shard, as dq's README advises for DQ_MEM)
        self.shard_node = self.nodes[-1]
        self.settings = dict(DEFAULTS, **(conf or {}))
        self.dir = os.path.join(cluster.base, "slurm")
        self.etc = os.path.join(self.dir, "etc")
        self.conf = os.path.join(self.etc, "slurm.conf")
        self.gres_conf = os.path.join(self.etc, "gres.conf")
        self.logdir = os.path.join(self.dir, "log")
        self.munge_dir = os.path.join(self.dir, "munge")
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        self.env = {"SLURM_CONF": self.conf}
        self.partition = PARTITION
        self.port = None            # slurmctld's; node i (1-based in self.nodes) has port + i
        self.gpus = {}              # host -> GPU count given to Slurm
        self._munged = None
        self._ctld = None
        self._slurmd = {}           # host -> (nsenter Popen, slurmd host pid, node pid)
        self._started = False

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout=30, wait_scheduler=True):
        """Start munged, slurmctld and the slurmds; wait until every node is
        idle and (wait_scheduler) slurmctld's main scheduler has run once:
        it first runs ~3 s after slurmctld starts, so without the wait the
        first job waits that long."""
        reason = slurm_unavailable_reason()
        if reason:
            raise ClusterError(reason)
        t0 = time.monotonic()
        cleanup_stale_slurm()
        self._started = True
        atexit.register(self.stop)
        try:
            self._make_dirs()
            self.port = _free_block(len(self.nodes) + 1)
            self._write_configs()
            self._start_munged()
            self._start_ctld(t0 + timeout)
            for host in self.nodes:
                self._spawn_slurmd(host)
            self.wait_idle(timeout=max(1, t0 + timeout - time.monotonic()))
            self.daemons_seconds = time.monotonic() - t0
            if wait_scheduler:
                self._wait_scheduler(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self):
        """Cancel all jobs, stop slurmd's (and leftover slurmstepds), slurmctld,
        munged. Leaves the files (under cluster.base) for Cluster.stop()."""
        if not self._started:
            return
        self._started = False
        t0 = time.monotonic()
        try:
            if self._ctld is not None and self._ctld.poll() is None and self._slurmd:
                self.cancel_all(timeout=5, check=False)
        finally:
            for host in list(self._slurmd):
                self._stop_slurmd(host, signal.SIGTERM)
            self._kill_stepds()
            if self._ctld is not None:
                _stop_pid(self._ctld.pid, self._ctld)
                self._ctld = None
            if self._munged is not None:
                _stop_pid(self._munged.pid, self._munged)
                self._munged = None
            try:
                atexit.unregister(self.stop)
            except Exception:
                pass
        self.stop_seconds = time.monotonic() - t0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _make_dirs(self):
        for d in ("", "etc", "state", "run", "log", "dev", "spool"):
            os.makedirs(os.path.join(self.dir, d), mode=0o755, exist_ok=True)
            os.chmod(os.path.join(self.dir, d), 0o755)
        for host in self.nodes:
            os.makedirs(os.path.join(self.dir, "spool", host), mode=0o755, exist_ok=True)
        most = max([self.cluster._node(h).gpus_configured for h in self.nodes] + [0])
        for i in range(most):
            dev = os.path.join(self.dir, "dev", "fakegpu%d" % i)
            if not os.path.exists(dev):
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
                os.chmod(dev, 0o666)

    def _write_configs(self):
        lines = [SLURM_CONF.format(ctld_host=socket.gethostname().split(".")[0],
                                   ctld_port=self.port, slurmd_port=self.port + 1,
                                   munge_socket=self.munge_socket, dir=self.dir)]
        lines += ["%s=%s" % kv for kv in self.settings.items()]
        gres = ["# written by tests/slurmcluster.py"]
        for i, host in enumerate(self.nodes, 1):
            node = self.cluster._node(host)
            gpus = self.gpus[host] = node.gpus_configured
            line = ("NodeName={h} NodeHostname={h} NodeAddr={a} Port={p} CPUs={c} Boards=1 "
                    "SocketsPerBoard=1 CoresPerSocket={c} ThreadsPerCore=1 RealMemory=4000 "
                    "State=UNKNOWN").format(h=host, a=node.addr, p=self.port + i, c=self.cpus)
            if gpus:
                line += " Gres=gpu:%d" % gpus
                files = os.path.join(self.dir, "dev", "fakegpu")
                files += "0" if gpus == 1 else "[0-%d]" % (gpus - 1)
                gres.append("NodeName=%s Name=gpu File=%s" % (host, files))
                if host == self.shard_node:     # GPU sharing (dq's DQ_MEM): a shard per GiB
                    count = gpus * (node.model_configured[1] // 1024)
                    line += ",shard:%d" % count
                    gres.append("NodeName=%s Name=shard Count=%d" % (host, count))
            lines.append(line)
        lines.append("PartitionName=%s Nodes=%s Default=YES MaxTime=INFINITE State=UP"
                     % (PARTITION, ",".join(self.nodes)))
        for path, text in ((self.conf, "\n".join(lines) + "\n"),
                           (self.gres_conf, "\n".join(gres) + "\n")):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o644)

    # ------------------------------------------------------------ daemons

    def _start_munged(self):
        pw = pwd.getpwnam("munge")
        os.makedirs(self.munge_dir, mode=0o755, exist_ok=True)
        os.chown(self.munge_dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.munge_dir, 0o755)      # clients connect to the socket in it
        key = os.path.join(self.munge_dir, "munge.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(1024))
        finally:
            os.close(fd)
        os.chown(key, pw.pw_uid, pw.pw_gid)
        log = open(os.path.join(self.logdir, "munged.out"), "ab")
        try:
            self._munged = subprocess.Popen(
                ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
                 "--init-groups", "--", "munged", "-F",
                 "--socket=" + self.munge_socket, "--key-file=" + key,
                 "--pid-file=" + os.path.join(self.munge_dir, "munged.pid"),
                 "--seed-file=" + os.path.join(self.munge_dir, "munged.seed"),
                 "--log-file=" + os.path.join(self.munge_dir, "munged.log")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                env={"PATH": SBIN_PATH, "LANG": "C.UTF-8"}, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run("munge -S %s -n | unmunge -S %s" % ((self.munge_socket,) * 2),
                               shell=True, capture_output=True, text=True,
                               env={"PATH": SBIN_PATH})
            if r.returncode == 0:
                return
            if self._munged.poll() is not None or time.monotonic() > deadline:
                raise ClusterError("munged did not start: %s\n%s" % (
                    r.stderr.strip(), self._tail(os.path.join(self.munge_dir, "munged.log"))
                    + self._tail(os.path.join(self.logdir, "munged.out"))))
            time.sleep(0.01)

    def _start_ctld(self, deadline):
        try:        # a restart in the same dir appends to the old log
            self._ctld_log_start = os.path.getsize(os.path.join(self.logdir, "slurmctld.log"))
        except OSError:
            self._ctld_log_start = 0
        log = open(os.path.join(self.logdir, "slurmctld.out"), "ab")
        try:
            self._ctld = subprocess.Popen(
                ["slurmctld", "-D", "-f", self.conf], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, cwd="/", start_new_session=True,
                env={"PATH": SBIN_PATH, "LANG": "C.UTF-8", "SLURM_CONF": self.conf})
        finally:
            log.close()
        while True:
            r = self.root_run(["scontrol", "ping"], timeout=10)
            if "UP" in r.stdout:
                return
            if self._ctld.poll() is not None or time.monotonic() > deadline:
                raise ClusterError("slurmctld did not come up: %s\n%s" % (
                    (r.stdout + r.stderr).strip(),
                    self._tail(os.path.join(self.logdir, "slurmctld.log"))
                    + self._tail(os.path.join(self.logdir, "slurmctld.out"))))
            time.sleep(0.02)

    def _wait_scheduler(self, deadline):
        """slurmctld logs its SchedulerParameters when the main scheduler
        first runs (~3 s after it starts); until then no batch job starts."""
        log = os.path.join(self.logdir, "slurmctld.log")
        while "SchedulerParameters=" not in (_read(log, "") or "")[self._ctld_log_start:]:
            if self._ctld.poll() is not None or time.monotonic() > deadline:
                raise ClusterError("slurmctld's scheduler did not run\n" + self._tail(log))
            time.sleep(0.02)

    def _spawn_slurmd(self, host):
        node_pid = self.cluster.node_pid(host)
        log = open(os.path.join(self.logdir, "slurmd-%s.out" % host), "ab")
        try:
            proc = subprocess.Popen(
                ["nsenter", "-t", str(node_pid), "-u", "-m", "-p", "--",
                 "slurmd", "-D", "-f", self.conf], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, cwd="/", start_new_session=True,
                env={"PATH": SBIN_PATH, "LANG": "C.UTF-8", "SLURM_CONF": self.conf})
        finally:
            log.close()
        pid = None
        deadline = time.monotonic() + 10
        while pid is None:
            kids = _children(proc.pid)
            if kids:
                pid = kids[0]
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError("slurmd on %s did not start (rc %s)\n%s" % (
                    host, proc.poll(), self._slurmd_log(host)))
            else:
                time.sleep(0.005)
        self._slurmd[host] = (proc, pid, node_pid)

    def slurmd_pid(self, host):
        """Host pid of the node's slurmd, or None if it is not running."""
        entry = self._slurmd.get(host)
        if entry is None:
            return None
        proc, pid, node_pid = entry
        proc.poll()
        if not _pid_alive(pid):
            return None
        return pid

    def _stop_slurmd(self, host, sig):
        entry = self._slurmd.pop(host, None)
        if entry is None:
            return
        proc, pid, _ = entry
        if sig == signal.SIGKILL:
            _kill(pid, sig)
        else:
            _stop_pid(pid, timeout=10)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _kill_stepds(self):
        """SIGKILL slurmstepds in our nodes' pid namespaces (jobs that outlived
        their slurmd); their jobs' processes die with them or get reparented."""
        namespaces = set()
        for host in self.nodes:
            if self.cluster.node_alive(host):
                namespaces.add(_pidns(self.cluster.node_pid(host)))
        namespaces.discard(None)
        for pid in _host_pids():
            if _comm(pid) == "slurmstepd" and _pidns(pid) in namespaces:
                _kill(pid, signal.SIGKILL)

    def kill_slurmd(self, host, sig=signal.SIGKILL):
        """Kill the node's slurmd (default SIGKILL: a crash). Its running jobs'
        slurmstepds live on, as on a real node. slurmctld notices after
        SlurmdTimeout (10 s): the node becomes `*` (not responding), then down."""
        self._stop_slurmd(host, sig)

    def start_slurmd(self, host, timeout=20):
        """(Re)start the node's slurmd in its current namespaces (after
        Cluster.start_node too) and wait until slurmctld hears from it."""
        if self.slurmd_pid(host) is not None:
            if self._slurmd[host][2] == self.cluster.node_pid(host):
                return
        self._stop_slurmd(host, signal.SIGKILL)
        self._spawn_slurmd(host)
        deadline = time.monotonic() + timeout
        while True:
            state = self.node_states().get(host, "")
            if state in UP_STATES or state.startswith("drain"):
                return
            if self.slurmd_pid(host) is None or time.monotonic() > deadline:
                raise ClusterError("slurmd on %s did not register (state %r)\n%s" % (
                    host, state, self._slurmd_log(host)))
            time.sleep(0.02)

    # ------------------------------------------------------------ commands

    def root_run(self, cmd, timeout=30, check=False):
        """Run a Slurm client command as root in the host namespaces."""
        shell = isinstance(cmd, str)
        try:
            r = subprocess.run(cmd, shell=shell, capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL,
                               env={"PATH": SBIN_PATH, "LANG": "C.UTF-8",
                                    "SLURM_CONF": self.conf})
        except subprocess.TimeoutExpired as e:
            if check:
                raise
            return subprocess.CompletedProcess(cmd, 124, e.stdout or "", e.stderr or "")
        if check and r.returncode != 0:
            raise CommandFailed(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def run(self, host, user, cmd, *, env=None, cwd=None, timeout=60, check=False, input=None):
        """Run `cmd` (a Slurm client command, or any) as `user` on `host` with
        SLURM_CONF set (Cluster.run: nsenter + setpriv, a login-like env)."""
        env = dict(self.env, **(env or {}))
        return self.cluster.run(host, user, cmd, env=env, cwd=cwd, timeout=timeout,
                                check=check, input=input)

    def sbatch(self, host, user, *args, cwd=None, env=None):
        """`sbatch --parsable args...` as user on host; returns the job id (str,
        "12" or "12;dqtest")."""
        r = self.run(host, user, ["sbatch", "--parsable"] + [str(a) for a in args],
                     cwd=cwd, env=env, check=True)
        return r.stdout.strip().split(";")[0]

    def squeue(self, fmt="%i %T %r", *args):
        """`squeue -h -o FMT args...` lines (as root; all users' jobs)."""
        r = self.root_run(["squeue", "-h", "-o", fmt] + list(args), check=True)
        return [line for line in r.stdout.splitlines() if line.strip()]

    def squeue_ids(self):
        """Ids of the jobs in the queue (pending, running, completing...), as
        squeue prints them (array tasks as 12_3 or 12_[4-7])."""
        return [line.strip() for line in self.squeue("%i")]

    def job_state(self, jobid):
        """State of a job (PENDING, RUNNING, COMPLETED, ...) while slurmctld
        still knows it (MinJobAge after its end), else None."""
        r = self.root_run(["scontrol", "-o", "show", "job", str(jobid)])
        for field in r.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    def wait_state(self, jobid, states, timeout=30):
        """Wait until job_state(jobid) is one of `states`; returns it."""
        if isinstance(states, str):
            states = (states,)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(jobid)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise ClusterError("job %s is %s after %ss, not %s" % (
                    jobid, state, timeout, "/".join(states)))
            time.sleep(0.05)

    def node_states(self):
        """{node: sinfo state (%t: idle, mix, alloc, idle*, down*, drain...)}."""
        r = self.root_run(["sinfo", "-h", "-N", "-o", "%N %t"])
        out = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def wait_idle(self, timeout=30):
        """Wait until every Slurm node is idle (and its slurmd answers)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.node_states()
            if all(states.get(h) == "idle" for h in self.nodes):
                return
            if time.monotonic() > deadline:
                raise ClusterError("Slurm nodes not idle after %ss: %s\n%s" % (
                    timeout, states, self._tail(os.path.join(self.logdir, "slurmctld.log"))))
            time.sleep(0.02)

    def cancel_all(self, timeout=30, check=True):
        """scancel every job and wait until the queue is empty."""
        deadline = time.monotonic() + timeout
        while True:
            ids = self.squeue_ids()
            if not ids:
                return
            if time.monotonic() > deadline:
                if check:
                    raise ClusterError("jobs still queued after scancel: %s" % self.squeue())
                return
            pending_or_running = [i.split("_")[0] for i in ids]
            self.root_run(["scancel", "--quiet"] + sorted(set(pending_or_running)))
            time.sleep(0.05)

    def stale(self):
        """Is a node's slurmd gone (killed, or its node restarted by another
        test since)?  Then reset() before using the cluster."""
        for host in self.nodes:
            entry = self._slurmd.get(host)
            if (not self.cluster.node_alive(host) or self.slurmd_pid(host) is None
                    or entry is None or entry[2] != self.cluster.node_pid(host)):
                return True
        return False

    def reset(self, timeout=30):
        """Between tests: restart missing slurmds (also after Cluster.start_node),
        cancel every job, resume drained/down nodes, wait for an empty queue
        and idle nodes. Call after Cluster.reset()."""
        for host in self.nodes:
            if not self.cluster.node_alive(host):
                self.cluster.start_node(host)
            entry = self._slurmd.get(host)
            if (self.slurmd_pid(host) is None or entry is None
                    or entry[2] != self.cluster.node_pid(host)):
                self.start_slurmd(host)
        self.cancel_all(timeout=timeout)
        for host, state in self.node_states().items():
            if host in self.nodes and state.rstrip("*~#!%$@^-") not in UP_STATES:
                self.root_run(["scontrol", "update", "nodename=" + host, "state=resume"])
        self.wait_idle(timeout=timeout)

    # ------------------------------------------------------------ diagnostics

    def _tail(self, path, n=30):
        text = _read(path, "") or ""
        return "--- %s (last %d lines):\n%s\n" % (path, n, "\n".join(text.splitlines()[-n:]))

    def _slurmd_log(self, host):
        return (self._tail(os.path.join(self.logdir, "slurmd-%s.log" % host))
                + self._tail(os.path.join(self.logdir, "slurmd-%s.out" % host)))

    def logs(self):
        """The tails of every daemon log (for failing tests' messages)."""
        out = self._tail(os.path.join(self.logdir, "slurmctld.log"))
        for host in self.nodes:
            out += self._slurmd_log(host)
        return out
