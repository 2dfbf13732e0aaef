"""DQ_RESUME=N (issue 20): a job that exits 75 ("checkpointed, run me
again") is queued again at once, up to N times, as a chain that dq-wait,
dependencies and listings follow to its last run."""
import os

from dqtest import ALICE, configure, jobs, log_of, refused_at_submit, script, submit, \
    wait_state
from test_notify import ends, inbox  # noqa: F401 (fixtures: an SMTP server, the on-end hook)

# Each run counts itself in ./count; run N (0, 1, ...) exits with the N-th
# of the statuses given (the last one over and over).
COUNTING = """n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count
set -- {statuses}
shift $(( n < $# - 1 ? n : $# - 1 ))
echo "run $n of $DQ_JOB_ID exits $1"
exit $1
"""


def chain_of(dq, path):
    """The completed runs of the script at path, oldest first."""
    return sorted((j for j in jobs(dq, view="complete") if j["script"] == path),
                  key=lambda j: int(j["id"].split("-")[0]))


def test_resume_runs_again_until_done_or_used_up(cluster, dq):
    configure(dq, ["node1"])
    # exits 75 twice, then 0: three runs, the last one done
    d, path = script(cluster, ALICE, "ckpt.sh", COUNTING.format(statuses="75 75 0"),
                     subdir="resume-done")
    first, _ = submit(dq, "node1", ALICE, path, env={"DQ_RESUME": "2"})
    r = dq.run("node2", ALICE, "wait", first, "-t", "60")
    runs = chain_of(dq, path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"{first} done (as {runs[-1]['id']}) exit 0"), r.stdout
    assert [j["state"] for j in runs] == ["resumed", "resumed", "done"]
    assert [j["exit_code"] for j in runs] == [75, 75, 0]
    assert [j["resume_of"] for j in runs] == [None, runs[0]["id"], runs[1]["id"]]
    assert [j["resumes"] for j in runs] == [0, 1, 2]
    assert [j["requeued_as"] for j in runs] == [runs[1]["id"], runs[2]["id"], None]
    assert runs[0]["reason"] == f"exit status 75; resumed as {runs[1]['id']}"
    assert all(j["env"]["DQ_RESUME"] == "2" and j["cwd"] == d for j in runs)
    assert "run 2 of" in log_of(dq, runs[2]["id"])
    r = dq.run("node1", ALICE, "jobs", "complete")
    assert f"resumed -> {runs[1]['id']}" in r.stdout and f"resumed -> {runs[2]['id']}" in r.stdout
    assert not [j for j in jobs(dq) if j["script"] == path]     # nothing left queued

    # always 75: the resumes used up, the last exit 75 is a failure
    d, path = script(cluster, ALICE, "stuck.sh", COUNTING.format(statuses="75"),
                     subdir="resume-stuck")
    first, _ = submit(dq, "node1", ALICE, path, env={"DQ_RESUME": "2"})
    # a job waiting on the chain counts its last run: cancelled, naming it
    after, _ = submit(dq, "node1", ALICE, path, env={"DQ_AFTER": first}, cwd=d)
    r = dq.run("node2", ALICE, "wait", first, "-t", "60")
    runs = [j for j in chain_of(dq, path) if j["id"] != after]
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith(f"{first} failed (as {runs[2]['id']}) exit 75"), r.stdout
    assert [j["state"] for j in runs] == ["resumed", "resumed", "failed"]
    assert runs[2]["reason"] == "exit status 75" and runs[2]["requeued_as"] is None
    cancelled = wait_state(dq, after, "cancelled")
    assert f"dependency {first} ended failed (as {runs[2]['id']})" in cancelled["reason"]
    with open(os.path.join(d, "count")) as f:
        assert f.read().strip() == "3"      # three runs, no fourth


def test_resume_and_retry_share_one_chain(cluster, dq):
    configure(dq, ["node1"])
    # 75 (resumed), 3 (retried), 0: DQ_RETRY applies to a resumed run's failure,
    # and each run carries both counts
    d, path = script(cluster, ALICE, "mixed.sh", COUNTING.format(statuses="75 3 0"),
                     subdir="resume-mixed")
    first, _ = submit(dq, "node1", ALICE, path, env={"DQ_RESUME": "1", "DQ_RETRY": "1"})
    after, _ = submit(dq, "node1", ALICE, path, env={"DQ_AFTER": first}, cwd=d)
    r = dq.run("node2", ALICE, "wait", first, "-t", "60")
    assert r.returncode == 0 and "done (as " in r.stdout, r.stdout + r.stderr
    runs = [j for j in chain_of(dq, path) if j["id"] != after]
    assert [j["state"] for j in runs] == ["resumed", "failed", "done"]
    assert (runs[1]["resume_of"], runs[2]["retry_of"]) == (runs[0]["id"], runs[1]["id"])
    assert [(j["resumes"], j["retries"]) for j in runs] == [(0, 0), (1, 0), (1, 1)]
    # the dependent ran after the chain's last run, which ended done
    dep = wait_state(dq, after, "done")
    assert dep["started"] >= runs[2]["ended"]

    # without DQ_RESUME, exit 75 is a failure like any other
    d, path = script(cluster, ALICE, "plain.sh", "exit 75\n", subdir="resume-plain")
    job_id, _ = submit(dq, "node1", ALICE, path)
    j = wait_state(dq, job_id, "failed")
    assert j["exit_code"] == 75 and j["requeued_as"] is None


def test_a_resumed_job_mails_once_at_its_last_run(cluster, dq, inbox, ends):
    configure(dq, ["node1"], smtp=f"127.0.0.1:{inbox.port}", mail_domain="example.org")
    d, path = script(cluster, ALICE, "mail.sh", COUNTING.format(statuses="75 75 4"),
                     subdir="resume-mail")
    first, _ = submit(dq, "node1", ALICE, path, env={"DQ_RESUME": "2", "DQ_MAIL": "1"})
    mail = inbox.wait(1)[0]
    runs = chain_of(dq, path)
    assert [j["state"] for j in runs] == ["resumed", "resumed", "failed"]
    assert mail["subject"].startswith(f"dq: {runs[2]['id']} failed, exit 4, ")
    ends.wait([j["id"] for j in runs])      # all three notified: no other mail can come
    assert len(inbox.mails) == 1


def test_exit_75_at_the_time_limit_resumes(cluster, dq):
    """A job that catches the time limit's TERM, saves a checkpoint and
    exits 75 runs again (the README's pattern, without DQ_SIGNAL)."""
    configure(dq, ["node1"], kill_grace=10)
    d, path = script(cluster, ALICE, "long.sh",
                     'step=$(cat ckpt 2>/dev/null || echo 0)\n'
                     'echo "starting at step $step"\n'
                     'trap \'echo $step > ckpt; exit 75\' TERM\n'
                     'while [ "$step" -lt 12 ]; do sleep 0.2; step=$((step+1)); done\n'
                     'echo finished\n', subdir="resume-limit")
    first, _ = submit(dq, "node1", ALICE, path, env={"DQ_RESUME": "5", "DQ_TIME": "1"})
    r = dq.run("node2", ALICE, "wait", first, "-t", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    runs = chain_of(dq, path)
    assert len(runs) >= 2 and [j["state"] for j in runs[:-1]] == ["resumed"] * (len(runs) - 1)
    assert "time limit 1s reached" in runs[0]["reason"] and "resumed as" in runs[0]["reason"]
    assert runs[-1]["state"] == "done" and "finished" in log_of(dq, runs[-1]["id"])
    assert "starting at step 0" not in log_of(dq, runs[1]["id"])


def test_bad_resume_values_are_refused(cluster, dq):
    configure(dq, ["node1"])
    d, path = script(cluster, ALICE, "s.sh", "exit 0\n", subdir="resume-bad")
    refused_at_submit(dq, path, [
        ({"DQ_RESUME": value}, [f"DQ_RESUME={value!r}", "1 to 1000", "exits 75"])
        for value in ("0", "-1", "x", "1.5", "1001")])
    assert not os.listdir(os.path.join(dq.root, "jobs", "backend"))


# The README's pattern, in shell: a long run in slices of DQ_TIME, each
# warned by DQ_SIGNAL before its limit, saving its step and exiting 75.
SLICED = """step=$(cat ckpt 2>/dev/null || echo 0)
echo "run of $DQ_JOB_ID starts at step $step, deadline $DQ_DEADLINE"
trap 'echo $step > ckpt; echo "saved step $step"; exit 75' USR1
while [ $step -lt 10 ]; do step=$((step+1)); sleep 1; done
echo "finished at step $step"
"""


def test_a_long_run_in_slices_with_dq_signal_and_dq_resume(cluster, dq):
    configure(dq, ["node1"])
    d, path = script(cluster, ALICE, "sliced.sh", SLICED, subdir="sliced")
    first, _ = submit(dq, "node1", ALICE, path, env={
        "DQ_TIME": "8s", "DQ_SIGNAL": "USR1@4s", "DQ_RESUME": "5"})
    r = dq.run("node2", ALICE, "wait", first, "-t", "90", timeout=120)
    runs = chain_of(dq, path)
    assert r.returncode == 0, r.stdout + r.stderr + str([(j["state"], j["reason"]) for j in runs])
    # three slices of about four steps each: resumed, resumed, done
    assert [j["state"] for j in runs] == ["resumed", "resumed", "done"], runs
    logs = [log_of(dq, j["id"]) for j in runs]
    assert "starts at step 0" in logs[0] and "saved step" in logs[0]
    saved = [int(log.split("saved step ")[1].split()[0]) for log in logs[:2]]
    assert 2 <= saved[0] <= 5 and saved[0] + 2 <= saved[1] <= saved[0] + 5, saved
    assert f"starts at step {saved[1]}" in logs[2] and "finished at step 10" in logs[2]
    for j, log in zip(runs, logs):    # each run's deadline: its start plus DQ_TIME
        deadline = int(log.split("deadline ")[1].split()[0])
        assert abs(deadline - (j["started"] + 8)) <= 1, (deadline, j["started"])
