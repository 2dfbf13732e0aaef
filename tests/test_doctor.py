"""dq-doctor (issue 13): a healthy cluster passes every check; each way a
host can be set up wrong is named, with its fix."""
import json
import os
import pwd
import tempfile

from dqtest import ALICE, configure

HOSTS = ["node1", "node2", "node3", "node4"]
CHECKS = ["ssh", "data root", "locks", "screen", "python", "nvidia-smi", "clock"]


def doctor(dq, *args):
    r = dq.run("node1", ALICE, "doctor", *args, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def lines(r):
    """{(host, check): (level, rest of the line)}"""
    out = {}
    for ln in r.stdout.splitlines()[:-1]:
        level, host, rest = ln.split(None, 2)
        for name in CHECKS + ["shell output", "shell start-up", "permissions", "admins"]:
            if rest.startswith(name + " "):
                out[(host, name)] = (level, rest[len(name):].strip())
    return out


def test_a_healthy_cluster_passes(cluster, dq):
    configure(dq, HOSTS)
    r = doctor(dq)
    assert r.returncode == 0, r.stdout + r.stderr
    got = lines(r)
    for h in HOSTS:
        for name in CHECKS:
            assert got[(h, name)][0] == "ok", (h, name, r.stdout)
    assert "4 x NVIDIA A100-SXM4-80GB (80G)" in got[("node1", "nvidia-smi")][1]
    assert "4 x NVIDIA GeForce GTX 1080 Ti (11G)" in got[("node3", "nvidia-smi")][1]
    assert r.stdout.splitlines()[-1].startswith("0 failed")
    data = json.loads(doctor(dq, "--json").stdout)
    assert all(c["ok"] for c in data) and {c["host"] for c in data} >= set(HOSTS)
    # nothing left behind in the data root
    assert not [n for n in os.listdir(os.path.join(dq.root, "state")) if "doctor" in n]


def test_each_broken_host_is_named_with_its_fix(cluster, dq):
    configure(dq, HOSTS)
    bashrc = os.path.join(pwd.getpwnam(ALICE).pw_dir, ".bashrc")
    old = open(bashrc).read() if os.path.exists(bashrc) else None
    other = tempfile.mkdtemp(dir=cluster.base)
    os.chmod(other, 0o755)
    try:
        # node1: a .bashrc that prints; node4: one that is slow (both only
        # there: the home is shared, as on NFS); at its top, before Debian's
        # return for non-interactive shells, as a careless edit would be
        with open(bashrc, "w") as f:
            f.write('[ "$(hostname)" = node1 ] && echo "Welcome to node1"\n'
                    '[ "$(hostname)" = node4 ] && sleep 0.6\n' + (old or ""))
        # node2: no screen, and nvidia-smi fails; node3: another data root
        cluster.run("node2", "root", ["mount", "--bind", "/dev/null", "/usr/bin/screen"],
                    check=True)
        cluster.set_smi_mode("node2", "fail")
        cluster.run("node3", "root", ["mount", "--bind", other, dq.root], check=True)
        r = doctor(dq)
        assert r.returncode == 1, r.stdout
        got = lines(r)
        level, text = got[("node1", "shell output")]
        assert level == "FAIL" and "Welcome to node1" in text and "~/.bashrc" in text
        level, text = got[("node4", "shell start-up")]
        assert level == "WARN" and "~/.bashrc" in text and "case $- in" in text
        assert got[("node2", "screen")][0] == "FAIL" and "install it" in got[("node2", "screen")][1]
        level, text = got[("node2", "nvidia-smi")]
        assert level == "FAIL" and "NVIDIA driver" in text
        level, text = got[("node3", "data root")]
        assert level == "FAIL" and dq.root in text and "same shared directory" in text
        # the others are fine
        for h, name in [("node3", "screen"), ("node1", "nvidia-smi"), ("node4", "data root"),
                        ("node2", "data root"), ("node4", "locks"), ("node2", "python")]:
            assert got[(h, name)][0] == "ok", (h, name, r.stdout)
        data = json.loads(doctor(dq, "--json").stdout)
        failed = {(c["host"], c["check"]) for c in data if not c["ok"]}
        assert failed == {("node1", "shell output"), ("node2", "screen"),
                          ("node2", "nvidia-smi"), ("node3", "data root")}, failed
    finally:
        if old is None:
            os.unlink(bashrc)
        else:
            with open(bashrc, "w") as f:
                f.write(old)
        cluster.run("node2", "root", ["umount", "/usr/bin/screen"])
        cluster.run("node3", "root", ["umount", dq.root])
