"""dq-web (issue 13): the live page, rendered by a real headless browser
(Debian's chromium) against the simulated cluster with running, queued and
hand-started GPU work, a drained host and a dead one."""
import collections
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from browser import CHROMIUM, Browser, png_pixels
from dqtest import ALICE, BOB, configure, free_port, job, jobs, script, submit, \
    synthetic_history, wait_state, wait_until

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
EVIL = "<b>bold</b><img src=x onerror=alert(1)>"


# Once the page's script has drawn the state it fetched
RENDERED = "!window.dqtestOld && document.title.startsWith('dq: ') && " \
    "document.querySelectorAll('#hosts .host').length"
# What is on the page, as a person sees it: each host box with its tags and
# GPU rows and their colours, the tables' rows, where each element is, and
# every piece of text that is cut off, spills out of its box or lies out of
# the window (unless inside a box one can scroll sideways).
SEEN = r"""(() => {
  const css = (e, p) => getComputedStyle(e)[p];
  const box = e => { const r = e.getBoundingClientRect();
    return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; };
  const hosts = [...document.querySelectorAll('#hosts .host')].map(h => ({
    name: h.querySelector('h3 span').textContent, classes: h.className,
    border: css(h, 'borderTopColor') + ' ' + css(h, 'borderTopStyle'), box: box(h),
    tags: [...h.querySelectorAll('.tag')].map(t => ({
      text: t.textContent, background: css(t, 'backgroundColor'), box: box(t)})),
    gpus: [...h.querySelectorAll('.gpu')].map(g => {
      const fill = g.querySelector('.bar>div'), word = g.querySelector('.free-word');
      return {text: g.textContent, classes: g.className, box: box(g),
              fill: css(fill, 'backgroundColor'), fill_box: box(fill),
              free_word: word ? css(word, 'color') : null, word_box: word ? box(word) : null};
    })}));
  const rows = id => [...document.querySelectorAll('#' + id + ' tr')].slice(1).map(
    r => [...r.cells].map(c => c.textContent));
  const cut = [], scrolled = [];
  const texts = [...document.querySelectorAll('header *, main *')].filter(
    e => !e.closest('svg') &&       // an SVG's <title> is a tooltip, not text on the page
         [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()));
  for (const e of texts) {
    const r = e.getBoundingClientRect(), why = [];
    if (r.width < 1 || r.height < 1) why.push('not shown');
    if (css(e, 'display') !== 'inline' && e.scrollWidth > e.clientWidth + 1)
      why.push(`its text is ${e.scrollWidth}px wide in a box of ${e.clientWidth}px`);
    let scroller = null;
    for (let a = e.parentElement; a && a !== document.body; a = a.parentElement) {
      const o = css(a, 'overflowX');
      if (o === 'visible') continue;
      const ar = a.getBoundingClientRect();
      if (o === 'auto' || o === 'scroll') {
        if (!scroller) scroller = a;
        continue;
      }
      if (r.left < ar.left - 1 || r.right > ar.right + 1 || r.top < ar.top - 1 ||
          r.bottom > ar.bottom + 1)
        why.push('cut off by ' + a.tagName + '.' + a.className);
    }
    if (!scroller && (r.left < -1 || r.right > innerWidth + 1))
      why.push(`out of the window (${Math.round(r.left)} to ${Math.round(r.right)} of ` +
               `${innerWidth}px)`);
    if (scroller) {
      const sr = scroller.getBoundingClientRect();
      if (r.left < sr.left - 1 || r.right > sr.right + 1)
        scrolled.push(e.tagName + ' ' + JSON.stringify(e.textContent.slice(0, 60)) +
                      ` (${Math.round(r.left - sr.left)} to ${Math.round(r.right - sr.left)} ` +
                      `of ${Math.round(sr.width)}px)`);
    }
    if (why.length) cut.push(e.tagName + ' ' + JSON.stringify(e.textContent.slice(0, 60)) + ': ' +
                             why.join('; '));
  }
  return {width: innerWidth, page_width: document.documentElement.scrollWidth, hosts: hosts,
          running: rows('running'), queue: rows('queue'), users: rows('users'),
          completed: rows('completed'), title: document.title, cut: cut, scrolled: scrolled,
          html: document.documentElement.outerHTML};
})()"""


def get(url, data=None):
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def running_web(dq):
    """dq-web as dqalice on node1 (as dq.conf says now): its URL, once it
    answers; stopped afterwards (its whole process group)."""
    port = free_port()
    p = dq.popen("node1", ALICE, "web", "--port", port)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: _answers(url), timeout=20, what="dq-web to answer")
        yield url
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)


@pytest.fixture
def web(cluster, dq):
    with running_web(dq) as url:
        yield url


def _answers(url):
    try:
        return get(url)[0] == 200
    except OSError:
        return False


# The colours dq's page gives each state (from the Okabe-Ito palette, README
# "The live page"): a GPU in use (its memory bar), the word "free" of a
# free GPU, a drained host, an unreachable host.
BUSY, FREE, DRAINED, DOWN = (0, 114, 178), (0, 110, 80), (230, 159, 0), (213, 94, 0)


def rgb(colour):
    return "rgb(%d, %d, %d)" % colour


def pixels(b, box):
    """How often each colour is among the screenshot's pixels in box (an
    area of the page)."""
    clip = {k: box[k] for k in ("x", "y")}
    clip.update(width=max(1, box["width"]), height=max(1, box["height"]))
    _, _, rows = png_pixels(b.screenshot(clip))
    return collections.Counter(p for row in rows for p in row)


def check_page(b, seen, name, running, waiting, held):
    """What a person sees on the page (seen: SEEN's answer) at one size."""
    where = f"{name} ({seen['width']}px wide)"
    assert seen["title"] == "dq: 1 of 7 GPUs free", where
    # every text whole and in the window; the page never scrolls sideways
    assert seen["cut"] == [], (where, seen["cut"])
    assert seen["page_width"] <= seen["width"], (where, seen["page_width"])
    if seen["width"] >= 1000:
        assert seen["scrolled"] == [], (where, seen["scrolled"])
    else:   # a phone: a table may scroll sideways, but only its last (Script) column
        assert all(s.startswith(("TH \"Script\"", "TD \"/")) for s in seen["scrolled"]), \
            (where, seen["scrolled"])
    hosts = {h["name"]: h for h in seen["hosts"]}
    assert [h["name"] for h in seen["hosts"]] == ["node1", "node2", "node3", "node4"], where
    for h in seen["hosts"]:
        assert h["box"]["x"] >= 0 and h["box"]["x"] + h["box"]["width"] <= seen["width"], \
            (where, h["name"], h["box"])
    # node1: its one GPU, in use by the running job (blue bar)
    [g] = hosts["node1"]["gpus"]
    assert "NVIDIA A100-SXM4-80GB" in g["text"] and f"{ALICE} fake-cuda (dq job {running})" \
        in g["text"] and g["classes"] == "gpu", (where, g)
    assert g["fill"] == rgb(BUSY) and g["fill_box"]["width"] >= 3, (where, g)
    assert pixels(b, g["fill_box"]).most_common(1)[0][0] == BUSY, where
    # node2: GPU 0 in use by hand (blue bar), GPU 1 free (the word, green)
    busy, free = hosts["node2"]["gpus"]
    assert f"{BOB} fake-cuda (by hand, pid" in busy["text"] and busy["fill"] == rgb(BUSY), where
    assert pixels(b, busy["fill_box"]).most_common(1)[0][0] == BUSY, where
    assert free["classes"] == "gpu free" and free["text"].endswith("free"), (where, free)
    assert free["free_word"] == rgb(FREE), (where, free)
    assert FREE in pixels(b, free["word_box"]), where
    # node3: drained, with its reason, in orange; its four GPUs listed
    h = hosts["node3"]
    assert h["classes"] == "host drained" and h["border"] == rgb(DRAINED) + " dotted", (where, h)
    [tag] = h["tags"]
    assert tag["text"] == "drained: fan <broken>" and tag["background"] == rgb(DRAINED), where
    assert pixels(b, tag["box"]).most_common(1)[0][0] == DRAINED, where
    assert DRAINED in pixels(b, dict(h["box"], height=2)), where     # its top border
    assert len(h["gpus"]) == 4 and all("GTX 1080 Ti" in g["text"] for g in h["gpus"]), where
    # node4: unreachable, in vermilion
    h = hosts["node4"]
    assert h["classes"] == "host down" and h["border"] == rgb(DOWN) + " dashed", (where, h)
    [tag] = h["tags"]
    assert tag["text"] == "unreachable" and tag["background"] == rgb(DOWN), where
    assert pixels(b, tag["box"]).most_common(1)[0][0] == DOWN, where
    # the tables: the running job (its description as text), the queue in
    # order with each job's reason, the users
    [row] = seen["running"]
    assert row[:3] == [running, ALICE, "node1/0"] and row[5].endswith(f"train.sh ({EVIL})"), \
        (where, row)
    assert [(r[0], r[1], r[2], r[4]) for r in seen["queue"]] == \
        [(waiting, BOB, "2", "GPUs busy"), (held, ALICE, "1", "held")], (where, seen["queue"])
    assert seen["users"] == [[ALICE, "1", "1", "1"], [BOB, "0", "0", "1"]], where
    # user input shows as text, never as markup
    html = seen["html"]
    assert "&lt;b&gt;bold&lt;/b&gt;&lt;img src=x onerror=alert(1)&gt;" in html, where
    assert "<b>bold</b>" not in html and "<img" not in html, where


def test_the_page_shows_the_cluster(cluster, dq):
    configure(dq, ["node1", "node2", "node3", "node4"], admins=ALICE, timeout=3)
    cluster.set_gpus("node1", 1)
    cluster.set_gpus("node2", 2)
    cluster.hold_gpu("node2", BOB, 0)          # by hand; node2's GPU 1 stays free
    cluster.stop_sshd("node4")     # dead (the reset after the test resumes it)
    _, long = script(cluster, ALICE, "train.sh", "exec fake-cuda --hold 60 --mem 5000\n")
    _, other = script(cluster, BOB, "b.sh", "sleep 1\n")
    running, _ = submit(dq, "node1", ALICE, long, env={"DQ_DESC": EVIL, "DQ_TIME": "1h",
                                                        "DQ_HOSTS": "node1"})
    wait_state(dq, running, "running")
    assert dq.run("node1", ALICE, "drain", "node3", "-r", "fan <broken>").returncode == 0
    waiting, _ = submit(dq, "node1", BOB, other, env={"DQ_HOSTS": "node1,node2", "DQ_GPUS": "2"})
    held, _ = submit(dq, "node1", ALICE, long, env={"DQ_HOSTS": "node1"})
    assert dq.run("node1", ALICE, "hold", held).returncode == 0
    with running_web(dq) as url:
        status, body = get(url + "api/state")
        assert status == 200
        state = json.loads(body)
        hosts = {h["host"]: h for h in state["hosts"]}
        assert hosts["node1"]["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"
        assert hosts["node1"]["gpus"][0]["job"] == running
        assert hosts["node2"]["gpus"][0]["processes"][0]["user"] == BOB
        assert hosts["node2"]["gpus"][1]["free"]
        assert hosts["node3"]["drained"]["reason"] == "fan <broken>"
        assert not hosts["node4"]["reachable"]
        assert {j["id"]: j["reason"] for j in state["queue"]} == \
            {waiting: "GPUs busy", held: "held"}
        assert [j["id"] for j in state["running"]] == [running]
        # node1's GPU and node2's first busy, node3's four drained, node4 dead
        assert (state["free_gpus"], state["total_gpus"]) == (1, 7)
        # one poll serves everybody for a few seconds
        assert json.loads(get(url + "api/state")[1])["polls"] == state["polls"]
        # read-only
        assert get(url + "api/state", data=b"x")[0] == 405

        # the page as a browser renders it, at a laptop's, a phone's and a
        # wall display's size: what a person sees there
        if not CHROMIUM:
            pytest.fail("chromium is not installed (.ci/run installs it)")
        shots = tempfile.mkdtemp(dir=cluster.base)
        b = Browser()
        try:
            for name, (width, height) in (("dq-web.png", (1280, 1000)), ("phone.png", (390, 844)),
                                          ("wall.png", (3840, 2160))):
                b.open(url, width, height)
                wait_until(lambda: b.eval(RENDERED), timeout=30, what=f"the page at {name}")
                seen = b.eval(SEEN)
                with open(os.path.join(shots, name), "wb") as f:
                    f.write(b.screenshot())
                check_page(b, seen, name, running=running, waiting=waiting, held=held)
        finally:
            b.close()
        if os.environ.get("DQ_WEB_SCREENSHOT"):     # to refresh docs/dq-web.png
            shutil.copy(os.path.join(shots, "dq-web.png"),
                        os.path.join(DOCS, "dq-web.png"))


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


# A shared GPU's bar (issue 19): each sharing job's booked part, side by
# side, in alternating blues, then what is used by hand, in grey.
SHARE_BARS = r"""(() => [...document.querySelectorAll('#hosts .host')].map(h => ({
  name: h.querySelector('h3 span').textContent,
  gpus: [...h.querySelectorAll('.gpu')].map(g => {
    const bar = g.querySelector('.bar'), r = bar.getBoundingClientRect();
    return {text: g.textContent, bar: {x: r.left + scrollX, y: r.top + scrollY,
                                       width: r.width, height: r.height},
            parts: [...bar.children].map(p => { const q = p.getBoundingClientRect();
              return {title: p.title, classes: p.className, x: q.left + scrollX,
                      y: q.top + scrollY, width: q.width, height: q.height,
                      colour: getComputedStyle(p).backgroundColor}; })};
  })})))()"""
SHARE_A, SHARE_B, HAND = (0, 114, 178), (86, 180, 233), (153, 153, 153)


def test_a_shared_gpu_shows_each_jobs_part(cluster, dq):
    configure(dq, ["node1"], poll_interval=0.5, sample_interval=1)
    cluster.set_gpus("node1", 1)
    cluster.hold_gpu("node1", BOB, 0, memory_mb=8192)      # 8G by hand
    _, path = script(cluster, ALICE, "share.sh", "exec fake-cuda --hold 60 --mem 4000\n")
    _, other = script(cluster, BOB, "share.sh", "exec fake-cuda --hold 60 --mem 2000\n")
    a, _ = submit(dq, "node1", ALICE, path, env={"DQ_MEM": "16G"})
    b, _ = submit(dq, "node1", BOB, other, env={"DQ_MEM": "8G"})
    for j, user in ((a, ALICE), (b, BOB)):
        wait_until(lambda: (wait_state(dq, j, "running", user=user)["gpu_use"] or {}).get(
            "mem_mib"), timeout=15, what=f"a sample of {j}'s GPU use")
    with running_web(dq) as url:
        state = json.loads(get(url + "api/state")[1])
        [g] = state["hosts"][0]["gpus"]
        assert [(x["job"], x["mem_mib"]) for x in g["bookings"]] == [(a, 16384), (b, 8192)]
        assert g["foreign_mib"] == 8192
        if not CHROMIUM:
            pytest.fail("chromium is not installed (.ci/run installs it)")
        br = Browser()
        try:
            br.open(url, 1280, 800)
            wait_until(lambda: br.eval(RENDERED), timeout=30, what="the page")
            [h] = br.eval(SHARE_BARS)
            [gpu] = h["gpus"]
            # the words: each job with its booking, and the process by hand
            assert f"dq job {a} ({ALICE}) uses 3.9 of 16 GB booked" in gpu["text"], gpu
            assert f"dq job {b} ({BOB}) uses 2.0 of 8.0 GB booked" in gpu["text"], gpu
            assert f"{BOB} fake-cuda (by hand, pid" in gpu["text"], gpu
            # the running table: each job's GPU memory, used now of booked
            rows = {r[0]: r for r in br.eval(SEEN)["running"]}
            assert rows[a][2] == "node1/0 3.9G/16G" and rows[b][2] == "node1/0 2.0G/8.0G", rows
            # the bar: 16/80, 8/80 and 8/80 of its width, in that order, each
            # drawn in its colour (pixels of a screenshot of it)
            parts, width = gpu["parts"], gpu["bar"]["width"]
            assert [q["classes"] for q in parts] == ["share s0", "share s1", "hand"], parts
            for q, mib in zip(parts, (16384, 8192, 8192)):
                assert abs(q["width"] - width * mib / 81920) <= 2, (q, width)
            assert parts[0]["x"] < parts[1]["x"] < parts[2]["x"]
            for q, colour in zip(parts, (SHARE_A, SHARE_B, HAND)):
                inner = dict(q, x=q["x"] + 2, width=q["width"] - 4)   # not the white edge
                assert pixels(br, inner).most_common(1)[0][0] == colour, (q, colour)
        finally:
            br.close()


# The history part of the wall page (issue 21), as a person sees it: the two
# charts with their areas (one per user) and legends, the week's table, each
# GPU's sparkline, and the colours actually drawn in each chart.
HISTORY_SEEN = r"""(() => {
  const box = e => { const r = e.getBoundingClientRect();
    return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; };
  const charts = {};
  document.querySelectorAll('#charts .chart').forEach(c => {
    charts[c.id] = {caption: c.querySelector('figcaption').textContent, box: box(c),
      svg: box(c.querySelector('svg')),
      areas: [...c.querySelectorAll('svg path')].map(p => ({
        user: p.dataset.user, fill: p.getAttribute('fill'),
        title: p.querySelector('title').textContent, box: box(p)})),
      legend: [...c.querySelectorAll('.legend li')].map(li => ({
        text: li.textContent, colour: li.querySelector('.swatch') ?
          getComputedStyle(li.querySelector('.swatch')).backgroundColor : null}))};
  });
  return {charts: charts,
    week: [...document.querySelectorAll('#week tr')].slice(1).map(
      r => [...r.cells].map(c => c.textContent)),
    sparks: [...document.querySelectorAll('#hosts .gpu')].map(g => {
      const s = g.querySelector('svg.spark');
      return s ? {label: s.getAttribute('aria-label'), box: box(s),
                  line: !!s.querySelector('polyline')} : null; }),
    running: [...document.querySelectorAll('#running tr')].slice(1).map(
      r => [...r.cells].map(c => c.textContent))};
})()"""
OKABE_ITO = {"#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
             "#000000"}


def hex_rgb(colour):
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_the_wall_page_shows_who_used_the_gpus(cluster, dq):
    """A week of history of two users (synthetic, written as dq writes it)
    plus their real jobs today: the page's charts have one area per user,
    named in the legend, the week's table says what dq-report says, each
    GPU has its utilisation sparkline, and an idle job is marked IDLE."""
    configure(dq, ["node1", "node2"], poll_interval=0.5, sample_interval=1, idle_after="4s")
    cluster.set_gpus("node1", 2)
    cluster.set_gpus("node2", 2)
    now = time.time()
    synthetic_history(dq, ALICE, now, recent=[(5, 1, 1)])
    synthetic_history(dq, BOB, now, recent=[(8, 3, 2)])
    _, quick = script(cluster, ALICE, "quick.sh", "exec fake-cuda --hold 2 --mem 1000\n")
    _, busy = script(cluster, BOB, "busy.sh", "exec fake-cuda --hold 120 --mem 3000 --util 80\n")
    _, nap = script(cluster, ALICE, "nap.sh", "sleep 120\n")
    done, _ = submit(dq, "node1", ALICE, quick)
    wait_state(dq, done, "done", timeout=30)
    running, _ = submit(dq, "node1", BOB, busy, env={"DQ_HOSTS": "node2"})
    idle, _ = submit(dq, "node1", ALICE, nap, env={"DQ_HOSTS": "node1"})
    wait_state(dq, running, "running", user=BOB)
    wait_until(lambda: (job(dq, idle)["gpu_use"] or {}).get("idle"), timeout=30,
               what=f"{idle} flagged idle")
    with running_web(dq) as url:
        status, body = get(url + "api/history")
        assert status == 200
        h = json.loads(body)
        # made once a minute for every viewer
        again = json.loads(get(url + "api/history")[1])
        assert (again["made"], again["at"]) == (h["made"], h["at"]) == (1, h["at"])
        report = json.loads(dq.run("node1", BOB, "report", "--since", "7d", "--by", "user",
                                   "--json", check=True).stdout)
        assert h["week"] == report, (h["week"], report)
        assert [r["user"] for r in report] == [ALICE, BOB]
        for name in ("24h", "7d"):
            assert {u["user"] for u in h["charts"][name]["users"]} == {ALICE, BOB}, name
        # the week's GPU-hours in the 7-day chart: the ended jobs' (as in
        # the report) and the running ones' so far
        spans = {j["id"]: time.time() - j["started"] for j in jobs(dq)
                 if j["state"] == "running"}
        for u in h["charts"]["7d"]["users"]:
            mine = [r for r in report if r["user"] == u["user"]][0]["gpu_hours"]
            run_h = sum(s for i, s in spans.items() if i.endswith("-" + u["user"])) / 3600
            assert mine <= u["gpu_hours"] <= mine + run_h + 0.01, (u["user"], u["gpu_hours"])
        if not CHROMIUM:
            pytest.fail("chromium is not installed (.ci/run installs it)")
        shots = tempfile.mkdtemp(dir=cluster.base)
        b = Browser()
        try:
            for name, (width, height) in (("laptop", (1280, 1000)), ("phone", (390, 844)),
                                          ("wall", (3840, 2160))):
                b.open(url, width, height)
                wait_until(lambda: b.eval(RENDERED) and b.eval(
                    "document.querySelectorAll('#charts .chart').length === 2"),
                    timeout=30, what=f"the page with its history at {name}")
                seen, hist = b.eval(SEEN), b.eval(HISTORY_SEEN)
                with open(os.path.join(shots, name + ".png"), "wb") as f:
                    f.write(b.screenshot())
                where = f"{name} ({width}px)"
                # nothing cut off, nothing out of the window
                assert seen["cut"] == [], (where, seen["cut"])
                assert seen["page_width"] <= width, (where, seen["page_width"])
                charts = hist["charts"]
                assert [c["caption"] for c in charts.values()] == \
                    ["Last 24 hours", "Last 7 days"], where
                colours = {}
                for cid, c in charts.items():
                    assert c["box"]["x"] >= 0 and c["box"]["x"] + c["box"]["width"] <= width, \
                        (where, cid, c["box"])
                    assert c["svg"]["width"] >= 200 and c["svg"]["height"] >= 80, (where, c)
                    # one area per user, in an Okabe-Ito colour, named in the legend
                    assert sorted(a["user"] for a in c["areas"]) == [ALICE, BOB], (where, c)
                    for a in c["areas"]:
                        assert a["fill"] in OKABE_ITO, (where, a)
                        assert colours.setdefault(a["user"], a["fill"]) == a["fill"], \
                            (where, "a user's colour differs between the charts")
                        assert a["title"].startswith(a["user"] + ": "), a
                    legend = {li["text"].split(" ")[0]: li for li in c["legend"]}
                    assert set(legend) == {ALICE, BOB}, (where, c["legend"])
                    for u, li in legend.items():
                        assert li["text"].endswith(" GPU-h"), li
                        assert li["colour"] == rgb(hex_rgb(colours[u])), (where, li)
                    # each user's colour is drawn in the chart (a screenshot of it)
                    drawn = pixels(b, c["svg"])
                    for u in (ALICE, BOB):
                        assert drawn[hex_rgb(colours[u])] > 20, (where, cid, u)
                assert colours[ALICE] != colours[BOB]
                # the week's table: dq-report's rows, then a total
                assert hist["week"][:-1] == [
                    [r["user"], str(r["jobs"]), f"{r['gpu_hours']:.2f}",
                     f"{r['idle_gpu_hours']:.2f}"] for r in report], (where, hist["week"])
                assert hist["week"][-1][0] == "total", where
                # a sparkline beside every GPU's bar; the busy GPU's is drawn
                assert len(hist["sparks"]) == 4 and all(hist["sparks"]), (where, hist["sparks"])
                assert all(s["box"]["width"] >= 30 and s["box"]["x"] + s["box"]["width"] <= width
                           for s in hist["sparks"]), (where, hist["sparks"])
                assert any(s["line"] and "now 80%" in s["label"] for s in hist["sparks"]), \
                    (where, hist["sparks"])
                # the job whose GPU sits unused is marked IDLE; the busy one is not
                rows = {r[0]: r for r in hist["running"]}
                assert " IDLE " in rows[idle][2] and "IDLE" not in rows[running][2], (where, rows)
        finally:
            b.close()
        if os.environ.get("DQ_WEB_SCREENSHOT"):     # to refresh docs/dq-web-history.png
            shutil.copy(os.path.join(shots, "laptop.png"), os.path.join(DOCS, "dq-web-history.png"))
