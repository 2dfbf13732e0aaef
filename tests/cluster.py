"""A "cluster in a box" for dq's end-to-end tests.

Each node is a set of Linux namespaces (UTS + mount + pid) made with
`unshare`, running a real sshd on its own loopback address. Real Unix users
(dqalice, dqbob, ...) log in with real ssh keys, run real `screen`, and see a
fake `nvidia-smi` that is the only stand-in. The network namespace and
(almost) the whole filesystem are shared between nodes, like hosts on a LAN
with NFS homes; only /tmp, /run/screen, /run/fakegpu and /usr/local/bin are
private to each node.

Needs root. Python 3.9+ stdlib only.
"""
import atexit
import fcntl
import os
import pwd
import py_compile
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
FAKEGPU_DIR = os.path.join(TESTS_DIR, "fakegpu")
FAKE_TOOLS = ("fakesmi.py", "nvidia-smi", "fake-cuda")
BASE_PARENT = "/var/tmp"          # must not be /tmp: /tmp is private per node
BASE_PREFIX = "dq-cluster-"
GLOBAL_LOCK = "/var/tmp/dq-cluster.lock"
FIRST_PORT = 2222
SMALL_FS_KIB = 16384     # the size of Cluster.small
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
SMI_MODES = ("ok", "fail", "hang", "missing", "nodevices", "na")
DEFAULT_MODEL = ("NVIDIA H100 80GB HBM3", 81559)     # what nvidia-smi says of an H100
DQ_COMMANDS = ("submit", "jobs", "kill", "hold", "release", "restart", "free", "schedule",
               "tail", "head", "logs", "grep", "attach", "shell", "users", "on-all", "report")
REQUIRED_TOOLS = ("unshare", "nsenter", "setpriv", "/usr/sbin/sshd", "ssh",
                  "ssh-keygen", "screen", "useradd", "usermod", "/usr/bin/python3")

# Runs as PID 1 of the node's fresh namespaces, then becomes its sshd.
NODE_INIT = r"""#!/bin/sh
# usage: node-init.sh NAME BINDIR GPUS SSHD_CONFIG GPU_NAME GPU_MEM_MIB
set -e
umask 022
name=$1 bindir=$2 gpus=$3 config=$4 gpu_name=$5 gpu_mem=$6
hostname "$name"
mount --make-rprivate /
mount -t tmpfs -o mode=1777 "tmp-$name" /tmp
mount -t tmpfs -o mode=1777 "screen-$name" /run/screen
mount -t tmpfs -o mode=1777 "fakegpu-$name" /run/fakegpu
mkdir -m 1777 /run/fakegpu/holders
echo "$gpus" > /run/fakegpu/gpus
printf '%s\n%s\n' "$gpu_name" "$gpu_mem" > /run/fakegpu/model
echo ok > /run/fakegpu/mode
mount --bind "$bindir" /usr/local/bin
exec /usr/sbin/sshd -D -e -f "$config"
"""

SSHD_CONFIG = """\
ListenAddress {addr}
Port {port}
HostKey {hostkey}
PidFile none
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AuthorizedKeysFile .ssh/authorized_keys {keys}/authorized_keys.%u
StrictModes no
MaxSessions 100
MaxStartups 100:30:200
LogLevel ERROR
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
Subsystem sftp internal-sftp
"""

# Launches a detached process inside a node and prints its (node-side) pid.
DETACH = ("import subprocess, sys; d = subprocess.DEVNULL; "
          "print(subprocess.Popen(sys.argv[1:], stdin=d, stdout=d, stderr=d, "
          "start_new_session=True).pid)")


class ClusterError(RuntimeError):
    pass


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the output (for test logs)."""

    def __str__(self):
        return "%s\n--- stdout:\n%s\n--- stderr:\n%s" % (
            super().__str__(), self.stdout, self.stderr)


def unavailable_reason():
    """Why the cluster cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "cluster tests need root (namespaces, sshd, test users)"
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)]
    if missing:
        return "cluster tests need missing tools: " + ", ".join(missing)
    probe = subprocess.run(
        ["unshare", "--uts", "--mount", "--pid", "--fork", "--kill-child",
         "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "cluster tests cannot create namespaces: " + probe.stderr.strip()
    return None


# ---------------------------------------------------------------- /proc helpers

def _read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _proc_status(pid):
    """(real uid, state letter, pid-ns link) of a host pid, or None if gone."""
    status = _read("/proc/%d/status" % pid)
    if status is None:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        ns = os.readlink("/proc/%d/ns/pid" % pid)
    except OSError:
        return None
    return int(fields["Uid"].split()[0]), fields["State"].split()[0], ns


def _host_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _children(pid):
    out = []
    for p in _host_pids():
        stat = _read("/proc/%d/stat" % p, "")
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(p)
    return out


def _pid_alive(pid):
    stat = _read("/proc/%d/stat" % pid)
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _write_atomic(path, text):
    """Readers (a concurrent nvidia-smi) never see a half-written file."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def _empty_dir(path):
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


class _GlobalLock:
    """Serialises user setup and port choice between concurrent clusters."""

    def __enter__(self):
        self.fd = os.open(GLOBAL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


# ---------------------------------------------------------------- nodes

class Node:
    """Book-keeping for one node; `pid` is the host pid of its init (sshd)."""

    def __init__(self, cluster, index, gpus, model):
        self.name = "node%d" % index
        self.index = index
        self.addr = "127.0.0.%d" % (index + 1)
        self.dir = os.path.join(cluster.base, "nodes", self.name)
        self.bindir = os.path.join(self.dir, "bin")
        self.log = os.path.join(self.dir, "sshd.log")
        self.config = os.path.join(self.dir, "sshd_config")
        self.hostkey = os.path.join(self.dir, "ssh_host_ed25519_key")
        self.gpus_configured = gpus
        self.gpus = gpus
        self.model_configured = self.model = model     # (nvidia-smi name, MiB)
        self.proc = None        # the host-side `unshare` process
        self.pid = None         # its child: PID 1 of the node

    def path(self, inside):
        """Host path of a path as seen inside the node (its mount ns)."""
        return "/proc/%d/root%s" % (self.pid, inside)

    def alive(self):
        return (self.proc is not None and self.pid is not None
                and self.proc.poll() is None and _pid_alive(self.pid))


class Cluster:
    """Several namespace "nodes" with sshd, screen, test users and fake GPUs.

    gpus: GPUs per node, an int or a list with one count per node.
    models: the GPUs' model per node, (nvidia-smi name, memory.total in MiB),
    one for all nodes or a list with one per node (default an H100 80GB).
    """

    def __init__(self, nodes=4, gpus=4, users=("dqalice", "dqbob"), models=None):
        if isinstance(gpus, int):
            gpus = [gpus] * nodes
        if len(gpus) != nodes:
            raise ValueError("gpus must be an int or a list of %d counts" % nodes)
        models = models or DEFAULT_MODEL
        if isinstance(models, tuple):
            models = [models] * nodes
        if len(models) != nodes:
            raise ValueError("models must be one (name, MiB) or a list of %d" % nodes)
        self._models = list(models)
        self.users = tuple(users)
        self.base = os.path.join(BASE_PARENT, BASE_PREFIX + secrets.token_hex(4))
        self.keys = os.path.join(self.base, "keys")
        self.port = None
        self.hosts = ["node%d" % i for i in range(1, nodes + 1)]
        self._gpus = list(gpus)
        self._nodes = {}
        self._started = False
        self.ssh_config = os.path.join(self.base, "ssh_config")
        self.ssh_command = "ssh -F %s -o BatchMode=yes -o ConnectTimeout=5" % self.ssh_config
        self.root_key = os.path.join(self.keys, "root_ed25519")
        self.root_ssh_command = "%s -i %s" % (self.ssh_command, self.root_key)
        self.readonly_dirs = {}     # host -> [paths made read-only there]
        # A small filesystem every node sees (mounted before they start): a
        # data root there can be filled up (a quota, a full NFS export).
        self.small = os.path.join(self.base, "small")

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout=30):
        """Create users, keys and configs, boot all nodes in parallel."""
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        t0 = time.monotonic()
        cleanup_stale_clusters()
        self._started = True
        atexit.register(self.stop)
        try:
            with _GlobalLock():
                for user in self.users:
                    ensure_user(user)
                self._make_base()
                self.port = self._free_port()
                self._write_configs()
                for host in self.hosts:
                    self._spawn(self._nodes[host])
                self._wait_listening(list(self._nodes.values()), t0 + timeout)
            self._check_logins(list(self._nodes.values()))
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self):
        """Kill every node, sshd and test-user process; remove the base dir."""
        if not self._started:
            return
        self._started = False
        for node in self._nodes.values():
            if node.alive():
                os.kill(node.pid, signal.SIGCONT)
        try:
            self.kill_user_processes()
        finally:  # killing the nodes kills whatever survived anyway
            for host in self._nodes:
                self.kill_node(host)
            subprocess.run(["umount", "-l", self.small], capture_output=True)
            shutil.rmtree(self.base, ignore_errors=True)
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _make_base(self):
        os.makedirs(self.keys, mode=0o700)
        os.chmod(self.base, 0o755)
        os.chmod(self.keys, 0o755)      # dir traversable; private keys 0600
        for d in ("work", "dq"):
            os.makedirs(os.path.join(self.base, d), mode=0o755)
        with open(os.path.join(self.base, "owner"), "w") as f:
            f.write("%d\n" % os.getpid())
        os.makedirs(self.small, mode=0o755)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dk,mode=755" % SMALL_FS_KIB,
                        "dq-small", self.small], check=True, capture_output=True)
        for d in ("/run/sshd", "/run/fakegpu", "/run/screen"):
            os.makedirs(d, exist_ok=True)
        os.chmod("/run/sshd", 0o755)
        init = os.path.join(self.base, "node-init.sh")
        with open(init, "w") as f:
            f.write(NODE_INIT)
        os.chmod(init, 0o755)
        _keygen(self.root_key, "root@dq-cluster")
        shutil.copy(self.root_key + ".pub", os.path.join(self.keys, "authorized_keys.root"))

    def _free_port(self):
        """First port >= 2222 free on every node address (concurrent clusters)."""
        addrs = ["127.0.0.%d" % (i + 2) for i in range(len(self.hosts))]
        for port in range(FIRST_PORT, FIRST_PORT + 200):
            if all(_can_bind(a, port) for a in addrs):
                return port
        raise ClusterError("no free port for the nodes' sshd")

    def _write_configs(self):
        lines = []
        for i, host in enumerate(self.hosts):
            node = Node(self, i + 1, self._gpus[i], self._models[i])
            self._nodes[host] = node
            os.makedirs(node.bindir, mode=0o755)
            os.chmod(node.dir, 0o755)
            self._install_fake_tools(node)
            _keygen(node.hostkey, "%s@dq-cluster" % host)
            with open(node.config, "w") as f:
                f.write(SSHD_CONFIG.format(addr=node.addr, port=self.port,
                                           hostkey=node.hostkey, keys=self.keys))
            lines += ["Host %s" % host, "    HostName %s" % node.addr,
                      "    Port %d" % self.port, ""]
        lines += ["Host *", "    StrictHostKeyChecking no",
                  "    UserKnownHostsFile /dev/null", "    GlobalKnownHostsFile /dev/null",
                  "    CheckHostIP no", "    UpdateHostKeys no",
                  "    LogLevel ERROR", "    BatchMode yes",
                  # default sntrup761 kex costs ~60 ms per connection
                  "    KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org", ""]
        with open(self.ssh_config, "w") as f:
            f.write("\n".join(lines))
        os.chmod(self.ssh_config, 0o644)

    def _install_fake_tools(self, node, only=None):
        """Copies (not symlinks): the node bin dir must work for every user.
        fakesmi.py (what the nvidia-smi stub runs) goes with its bytecode."""
        for tool in only or FAKE_TOOLS:
            dst = os.path.join(node.bindir, tool)
            shutil.copy(os.path.join(FAKEGPU_DIR, tool), dst + ".new")
            os.chmod(dst + ".new", 0o755 if "." not in tool else 0o644)
            os.rename(dst + ".new", dst)
            if tool.endswith(".py"):
                py_compile.compile(dst, doraise=True)

    # ------------------------------------------------------------ node boot

    def _spawn(self, node):
        log = open(node.log, "ab")
        try:
            node.proc = subprocess.Popen(
                ["unshare", "--uts", "--mount", "--pid", "--fork", "--kill-child",
                 "--mount-proc", "/bin/sh", os.path.join(self.base, "node-init.sh"),
                 node.name, node.bindir, str(node.gpus), node.config,
                 node.model[0], str(node.model[1])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True)
        finally:
            log.close()
        node.pid = None
        deadline = time.monotonic() + 10
        while node.pid is None:
            kids = _children(node.proc.pid)
            if kids:
                node.pid = kids[0]
            elif node.proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError("%s: unshare failed\n%s" % (node.name, self._log_tail(node)))
            else:
                time.sleep(0.005)

    def _wait_listening(self, nodes, deadline):
        """Wait until each node's sshd sends its banner."""
        pending = list(nodes)
        while pending:
            for node in list(pending):
                if node.proc.poll() is not None:
                    raise ClusterError("%s died while booting (rc %s)\n%s" % (
                        node.name, node.proc.returncode, self._log_tail(node)))
                if _ssh_banner(node.addr, self.port):
                    pending.remove(node)
            if pending and time.monotonic() > deadline:
                raise ClusterError("sshd of %s not listening on port %d\n%s" % (
                    ", ".join(n.name for n in pending), self.port,
                    "\n".join(self._log_tail(n) for n in pending)))
            if pending:
                time.sleep(0.02)

    def _check_logins(self, nodes):
        """`ssh <node> hostname` as a test user must log into that node.

        The ssh client runs inside the node itself, not on the host: test-user
        processes outside this cluster's nodes may belong to another cluster
        (a concurrent test run), whose kill_user_processes must not hit ours.
        """
        user = self.users[0] if self.users else "root"
        ssh = self.ssh_command if user != "root" else self.root_ssh_command
        results = {}

        def probe(node):
            try:
                results[node.name] = self.run(node.name, user, ssh.split() + [node.name, "hostname"],
                                              timeout=20)
            except Exception as e:  # reported below, with the sshd log
                results[node.name] = e

        threads = [threading.Thread(target=probe, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for node in nodes:
            r = results.get(node.name)
            if not isinstance(r, subprocess.CompletedProcess) or r.returncode != 0 \
                    or r.stdout.strip() != node.name:
                raise ClusterError("ssh %s as %s failed: %r\n%s" % (
                    node.name, user, r, self._log_tail(node)))

    def _log_tail(self, node, n=30):
        text = _read(node.log, "")
        return "--- %s (last %d lines):\n%s" % (
            node.log, n, "\n".join(text.splitlines()[-n:]))

    # ------------------------------------------------------------ nodes API

    def _node(self, host):
        try:
            return self._nodes[host]
        except KeyError:
            raise ValueError("unknown host %r (have %s)" % (host, self.hosts)) from None

    def node_pid(self, host):
        """Host pid of the node's init (its sshd), for nsenter -t."""
        node = self._node(host)
        if not node.alive():
            raise ClusterError("%s is not running" % host)
        return node.pid

    def node_alive(self, host):
        return self._node(host).alive()

    def kill_node(self, host):
        """SIGKILL the node's PID 1: everything in the node dies, like a crash."""
        node = self._node(host)
        if node.proc is None:
            return
        if node.proc.poll() is None:
            try:
                os.kill(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
        node.proc = None

    def start_node(self, host, timeout=20):
        """(Re)boot a node: fresh /tmp, screen dir and GPU state; GPU count kept."""
        node = self._node(host)
        self.kill_node(host)
        with _GlobalLock():
            self._spawn(node)
            self._wait_listening([node], time.monotonic() + timeout)
        self._check_logins([node])

    def _sshd_pids(self, host):
        """Host pids of every sshd of the node: its listener (PID 1) and the
        one per connection, multiplexed masters' included."""
        ns = os.readlink("/proc/%d/ns/pid" % self.node_pid(host))
        out = []
        for pid in _host_pids():
            comm = (_read("/proc/%d/comm" % pid) or "").strip()
            st = _proc_status(pid)
            if comm.startswith("sshd") and st and st[2] == ns:
                out.append(pid)
        return out

    def stop_sshd(self, host):
        """SIGSTOP every sshd process of the node (a hung host): new ssh
        connections hang, and so do commands over existing multiplexed
        ones. The node's other processes (jobs, screen) run on."""
        stopped = set()
        for _ in range(3):      # one forked meanwhile is caught next round
            for pid in set(self._sshd_pids(host)) - stopped:
                try:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def cont_sshd(self, host):
        for pid in self._sshd_pids(host):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def fill_small(self):
        """Fill the small filesystem to the last byte (as root: like a big
        checkpoint written beside dq's files, or a quota reached)."""
        with open(os.path.join(self.small, "filler"), "ab", buffering=0) as f:
            for size in (1 << 20, 65536, 4096, 512, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    pass

    def free_small(self):
        try:
            os.unlink(os.path.join(self.small, "filler"))
        except FileNotFoundError:
            pass

    def readonly_dir(self, host, path):
        """Make `path` read-only inside the node only (its mount namespace):
        the shared directory as a host whose NFS mount went bad sees it."""
        pid = str(self.node_pid(host))
        for args in (["mount", "--bind", path, path],
                     ["mount", "-o", "remount,bind,ro", path]):
            subprocess.run(["nsenter", "-t", pid, "-m", "--"] + args, check=True,
                           capture_output=True, timeout=10)
        self.readonly_dirs.setdefault(host, []).append(path)

    def writable_dir(self, host, path):
        """Undo readonly_dir."""
        if path in self.readonly_dirs.get(host, []):
            self.readonly_dirs[host].remove(path)
        subprocess.run(["nsenter", "-t", str(self.node_pid(host)), "-m", "--", "umount", path],
                       check=False, capture_output=True, timeout=10)

    # ------------------------------------------------------------ running commands

    def _argv(self, host, user, cmd, env, cwd):
        """nsenter into the node, drop to `user`, clean login-like env, cd."""
        pw = pwd.getpwnam(user)
        environ = {"HOME": pw.pw_dir, "USER": user, "LOGNAME": user,
                   "SHELL": pw.pw_shell or "/bin/sh", "PATH": USER_PATH,
                   "LANG": "C.UTF-8"}
        for k, v in (env or {}).items():
            if v is None:
                environ.pop(k, None)
            else:
                environ[k] = str(v)
        if isinstance(cmd, str):
            cmd = ["/bin/sh", "-c", cmd]
        return (["nsenter", "-t", str(self.node_pid(host)), "-u", "-m", "-p", "--",
                 "setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
                 "--init-groups", "--", "/usr/bin/env", "-i"]
                + ["%s=%s" % kv for kv in environ.items()]
                + ["/bin/sh", "-c", 'cd -- "$0" && unset OLDPWD && exec "$@"', cwd or pw.pw_dir]
                + [str(a) for a in cmd])

    def popen(self, host, user, cmd, *, env=None, cwd=None, **kw):
        """Start `cmd` as `user` inside `host`; returns the Popen at once.

        cmd: list of args, or a str run by /bin/sh -c. Defaults: text mode,
        stdin from /dev/null, stdout/stderr piped. The command runs in its own
        process group: os.killpg(p.pid, sig) signals all of it.
        """
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("start_new_session", True)
        kw.setdefault("env", {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        return subprocess.Popen(self._argv(host, user, cmd, env, cwd), **kw)

    def run(self, host, user, cmd, *, env=None, cwd=None, timeout=60, check=False,
            input=None):
        """Run `cmd` as `user` inside `host`, like a login there; wait for it."""
        p = self.popen(host, user, cmd, env=env, cwd=cwd,
                       stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        return _finish(p, cmd, input, timeout, check)

    def user_dir(self, user, name):
        """<base>/work/<user>/<name>, owned by user: job scripts, submit cwds."""
        pw = pwd.getpwnam(user)
        top = os.path.join(self.base, "work", user)
        path = os.path.join(top, name)
        os.makedirs(path, exist_ok=True)
        d = path
        while True:
            os.chown(d, pw.pw_uid, pw.pw_gid)
            if d == top:
                break
            d = os.path.dirname(d)
        return path

    # ------------------------------------------------------------ fake GPUs

    def set_gpus(self, host, count):
        """Change how many GPUs the node reports (kept across start_node)."""
        node = self._node(host)
        node.gpus = int(count)
        _write_atomic(node.path("/run/fakegpu/gpus"), "%d\n" % node.gpus)

    def set_gpu_model(self, host, name, memory_mib):
        """Change the model the node's nvidia-smi reports (until reset)."""
        node = self._node(host)
        node.model = (name, int(memory_mib))
        _write_atomic(node.path("/run/fakegpu/model"), "%s\n%d\n" % node.model)

    def set_smi_mode(self, host, mode):
        """ok | fail | hang | missing | nodevices | na (see fakegpu/fakesmi.py)."""
        if mode not in SMI_MODES:
            raise ValueError("mode must be one of %s" % (SMI_MODES,))
        node = self._node(host)
        smi = os.path.join(node.bindir, "nvidia-smi")
        if mode == "missing":
            if os.path.exists(smi):
                os.unlink(smi)
        elif not os.path.exists(smi):
            self._install_fake_tools(node, only=["fakesmi.py", "nvidia-smi"])
        _write_atomic(node.path("/run/fakegpu/mode"), mode + "\n")

    def hold_gpu(self, host, user, gpu, seconds=3600, memory_mb=1000):
        """Start a hand-started GPU process (not through dq) holding GPU `gpu`.

        Returns its pid inside the node, which is what nvidia-smi reports.
        Returns once nvidia-smi can see it.
        """
        node = self._node(host)
        r = self.run(host, user, ["/usr/bin/python3", "-c", DETACH, "/usr/local/bin/fake-cuda",
                                  "--hold", str(seconds), "--mem", str(memory_mb)],
                     env={"CUDA_VISIBLE_DEVICES": str(gpu), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                     check=True, timeout=20)
        pid = int(r.stdout.strip())
        holder = node.path("/run/fakegpu/holders/%d.%d" % (gpu, pid))
        deadline = time.monotonic() + 10
        while not os.path.exists(holder):
            if time.monotonic() > deadline or not os.path.exists(node.path("/proc/%d" % pid)):
                raise ClusterError("hold_gpu: fake-cuda (pid %d) on %s did not take GPU %d "
                                   "(node has %d GPUs)" % (pid, host, gpu, node.gpus))
            time.sleep(0.01)
        return pid

    def gpu_processes(self, host):
        """[(gpu_index, pid, user)] the fake nvidia-smi reports on `host`.

        Ignores the nvidia-smi failure mode, so tests can see where processes
        really are even while nvidia-smi is "broken".
        """
        smi = ["/usr/bin/python3", os.path.join(FAKEGPU_DIR, "nvidia-smi")]
        env = {"FAKEGPU_IGNORE_MODE": "1"}
        gpus = self.run(host, "root", smi + ["--query-gpu=index,uuid", "--format=csv,noheader"],
                        env=env, check=True, timeout=20).stdout
        index = dict(reversed(line.split(", ")) for line in gpus.splitlines() if line)
        apps = self.run(host, "root", smi + ["--query-compute-apps=gpu_uuid,pid",
                                             "--format=csv,noheader"],
                        env=env, check=True, timeout=20).stdout
        node = self._node(host)
        out = []
        for line in apps.splitlines():
            if not line:
                continue
            uuid, pid = line.split(", ")
            out.append((int(index[uuid]), int(pid), self._node_pid_user(node, int(pid))))
        return sorted(out)

    def _node_pid_user(self, node, pid):
        status = _read(node.path("/proc/%d/status" % pid), "")
        m = re.search(r"^Uid:\s+(\d+)", status, re.M)
        if not m:
            return None
        try:
            return pwd.getpwuid(int(m.group(1))).pw_name
        except KeyError:
            return m.group(1)

    # ------------------------------------------------------------ cleanup between tests

    def kill_user_processes(self, timeout=10):
        """SIGKILL every process of the test users in this cluster's nodes.

        Only inside this cluster's nodes (their pid namespaces): test-user
        processes elsewhere may belong to a concurrently running cluster.
        """
        uids = set()
        for u in self.users:
            try:
                uids.add(pwd.getpwnam(u).pw_uid)
            except KeyError:
                pass
        namespaces = set()
        for node in self._nodes.values():
            if node.alive():
                try:
                    namespaces.add(os.readlink("/proc/%d/ns/pid" % node.pid))
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        while True:
            victims = []
            for pid in _host_pids():
                st = _proc_status(pid)
                if st and st[0] in uids and st[1] != "Z" and st[2] in namespaces:
                    victims.append(pid)
            if not victims:
                return
            if time.monotonic() > deadline:
                raise ClusterError("could not kill test user processes: %s" % victims)
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def reset(self):
        """Make the cluster as fresh as after start(), quickly (between tests).

        Boots dead nodes, resumes stopped sshds, kills test-user processes,
        empties each node's /tmp and screen dir, and restores the fake GPUs
        (mode ok, configured count, no holders).
        """
        for host, node in self._nodes.items():
            node.gpus = node.gpus_configured
            node.model = node.model_configured
            if node.alive():
                self.cont_sshd(host)
                for path in self.readonly_dirs.pop(host, ()):
                    self.writable_dir(host, path)
            else:
                self.start_node(host)
        self.kill_user_processes()
        for node in self._nodes.values():
            for d in ("/tmp", "/run/screen", "/run/fakegpu/holders"):
                _empty_dir(node.path(d))
            self._install_fake_tools(node)
            _write_atomic(node.path("/run/fakegpu/mode"), "ok\n")
            _write_atomic(node.path("/run/fakegpu/gpus"), "%d\n" % node.gpus)
            _write_atomic(node.path("/run/fakegpu/model"), "%s\n%d\n" % node.model)


# ---------------------------------------------------------------- helpers

def _finish(p, cmd, input, timeout, check):
    """communicate() with a timeout that kills the whole process group."""
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            out, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a detached child still holds the pipes
            p.kill()
            out, err = None, None
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and r.returncode != 0:
        raise CommandFailed(r.returncode, cmd, out, err)
    return r


def _keygen(path, comment):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True)


def _can_bind(addr, port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _ssh_banner(addr, port):
    try:
        with socket.create_connection((addr, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def ensure_user(user):
    """Create an unprivileged test user with a passphrase-less ssh key.

    `usermod -p '*'` because sshd without PAM refuses accounts whose
    password field starts with '!' (useradd's "locked" default).
    """
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", user], check=True,
                       capture_output=True)
    subprocess.run(["usermod", "-p", "*", user], check=True, capture_output=True)
    pw = pwd.getpwnam(user)
    if not os.path.isdir(pw.pw_dir):
        os.makedirs(pw.pw_dir, mode=0o755)
    sshdir = os.path.join(pw.pw_dir, ".ssh")
    os.makedirs(sshdir, mode=0o700, exist_ok=True)
    key = os.path.join(sshdir, "id_ed25519")
    if not os.path.exists(key):
        _keygen(key, "%s@dq-cluster" % user)
    pub = _read(key + ".pub", "").strip()
    auth = os.path.join(sshdir, "authorized_keys")
    if pub not in _read(auth, "").splitlines():
        with open(auth, "a") as f:
            f.write(pub + "\n")
    for d, mode in ((pw.pw_dir, None), (sshdir, 0o700), (key, 0o600),
                    (key + ".pub", 0o644), (auth, 0o600)):
        os.chown(d, pw.pw_uid, pw.pw_gid)
        if mode is not None:
            os.chmod(d, mode)


def cleanup_stale_clusters():
    """Kill nodes and remove base dirs left by test runs that were killed.

    A base dir's `owner` file names the pid of the process that made it.
    """
    for name in os.listdir(BASE_PARENT):
        base = os.path.join(BASE_PARENT, name)
        if not name.startswith(BASE_PREFIX) or not os.path.isdir(base):
            continue
        owner = _read(os.path.join(base, "owner"), "").strip()
        if owner.isdigit() and _pid_alive(int(owner)):
            continue
        if not owner and time.time() - os.stat(base).st_mtime < 60:
            continue  # being created right now
        marker = (base + "/").encode()
        for pid in _host_pids():
            cmdline = _read_bytes("/proc/%d/cmdline" % pid)
            if cmdline and marker in cmdline and (b"unshare" in cmdline or b"sshd" in cmdline):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        subprocess.run(["umount", "-l", os.path.join(base, "small")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


# ---------------------------------------------------------------- dq installs

_TEMPLATES = {}     # (cluster base, repo, dq.py's bytes' hash) -> an install to copy


def _run_installer(installer, root):
    r = subprocess.run([installer, root], capture_output=True, text=True)
    if r.returncode != 0:
        raise CommandFailed(r.returncode, [installer, root], r.stdout, r.stderr)


def install_dq(cluster, root, repo=None):
    """Set up a fresh dq data root: dq.py, bin/dq-<cmd> links, dq.conf.

    Uses <repo>/install.sh when it exists, else does its job directly.
    `root` should be under cluster.base (shared by all nodes, unlike /tmp).
    install.sh runs once per dq.py (0.5-0.7 s: it starts Python twice and
    compiles dq.py); each install after that is a copy of that one (its
    compiled dq.py is hash-checked, so it is as valid in the copy), which
    takes the suite's ~900 installs from minutes to seconds.  install.sh
    itself is tested as users run it in test_setup.py.
    """
    repo = repo or REPO
    installer = os.path.join(repo, "install.sh")
    if os.path.exists(installer):
        import hashlib
        os.makedirs(os.path.dirname(root), exist_ok=True)
        if os.path.exists(root):        # an install over an install: install.sh itself
            _run_installer(installer, root)
        else:
            key = (cluster.base, repo, hashlib.sha256(
                _read_bytes(os.path.join(repo, "dq.py")) or b"").hexdigest())
            template = _TEMPLATES.get(key)
            if template is None or not os.path.isdir(template):
                template = os.path.join(cluster.base, "dq-template-" + key[2][:12])
                shutil.rmtree(template, ignore_errors=True)
                _run_installer(installer, template)
                _TEMPLATES[key] = template
            shutil.copytree(template, root, symlinks=True)
    else:
        src = os.path.join(repo, "dq.py")
        if not os.path.exists(src):
            raise ClusterError("no %s to install" % src)
        os.makedirs(os.path.join(root, "bin"), exist_ok=True)
        shutil.copy(src, os.path.join(root, "dq.py"))
        os.chmod(os.path.join(root, "dq.py"), 0o755)
        for cmd in DQ_COMMANDS:
            link = os.path.join(root, "bin", "dq-" + cmd)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink("../dq.py", link)
    with open(os.path.join(root, "dq.conf"), "w") as f:
        f.write("[dq]\nhosts = %s\nssh = %s\n" % (" ".join(cluster.hosts), cluster.ssh_command))
    os.chmod(os.path.join(root, "dq.conf"), 0o644)
    if not os.path.exists(installer):
        os.chmod(root, 0o1777)
    return root


class DQInstall:
    """A dq data root installed for one test, with a way to run its commands."""

    def __init__(self, cluster, root):
        self.cluster = cluster
        self.root = root
        self.bin = os.path.join(root, "bin")

    def path(self, cmd):
        return os.path.join(self.bin, "dq-" + cmd)

    def run(self, host, user, cmd, *args, env=None, cwd=None, timeout=60, check=False,
            input=None):
        """Run `dq-<cmd> args...` as `user` on `host`."""
        return self.cluster.run(host, user, [self.path(cmd)] + [str(a) for a in args],
                                env=env, cwd=cwd, timeout=timeout, check=check, input=input)

    def popen(self, host, user, cmd, *args, env=None, cwd=None, **kw):
        return self.cluster.popen(host, user, [self.path(cmd)] + [str(a) for a in args],
                                  env=env, cwd=cwd, **kw)
