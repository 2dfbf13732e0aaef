"""dq-web (issue 13): the live page, rendered by a real headless browser
(Debian's chromium) against the simulated cluster with running, queued and
hand-started GPU work, a drained host and a dead one."""
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from dqtest import ALICE, BOB, configure, free_port, script, submit, wait_state, wait_until

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = "<b>bold</b><img src=x onerror=alert(1)>"


def get(url, data=None):
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def browser(*args):
    if not CHROMIUM:
        pytest.fail("chromium is not installed (.ci/run installs it)")
    home = tempfile.mkdtemp(prefix="dq-chromium-")
    try:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--no-first-run",
                            f"--user-data-dir={home}", "--virtual-time-budget=10000", *args],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, HOME=home))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return r


@pytest.fixture
def web(cluster, dq):
    port = free_port()
    p = dq.popen("node1", ALICE, "web", "--port", port)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: _answers(url), timeout=20, what="dq-web to answer")
        yield url
    finally:
        p.terminate()
        p.wait(10)


def _answers(url):
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def test_the_page_shows_the_cluster(cluster, dq):
    configure(dq, ["node1", "node2", "node3", "node4"], admins=ALICE, timeout=3)
    cluster.set_gpus("node1", 1)
    cluster.set_gpus("node2", 1)
    cluster.hold_gpu("node2", BOB, 0)          # by hand
    cluster.stop_sshd("node4")     # dead (the reset after the test resumes it)
    _, long = script(cluster, ALICE, "train.sh", "exec fake-cuda --hold 60 --mem 5000\n")
    _, other = script(cluster, BOB, "b.sh", "sleep 1\n")
    running, _ = submit(dq, "node1", ALICE, long, env={"DQ_DESC": EVIL, "DQ_TIME": "1h",
                                                        "DQ_HOSTS": "node1"})
    wait_state(dq, running, "running")
    assert dq.run("node1", ALICE, "drain", "node3", "-r", "fan <broken>").returncode == 0
    waiting, _ = submit(dq, "node1", BOB, other, env={"DQ_HOSTS": "node1,node2"})
    held, _ = submit(dq, "node1", ALICE, long, env={"DQ_HOSTS": "node1"})
    assert dq.run("node1", ALICE, "hold", held).returncode == 0
    port = free_port()
    p = dq.popen("node1", ALICE, "web", "--port", port)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: _answers(url), timeout=20, what="dq-web to answer")
        status, body = get(url + "api/state")
        assert status == 200
        state = json.loads(body)
        hosts = {h["host"]: h for h in state["hosts"]}
        assert hosts["node1"]["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"
        assert hosts["node1"]["gpus"][0]["job"] == running
        assert hosts["node2"]["gpus"][0]["processes"][0]["user"] == BOB
        assert hosts["node3"]["drained"]["reason"] == "fan <broken>"
        assert not hosts["node4"]["reachable"]
        assert {j["id"]: j["reason"] for j in state["queue"]} == \
            {waiting: "GPUs busy", held: "held"}
        assert [j["id"] for j in state["running"]] == [running]
        # node1's and node2's one GPU busy, node3's four drained, node4 dead
        assert (state["free_gpus"], state["total_gpus"]) == (0, 6)
        # one poll serves everybody for a few seconds
        assert json.loads(get(url + "api/state")[1])["polls"] == state["polls"]
        # read-only
        assert get(url + "api/state", data=b"x")[0] == 405

        # the page as a browser renders it (the DOM after its script ran)
        r = browser("--dump-dom", url)
        dom = r.stdout
        assert "<title>dq: 0 of 6 GPUs free</title>" in dom, r.stderr[-2000:]
        for text in ("node1", "node2", "node3", "node4", "NVIDIA A100-SXM4-80GB",
                     "NVIDIA GeForce RTX 3090", "NVIDIA GeForce GTX 1080 Ti", running, waiting,
                     held, ALICE, BOB, "GPUs busy", "held", "unreachable",
                     "drained: fan &lt;broken&gt;", "(by hand, pid", f"(dq job {running})"):
            assert text in dom, (text, dom[-3000:])
        # user input shows as text, never as markup
        assert "&lt;b&gt;bold&lt;/b&gt;&lt;img src=x onerror=alert(1)&gt;" in dom
        assert "<b>bold</b>" not in dom and "<img" not in dom
        # a screenshot, phone-sized and wall-sized pages render
        shots = tempfile.mkdtemp(dir=cluster.base)
        for name, size in (("dq-web.png", "1280,1000"), ("phone.png", "390,844"),
                           ("wall.png", "3840,2160")):
            out = os.path.join(shots, name)
            r = browser(f"--screenshot={out}", f"--window-size={size}", url)
            with open(out, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", r.stderr[-2000:]
        if os.environ.get("DQ_WEB_SCREENSHOT"):     # to refresh docs/dq-web.png
            shutil.copy(os.path.join(shots, "dq-web.png"),
                        os.path.join(DOCS, "dq-web.png"))
    finally:
        p.terminate()
        p.wait(10)


def test_only_one_poll_for_many_viewers(cluster, dq, web):
    configure(dq, ["node1", "node2"])
    import threading
    counts = []

    def viewer():
        for _ in range(5):
            counts.append(json.loads(get(web + "api/state")[1])["polls"])
    t0 = time.monotonic()
    threads = [threading.Thread(target=viewer) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = time.monotonic() - t0
    assert len(counts) == 100
    assert max(counts) - min(counts) <= spent / 3 + 1, (sorted(set(counts)), spent)
