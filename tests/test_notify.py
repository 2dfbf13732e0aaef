"""Notifications at a job's end (issue 12): DQ_MAIL through a real SMTP
server (aiosmtpd, started here), one summary mail per sweep, the user's
~/.config/dq/on-end hook -- and neither a dead mail server nor a hanging
hook may hold up the next job, lose an end, or leave a process behind."""
import json
import os
import pwd
import re
import shutil
import threading

import pytest

from dqtest import ALICE, configure, free_port, job, jobs, log_of, script, submit, \
    wait_state, wait_until

from aiosmtpd.controller import Controller     # a real SMTP server (.ci/run installs it)


class Inbox:
    def __init__(self):
        self.mails, self.lock = [], threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        import email
        msg = email.message_from_bytes(envelope.content)
        with self.lock:
            self.mails.append({"to": envelope.rcpt_tos, "subject": msg["Subject"],
                               "body": msg.get_payload(decode=True).decode()
                               .replace("\r\n", "\n")})
        return "250 OK"

    def wait(self, n, timeout=30):
        return wait_until(lambda: (lambda m: m if len(m) >= n else None)(list(self.mails)),
                          timeout=timeout, what=f"{n} mail(s)")


@pytest.fixture
def inbox():
    box = Inbox()
    port = free_port()
    ctl = Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    box.port = port
    try:
        yield box
    finally:
        ctl.stop()


def hook(user, body):
    """Install user's ~/.config/dq/on-end; returns a cleanup function."""
    pw = pwd.getpwnam(user)
    d = os.path.join(pw.pw_dir, ".config", "dq")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "on-end")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    for p in (os.path.join(pw.pw_dir, ".config"), d, path):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    return lambda: shutil.rmtree(os.path.join(pw.pw_dir, ".config", "dq"), ignore_errors=True)


class Ends:
    """alice's on-end hook, writing down the ID of each job it ran for.
    At a job's end dq sends its mail (if any) and then runs the hook: the
    hook having run for a job is the event after which no mail of that
    job can come any more -- what a "no mail" check waits for."""

    def __init__(self, cluster, dq):
        # one file per install: job IDs start again at 1 in each
        self.out = os.path.join(cluster.user_dir(ALICE, "ends"), os.path.basename(dq.root))
        if os.path.exists(self.out):
            os.unlink(self.out)
        self.cleanup = hook(ALICE, f'cat > /dev/null; echo "$DQ_JOB_ID" >> {self.out}\n')

    def ids(self):
        try:
            with open(self.out) as f:
                return f.read().split()
        except FileNotFoundError:
            return []

    def wait(self, ids, timeout=30):
        return wait_until(lambda: set(ids) <= set(self.ids()), timeout=timeout,
                          what=f"the on-end hook to run for {' '.join(ids)}")


@pytest.fixture
def ends(cluster, dq):
    e = Ends(cluster, dq)
    try:
        yield e
    finally:
        e.cleanup()


def test_mail_at_the_end_with_subject_and_log(cluster, dq, inbox, ends):
    configure(dq, ["node1"], smtp=f"127.0.0.1:{inbox.port}", mail_domain="example.org")
    d, path = script(cluster, ALICE, "train.sh", "for i in $(seq 1 30); do echo line $i; done\n"
                                                 "exit 2\n")
    failed, _ = submit(dq, "node1", ALICE, path, env={"DQ_MAIL": "1", "DQ_LR": "0.1"})
    mail = inbox.wait(1)[0]
    j = wait_state(dq, failed, "failed")
    assert mail["to"] == [f"{ALICE}@example.org"]
    assert mail["subject"].startswith(f"dq: {failed} failed, exit 2, ")
    assert f"node1/{j['gpus'][0]}" in mail["subject"]
    assert path in mail["body"] and d in mail["body"] and "DQ_LR=0.1" in mail["body"]
    last20 = log_of(dq, failed).splitlines()[-20:]
    assert last20[0] == "line 12" and last20[-1] == f"dq: {failed}: exit status 2"
    assert mail["body"].endswith("\n".join(last20) + "\n")      # the log's last 20 lines
    assert "line 11\n" not in mail["body"]
    # DQ_MAIL_ON=fail: nothing for a job that ended done
    _, ok = script(cluster, ALICE, "ok.sh", "echo fine\n")
    done, _ = submit(dq, "node1", ALICE, ok, env={"DQ_MAIL": "a@example.org",
                                                   "DQ_MAIL_ON": "fail"})
    bad, _ = submit(dq, "node1", ALICE, path, env={"DQ_MAIL": "a@example.org",
                                                    "DQ_MAIL_ON": "fail"})
    wait_state(dq, done, "done")
    wait_state(dq, bad, "failed")
    ends.wait([failed, done, bad])      # both notified: every mail they send is in
    assert [m["subject"].split(",")[0] for m in inbox.mails] == \
        [f"dq: {failed} failed", f"dq: {bad} failed"]


def test_a_sweep_sends_one_summary(cluster, dq, inbox, ends):
    configure(dq, ["node1"], smtp=f"127.0.0.1:{inbox.port}", mail_domain="example.org")
    d, path = script(cluster, ALICE, "s.sh", '[ "$DQ_X" != 2 ] || exit 5\n')
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_X=1,2,3,4", path, cwd=d,
               env={"DQ_MAIL": "1"})
    ids = re.findall(r"^Job ID: '(\S+)'$", r.stdout, re.M)
    assert len(ids) == 4
    mail = inbox.wait(1)[0]
    assert mail["subject"] == f"dq: sweep {ids[0]} ended: 3 done, 1 failed"
    assert f"{ids[1]} failed: exit status 5" in mail["body"]
    for i in ids:
        wait_state(dq, i, ("done", "failed"))
    ends.wait(ids)          # each job's end notified: no mail of the sweep can come now
    assert [m["subject"] for m in inbox.mails] == [mail["subject"]]


def test_the_hook_gets_the_jobs_json(cluster, dq):
    configure(dq, ["node1"])
    out = os.path.join(cluster.user_dir(ALICE, "hook"), "got.json")
    cleanup = hook(ALICE, f"cat > {out}.tmp; echo \"$DQ_JOB_ID\" >> {out}.id; "
                          f"mv {out}.tmp {out}\n")
    try:
        _, path = script(cluster, ALICE, "s.sh", "echo hi\n")
        job_id, _ = submit(dq, "node1", ALICE, path, env={"DQ_DESC": "<b>x</b>"})
        got = wait_until(lambda: os.path.exists(out) and json.load(open(out)), timeout=20,
                         what="the hook's file")
        assert got["id"] == job_id and got["state"] == "done" and got["exit_code"] == 0
        assert got["desc"] == "<b>x</b>" and got["host"] == "node1"
        assert open(out + ".id").read().strip() == job_id
    finally:
        cleanup()


def test_dead_mail_server_and_hanging_hook_change_nothing(cluster, dq):
    configure(dq, ["node1"], smtp=f"127.0.0.1:{free_port()}", timeout=2, kill_grace=1)
    cluster.set_gpus("node1", 1)
    cleanup = hook(ALICE, "sleep 1000 &\nexec sleep 999\n")
    try:
        _, path = script(cluster, ALICE, "s.sh", "sleep 1\n")
        first, _ = submit(dq, "node1", ALICE, path, env={"DQ_MAIL": "a@example.org"})
        second, _ = submit(dq, "node1", ALICE, path)
        a = wait_state(dq, first, "done")
        b = wait_state(dq, second, ("running", "done"))
        assert b["started"] - a["ended"] < 1.0, (a["ended"], b["started"])
        # both failures are recorded and shown; the hook's processes are gone
        problems = wait_until(lambda: job(dq, first)["notify"].keys() >= {"mail", "hook"}
                              and job(dq, first)["notify"], timeout=20,
                              what="notification problems recorded")
        assert "cannot mail a@example.org" in problems["mail"]
        assert "did not finish within 2s" in problems["hook"]
        r = dq.run("node1", ALICE, "jobs", "complete")
        assert f"{first}: mail failed: cannot mail" in r.stdout
        wait_state(dq, second, "done")
        wait_until(lambda: not cluster.run("node1", ALICE, ["pgrep", "-u", ALICE, "-f",
                                                            "sleep 10*0"]).stdout.strip()
                   and not cluster.run("node1", ALICE, ["pgrep", "-u", ALICE, "-f",
                                                        "sleep 999"]).stdout.strip(),
                   timeout=20, what="the hook's processes to be gone")
        assert len(jobs(dq, view="complete")) == 2
    finally:
        cleanup()


def test_the_readmes_experiment(cluster, dq, inbox, ends):
    # README, "Experiments": a 3x2 grid (retries, mail only on failure), an
    # evaluation after all of it (DQ_AFTER_ANY over the range), dq-wait,
    # and one mail: the evaluation's.
    configure(dq, ["node1", "node2"], smtp=f"127.0.0.1:{inbox.port}", mail_domain="example.org")
    d, train = script(cluster, ALICE, "train.sh", 'echo "lr=$DQ_LR seed=$DQ_SEED"\n')
    _, evaluate = script(cluster, ALICE, "eval.sh", "cat ../*/nothing 2>/dev/null; echo eval\n")
    r = dq.run("node1", ALICE, "submit", "--grid", "DQ_LR=0.1,0.01,0.001", "--grid",
               "DQ_SEED=1,2", train, cwd=d,
               env={"DQ_RETRY": "2", "DQ_MAIL": "1", "DQ_MAIL_ON": "fail"})
    ids = re.findall(r"^Job ID: '(\S+)'$", r.stdout, re.M)
    assert len(ids) == 6, r.stdout + r.stderr
    span = f"{ids[0].split('-')[0]}-{ids[-1].split('-')[0]}"
    e, r = submit(dq, "node1", ALICE, evaluate,
                  env={"DQ_AFTER_ANY": span, "DQ_MAIL": "1", "DQ_GPUS": "0"})
    assert job(dq, e)["after_any"] == ids
    r = dq.run("node2", ALICE, "wait", e.split("-")[0], "-t", "60")
    assert r.returncode == 0 and r.stdout.startswith(f"{e} done exit 0 runtime "), r.stdout
    ended = max(job(dq, i)["ended"] for i in ids)
    assert job(dq, e)["started"] >= ended
    ends.wait(ids + [e])    # every end notified: all mails there are to come are in
    assert len(inbox.mails) == 1, [m["subject"] for m in inbox.mails]   # the sweep went well
    mail = inbox.mails[0]
    assert mail["subject"].startswith(f"dq: {e} done, exit 0") and "eval\n" in mail["body"]
