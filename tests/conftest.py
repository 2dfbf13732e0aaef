"""pytest fixtures for dq's end-to-end tests on the namespace test cluster.

- `cluster` (session): a started 4-node Cluster (4 fake GPUs each: an
  A100 80GB node, an RTX 3090 node, two GTX 1080 Ti nodes), users dqalice,
  dqbob and dqdan.
- `dq` (function): a fresh dq install on that cluster (see DQInstall).
- `small_dq` (function): the same on the cluster's small filesystem, to fill.
- `engine` (function, twice): a dq install on each back end, ssh and slurm.
- `slurm` (session, started on first use): a real Slurm cluster on the
  session cluster (tests/slurmcluster.py: slurmctld, one slurmd inside each
  node, a private munged); partition `gpu` with all nodes.
After every test that used the cluster, it is reset (test-user processes
killed, dead nodes rebooted, fake GPUs restored) so tests are independent;
after one that used `slurm`, all jobs are cancelled, slurmd's restarted and
nodes resumed too.

Cluster (and Slurm) tests skip when not root or a needed tool is missing,
except with CI=true, where they fail: CI must run them all.
"""
import os
import re
import shutil

import pytest

from cluster import Cluster, DQInstall, install_dq, unavailable_reason
from dqtest import HOSTS, MODELS, configure
from slurmcluster import SlurmCluster, slurm_unavailable_reason

_session = {"cluster": None, "installs": 0, "slurm": None}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: uses the namespace test cluster (root, unshare, sshd, screen, ssh)")
    config.addinivalue_line(
        "markers", "slurm: uses the real Slurm cluster on the test cluster (slurmctld, slurmd, munge)")


def pytest_collection_modifyitems(items):
    """Mark tests using the cluster so `-m "not cluster"` deselects them."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if {"cluster", "dq", "slurm"} & names:
            item.add_marker(pytest.mark.cluster)
        if "slurm" in names:
            item.add_marker(pytest.mark.slurm)


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail("cluster unavailable on CI: " + reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    reason = unavailable_reason()
    if reason:
        _unavailable(reason)
    c = Cluster(nodes=4, gpus=4, users=("dqalice", "dqbob", "dqdan"),
                models=MODELS).start()
    _session["cluster"] = c
    try:
        yield c
    finally:
        _session["cluster"] = None
        c.stop()


@pytest.fixture(scope="session")
def slurm(cluster):
    """A SlurmCluster on the session cluster: started by the first test that
    asks for it, stopped at the end of the session."""
    reason = slurm_unavailable_reason()
    if reason:
        _unavailable(reason)
    s = SlurmCluster(cluster).start()
    _session["slurm"] = s
    try:
        yield s
    finally:
        _session["slurm"] = None
        s.stop()


@pytest.fixture(autouse=True)
def _reset_cluster_after_test(request):
    s = _session["slurm"]
    if s is not None and "slurm" in request.fixturenames and s.stale():
        s.reset()       # a test without Slurm restarted nodes (and their slurmds)
    yield
    c = _session["cluster"]
    names = set(request.fixturenames)
    if c is not None and {"cluster", "dq", "slurm"} & names:
        c.reset()
    s = _session["slurm"]
    if s is not None and "slurm" in names:
        s.reset()


@pytest.fixture
def dq(cluster, request):
    """A fresh dq data root under the cluster base dir, for this test only."""
    _session["installs"] += 1
    name = "%03d-%s" % (_session["installs"], re.sub(r"[^\w.-]+", "_", request.node.name)[:80])
    root = install_dq(cluster, os.path.join(cluster.base, "dq", name))
    return DQInstall(cluster, root)


@pytest.fixture
def small_dq(cluster, request):
    """A fresh dq install whose data root is on the cluster's small
    filesystem (Cluster.small), so that a test can fill it up."""
    _session["installs"] += 1
    name = "%03d-%s" % (_session["installs"], re.sub(r"[^\w.-]+", "_", request.node.name)[:40])
    root = install_dq(cluster, os.path.join(cluster.small, name))
    try:
        yield DQInstall(cluster, root)
    finally:
        cluster.free_small()
        shutil.rmtree(root, ignore_errors=True)


# Both back ends (issue 22): a test that takes `engine` runs once with dq's
# own ssh scheduling and once on the test Slurm cluster.
class Engine:
    """A dq install on one back end: `name` is ssh or slurm."""

    def __init__(self, name, dq, slurm=None):
        self.name, self.dq, self.slurm = name, dq, slurm
        self.cluster = dq.cluster

    def configure(self, hosts=HOSTS, **opts):
        """dq.conf: these hosts and options, on this back end."""
        if self.name == "slurm":
            opts = dict(dict(backend="slurm", slurm_conf=self.slurm.conf), **opts)
        configure(self.dq, hosts, **opts)


def ready_slurm(request):
    """The session's Slurm cluster, its slurmds up (see SlurmCluster.stale)."""
    s = request.getfixturevalue("slurm")
    if s.stale():
        s.reset()
    return s


@pytest.fixture(params=["ssh", "slurm"])
def engine(request, cluster, dq):
    e = Engine(request.param, dq, ready_slurm(request) if request.param == "slurm" else None)
    e.configure()
    return e
