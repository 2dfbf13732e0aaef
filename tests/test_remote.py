"""run_scripts, the one way dq runs commands on hosts (ssh there, /bin/sh
here): what a caller gets back in the awkward cases.  Here on this machine
(a local cluster, so /bin/sh -s); tests/test_faults.py has dead and hung
hosts over real ssh."""
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dq  # noqa: E402

LOCAL = types.SimpleNamespace(local=True, timeout=10)


def test_output_exit_status_and_stderr_come_back_per_task():
    a, b = dq.run_scripts(LOCAL, [("here", "echo one; echo two"),
                                  ("here", "echo oops >&2; exit 3")])
    assert (a.rc, a.out, a.err) == (0, "one\ntwo\n", "")
    assert (b.rc, b.out) == (3, "")
    assert b.why() == "oops"


def test_a_background_process_holding_stderr_does_not_hold_the_caller():
    # As ssh's multiplexing master does when the first command starts it.
    t = time.monotonic()
    r = dq.run_on(LOCAL, "here", "sleep 5 >/dev/null </dev/null & echo started")
    assert (r.rc, r.out) == (0, "started\n")
    assert time.monotonic() - t < 4


def test_timeout_kills_and_says_so():
    t = time.monotonic()
    r = dq.run_on(LOCAL, "here", "echo partial; exec sleep 30", timeout=0.5)
    assert r.rc == 124 and r.why() == "timed out"
    assert time.monotonic() - t < 5


def test_a_big_script_is_fed_whole():
    # More than a pipe holds: the script is written as the shell reads it.
    script = "".join(f"# filler line {i} {'x' * 60}\n" for i in range(5000)) + "echo end\n"
    assert len(script) > 4 * 65536
    r = dq.run_on(LOCAL, "here", script)
    assert (r.rc, r.out) == (0, "end\n")


def test_lines_are_streamed_in_order_with_the_host():
    seen = []
    res = dq.run_on_all(LOCAL, ["here"], lambda h: "printf 'a\\nb\\nno newline'",
                        on_line=lambda h, line: seen.append((h, line)))
    assert seen == [("here", "a\n"), ("here", "b\n"), ("here", "no newline")]
    assert res["here"].rc == 0


def test_sigpipe_is_default_in_what_runs():
    # Python ignores SIGPIPE; a shell pipeline run by dq must not inherit that.
    r = dq.run_on(LOCAL, "here", "grep SigIgn /proc/self/status")
    ignored = int(r.out.split()[1], 16)
    assert not ignored & (1 << 12), "SIGPIPE (13) is ignored in the child"


def test_a_missing_program_is_one_result_not_an_exception():
    cfg = types.SimpleNamespace(local=False, timeout=5, multiplex=False,
                                ssh=["/nonexistent/ssh"])
    r = dq.run_on(cfg, "node1", "true")
    assert r.rc == 127 and "cannot run /nonexistent/ssh" in r.err


def test_commands_run_in_a_session_of_their_own():
    # A job's wrapper launches the next job (screen -dm, which forks and
    # returns at once) and exits: the SIGHUP of its terminal goes to its
    # session, which must not hold the new screen.
    r = dq.run_on(LOCAL, "here", "echo $$; cut -d' ' -f6 /proc/$$/stat")
    pid, sid = map(int, r.out.split())
    assert sid == pid != os.getsid(0)


def test_timeout_kills_what_the_command_started_too(tmp_path):
    pidfile = tmp_path / "pid"
    r = dq.run_on(LOCAL, "here", f"sleep 31 & echo $! > {pidfile}; wait", timeout=0.5)
    assert r.rc == 124
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or \
        open(f"/proc/{child}/stat").read().split()[2] == "Z"
