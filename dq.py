#!/bin/sh
''''exec python3 -S -c 'import os,sys;sys.path[0]=os.path.dirname(os.path.realpath(sys.argv[1]));import dq;dq.boot()' "$0" "$@" # '''
# For /bin/sh, dq.py is the line above: it starts Python on dq imported as
# a module, so that Python runs its cached bytecode (__pycache__/, written
# by install.sh) instead of compiling all of dq.py for every command.
# `python3 dq.py CMD ...` works too.  BOOT below must match that line.
__doc__ = """dq -- a GPU job queue for lab clusters.

dq gives a lab one queue for all the GPUs of its servers.  `dq-submit
script.sh` queues a job; as soon as a GPU anywhere is free, dq runs the
script on that server, inside a detached GNU screen session, from the
directory it was submitted in, with CUDA_VISIBLE_DEVICES set to its GPU and
the submitter's DQ_* variables.

Commands (each is a symlink to this file; `python3 dq.py CMD ...` works too):

  dq-submit SCRIPT        queue a job (DQ_GPUS=N asks for N GPUs, 0 = CPU only)
  dq-jobs [summary|queue|complete]   list jobs (--json for data)
  dq-kill ID...           remove a queued job, or kill a running one
                          (--grace DUR: warn it with its DQ_SIGNAL first)
  dq-restart ID...        run finished jobs again (same script, cwd, env)
  dq-hold ID...           keep queued jobs from starting
  dq-release ID...        let held jobs start again
  dq-top ID...            move queued jobs to the front of your own
  dq-wait ID... [-t S]    wait until jobs have ended (exit 0: all done)
  dq-doctor               check the cluster's set-up, host by host
  dq-web [--port N]       a live page of the cluster (read-only, 127.0.0.1)
  dq-drain [HOST...] [-r REASON] [--undo]   (admins) no new jobs on hosts
  dq-free                 free GPUs per host
  dq-schedule             place queued jobs until none is left (started for you)
  dq-tail ID [-N] [-f], dq-head ID [-N], dq-logs ID, dq-grep ID PATTERN
                          a job's output
  dq-attach ID            the running job's screen session (Ctrl-a d detaches)
  dq-shell [CMD...]       a shell (or CMD) on a GPU, through the queue, in this terminal
  dq-users                every process on every GPU, by dq or by hand
  dq-on-all CMD...        run a command on every host
  dq-report [--since 7d] [--by user|host|gpu-type|day|week]   GPU-hours,
                          idle GPU-hours, end states and waits of ended jobs

Files: everything lives in the data root, the directory holding dq.py (after
resolving symlinks) or $DQ_ROOT:

  dq.conf                 [dq] hosts = ..., ssh = ...      (no file: this host)
  state/                  lock, next_id, placements.json, hosts.json, wake-<user>,
                          handover-<host>.lock
  jobs/backend/<id>/      job.json, run.json, end.json, log, gpu.json (its GPU use),
                          grace.json (dq-kill --grace's request), slurm.json
                          (backend = slurm: its Slurm ID; slurm.out: Slurm's words),
                          snapshot/ (DQ_SNAPSHOT's copy of its files) (owned by the user)
  jobs/active/<id>        one entry per queued or running job (cpu/: DQ_GPUS=0 ones)
  jobs/queue/<user>/      the user's queued jobs, in order, as file names
  jobs/done/<user>        how many of user's jobs have ended, their recent GPU use
  jobs/done/<user>.history  one JSON line per ended job of user (dq-report)
  jobs/lost/<id>          written by whoever finds a job's host lost it
  sched/<user>.lock       held by that user's dq-schedule loop
  drain/<admin>           the hosts that admin drained (dq-drain)

How a job travels through this file (`grep '^# .*###' dq.py` lists its
sections; each uses only what is above it): dq-submit (Submitting) checks
its DQ_* variables (Submit-time variables, Constraints) and writes it
(Creating jobs: job.json, then its jobs/active entry and its name in the
owner's queue: it is queued).  A pass (Scheduling) polls the hosts (Remote
execution, Hosts and GPUs) holding no lock, then under the global lock
brings the placements up to date with what the polls saw (Placement: the
Placements model and its table of states, reconcile; Leases for hosts that
do not answer), reads the queue (Queue) and lets the planner (Planning: a
pure function, with Wait reasons and GPU sharing's rules) give free GPUs and
room on shared ones to queued jobs, then starts the caller's own placed jobs
in screen sessions.  In its session the job's wrapper (Job wrapper) runs the
script, samples its GPU use (GPU use), records its end (Ended jobs and usage
counters) and hands its GPUs over to the next jobs at once (another pass).
dq-kill (Steering jobs) ends a job early; the listings (Job listings, Usage
reports, Job output, Cluster views, Web view) only read.

Where to change what (the name, then the section it is in):

  a submit-time constraint    CONSTRAINTS                 [Constraints]
  a wait reason's words       WAIT_REASONS, wait_reason   [Wait reasons]
  who goes first, backfill    plan                        [Planning]
  when a GPU takes a sharer   gpu_room, pack              [GPU sharing]
  a job's GPU use samples     GpuWatch                    [GPU use]
  when a job counts as idle   GpuWatch                    [GPU use]
  CUDA out-of-memory texts    OOM_PATTERNS                [GPU use]
  a user's own job order      order_key                   [Planning]
  other DQ_* variables        prepare_job                 [Creating jobs]
  warnings, DQ_DEADLINE       TimeLimit, job_env          [Job wrapper]
  jobs that run again         run_again, RUN_AGAIN        [Creating jobs]
  what a snapshot copies      SnapshotPlan                [Snapshots]
  dq.conf keys and defaults   Config                      [Configuration]
  dq-jobs' columns            cmd_jobs                    [Job listings]
  what the history keeps      history_record              [Ended jobs]
  dq-report's rows, windows   report_rows, report_time    [Usage reports]
  what sbatch gets for DQ_*   SLURM_VARS                  [Slurm back end]
  Slurm's reasons in words    SLURM_REASONS               [Slurm back end]
  dq-free's, dq-users' lines  cmd_free, cmd_users         [Cluster views]
  how every table looks       print_table                 [Errors and output]
  how durations read          fmt_duration, duration      [Values]
  hosts that stop answering   reconcile                   [Placement]
  lease and fencing times     LeaseTimes                  [Leases]
  when a lost job is rerun    surely_stopped              [Scheduling]
  how a job is started        launch_line                 [Scheduling]
  a job's environment         job_env                     [Job wrapper]
  ssh's options               ssh_argv                    [Remote execution]
  nvidia-smi's queries        SMI_GPUS, parse_smi_gpus    [Hosts and GPUs]
  mail texts                  send_end_mail, send_sweep_mail  [Notifications]
  the data root's layout      LAYOUT                      [Files and locks]
  what a job file may hold    JOB_FIELDS                  [Job files]
  dq-doctor's checks          doctor_host                 [Doctor]
  the live page's look        WEB_PAGE, WEB_CSS, WEB_JS   [Web page]
  the live page's data        web_state                   [Web view]

With backend = slurm in dq.conf, Slurm places and starts the jobs (Slurm
commands, Slurm back end, Slurm bookkeeping): dq-submit sbatches each job,
whose batch step runs the same wrapper in a screen session on Slurm's node.

A job's owner is whoever owns its files; dq only ever starts a job with the
credentials of its owner, over the owner's own ssh.
"""

__version__ = "0.1.0"

import configparser
import errno
import fcntl
import json
import math
import os
import pwd
import re
import shlex
import signal
import sys
import time
import _thread
# Other modules are imported where they are used: most commands (a submit
# into a busy cluster, dq-jobs) start no process, and every millisecond of
# start-up counts when jobs are submitted in bulk.  Remote commands run
# without subprocess and threads (see run_scripts), which would cost a
# dq-submit or a job's wrapper ~8-15 ms to import.

FORMAT = 1                      # version of every JSON file dq writes
DQ_PY = os.path.realpath(__file__)
# How dq starts itself (the loop, a job's wrapper): Python on dq's cached
# bytecode, as the first line does for the commands.  -S: dq needs nothing
# from site-packages, and skipping them saves a few ms per process.
BOOT = ("import os,sys;sys.path[0]=os.path.dirname(os.path.realpath(sys.argv[1]));"
        "import dq;dq.boot()")
JOB_ID_RE = re.compile(r"^([0-9]+)(?:-([a-z_][a-z0-9_.-]*[$]?))?$", re.I)
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# dq's settings, and what dq sets for a job: not job parameters
OWN_VARS = ("DQ_ROOT", "DQ_DEBUG", "DQ_JOB_ID", "DQ_DEADLINE", "DQ_LOCK_STATS", "DQ_CRASH_AT")

LOCAL_HOST = None   # the host name (as in dq.conf) of this machine, when known
SLURM_HOST = "(slurm)"      # run_scripts' name for "Slurm's commands, here"

DEBUG = bool(os.environ.get("DQ_DEBUG"))
LOCK_STATS = os.environ.get("DQ_LOCK_STATS")     # a file; for bench/
PROG = "dq"


# Errors and output ###########################################################

class Failure(Exception):
    """An expected error: main() prints it as `dq-cmd: error: ...`, exit 1."""


_warned = set()
_held = None        # a list while warnings are held back (see resolve_job)


def warn(msg):
    if _held is not None:
        _held.append(msg)
    # Once per process: a corrupt file is read by several steps of one
    # command (and by every pass of a loop), and one line says it all.
    elif msg not in _warned:
        _warned.add(msg)
        print(f"{PROG}: warning: {msg}", file=sys.stderr)


def one_line(text):
    """An error names user input and file names: one line whatever they hold."""
    return " ".join(str(text).splitlines())


def debug(msg):
    if DEBUG:
        print(f"+ {msg}", file=sys.stderr)


def crash_point(name):
    """Fault injection for the tests: DQ_CRASH_AT=name makes this process
    die by SIGKILL here, as a power cut or the OOM killer would."""
    if os.environ.get("DQ_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def me():
    return pwd.getpwuid(os.getuid()).pw_name


_user_names = {}


def is_user_name(name):
    """A user name as job IDs carry them (N-user)."""
    return JOB_ID_RE.fullmatch("0-" + name) is not None


def user_of_uid(uid):
    """The user name of a uid (remembered: each look-up reads /etc/passwd)."""
    if uid not in _user_names:
        try:
            _user_names[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _user_names[uid] = str(uid)
    return _user_names[uid]


def print_table(headers, rows):
    """Print rows in the manual's style: columns, then a dashes line."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row)]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    print(line(headers))
    print(line(["-" * len(h) for h in headers]))
    for row in rows:
        print(line(row))


def fmt_gpus(gpus):
    return ",".join(map(str, gpus)) if gpus else "-"


def use_colour():
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def env_text(env):
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k != "DQ_GPUS"
                    or v != "1")


def say_executing(launched):
    """The manual's line for each job started: [(job_id, host, gpus)]."""
    for job_id, host, gpus in launched:
        print(f"Executing '{job_id}' on {host}/{fmt_gpus(gpus)} as {me()}...", flush=True)


# Values: numbers, durations, sizes ###########################################

def whole_number(text, low=None, high=None, signed=False):
    """text as a whole number (ASCII digits, a sign only if `signed`), or
    None if it is not one or lies outside low..high.  Callers say what is
    wrong in their own words."""
    if not re.fullmatch(r"[-+]?[0-9]+" if signed else r"[0-9]+", text):
        return None
    n = int(text)
    return None if (low is not None and n < low) or (high is not None and n > high) else n


# The most seconds a setting or option may say: more than 11 days is a
# typo, and poll() takes at most ~24 days.
MAX_SECONDS = 1_000_000
DURATION_RE = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s?)?", re.I)


def duration(what, text, example):
    """'3600', '90m', '4h', '2d', '1h30m' -> seconds (above 0)."""
    m = DURATION_RE.fullmatch(text.strip())
    if not text.strip() or not m:
        raise Failure(f"{what}={text.strip()!r} is not a duration; e.g. {example}=3600, 90m, "
                      f"4h, 2d or 1h30m")
    if any(m.groups()[:3]) and text.strip()[-1].isdigit():
        raise Failure(f"{what}={text.strip()!r}: say the unit of its last number, e.g. "
                      f"1h30m")
    d, h, mi, sec = (int(x or 0) for x in m.groups())
    seconds = ((d * 24 + h) * 60 + mi) * 60 + sec
    if not 0 < seconds <= 10 ** 9:
        raise Failure(f"{what}={text.strip()!r} must be above 0 and under 30 years")
    return seconds


def fmt_duration(seconds):
    """Every duration dq prints: 3600 -> '1h', 5400 -> '1h30m', 90 ->
    '1m30s' (never below 0s), the form DQ_TIME reads back."""
    seconds = max(0, int(seconds))
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not out):
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out


def size_mib(var, text):
    """'24G', '24000M', '24 GiB', '24000' (MiB) -> MiB."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([MGT]?)(?:I?B)?", text.strip(), re.I)
    if not m:
        raise Failure(f"{var}={text!r} is not a size; e.g. {var}=24G, {var}=24000M, or a "
                      f"plain number of MiB")
    unit = 1024 ** "MGT".index(m.group(2).upper() or "M")
    return math.ceil(float(m.group(1)) * unit)


def fmt_mib(mib):
    """Every GPU memory size dq prints: 8192 -> '8G', 30822 -> '30.1G',
    500 -> '500M' (a size that size_mib reads back, to 0.1G); None -> '?'."""
    if mib is None:
        return "?"
    if mib < 1024:
        return f"{max(0, int(mib))}M"
    return f"{mib / 1024:.1f}".rstrip("0").rstrip(".") + "G"


def fmt_bytes(n):
    """Every file size dq prints (snapshots): 512 -> '512B', 3481 -> '3.4K',
    5242880 -> '5M' (a size that size_mib reads back, to 0.1, from 1M up)."""
    size, unit = float(max(0, n)), "B"
    for bigger in "KMGT":
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{int(size)}B" if unit == "B" else f"{size:.1f}".rstrip("0").rstrip(".") + unit


# Command line ################################################################

def parser(cmd, description):
    import argparse     # here: a job's wrapper, started between two jobs, needs none

    class ArgParser(argparse.ArgumentParser):
        def error(self, message):
            raise Failure(f"{message} (see {self.prog} --help)")

    p = ArgParser(prog=f"dq-{cmd}", description=description,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="echo every ssh command")
    p.add_argument("--version", action="version", version=f"dq {__version__}")
    return p


def count_type(what):
    """An argparse type: a whole number of `what`, 0 or more."""
    def check(v):
        n = whole_number(v)
        if n is None:
            import argparse
            raise argparse.ArgumentTypeError(f"{v!r} is not a number of {what} (e.g. 10)")
        return n
    return check


def seconds_type(v):
    """An argparse type: a number of seconds above 0 (as Config's)."""
    try:
        s = float(v)
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and 0 < s <= MAX_SECONDS):
        import argparse
        raise argparse.ArgumentTypeError(f"{v!r} is not a number of seconds above 0 and at "
                                         f"most {MAX_SECONDS} (e.g. 30)")
    return s


def parse(p, argv):
    args = p.parse_args(argv)
    global DEBUG
    DEBUG = DEBUG or args.debug
    return args


def count_arg(argv, default=10):
    """Pull the manual's `-NUM` (and -n NUM) out of argv."""
    rest, num = [], default
    it = iter(argv)
    for a in it:
        if a.startswith("-") and whole_number(a[1:]) is not None:
            num = whole_number(a[1:])
        elif a in ("-n", "--lines"):
            v = next(it, "")
            num = whole_number(v)
            if num is None:
                raise Failure(f"{a} needs a number of lines, e.g. {a} 20 (not {v!r})")
        else:
            rest.append(a)
    return num, rest


def full_job_id(arg):
    """Is arg a job ID with its user (N-user), as dq passes them around?"""
    m = JOB_ID_RE.fullmatch(arg)
    return bool(m and m.group(2))


def internal_args(argv, usage, what, checks):
    """Check the arguments of an internal command, one check per argument,
    so that a wrong call changes nothing."""
    if len(argv) != len(checks) or not all(c(a) for c, a in zip(checks, argv)):
        given = " ".join(map(repr, argv)) or "(none)"
        raise Failure(f"bad arguments {given}; usage: dq.py {usage} (internal: {what}; "
                      f"users never need to run it)")


# Files and locks #############################################################

def _mtime(path):
    """path's mtime, fresh: open() makes an NFS client ask the server
    (close-to-open), where stat() may answer from a cache seconds old."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)


# Shared directories: 'state' holds files any user rewrites (so it is not
# sticky: os.replace over another user's file needs that); the others hold
# per-user entries, so they are sticky like /tmp and nobody removes another
# user's entries.
# The one list of the data root's directories and their kinds, which
# install.sh reads too (`python3 dq.py _layout`): a new directory is one
# entry here.  Modes are a personal install's; install.sh gives a group
# install's its own.
LAYOUT = {"state": "shared", "jobs": "traversed", "jobs/backend": "sticky",
          "jobs/active": "sticky", "jobs/cpu": "sticky", "jobs/queue": "sticky",
          "jobs/lost": "sticky", "jobs/done": "sticky", "drain": "sticky", "sched": "sticky"}


def cmd__layout(cfg, argv):
    """Internal: the data root's directories, `KIND PATH` a line (install.sh)."""
    internal_args(argv, "_layout", "read by install.sh", ())
    for sub, kind in LAYOUT.items():
        print(kind, sub)
    return 0


LAYOUT_MODES = {"shared": 0o777, "traversed": 0o755, "sticky": 0o1777}


# A full data root (a quota, a full export).
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


def access_hint(root, err=None):
    """What to do about a permission error under the data root: '; ...'
    (empty when `err` is not about permissions)."""
    if err is not None and err.errno not in (errno.EACCES, errno.EPERM):
        return ""
    import grp
    try:
        st = os.stat(root)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return f"; ask the admin of {root} for access"
    if st.st_mode & 0o2000:     # a group install (install.sh DIR GROUP)
        return (f"; the data root {root} belongs to group '{group}': ask its admin to add "
                f"you to that group (then log in again)")
    return f"; ask the admin of {root} (owned by {user_of_uid(st.st_uid)}) for access"


def ensure_layout(cfg):
    for sub, kind in LAYOUT.items():
        mode = LAYOUT_MODES[kind]
        path = cfg.p(sub)
        # Every user lists and writes them all ('jobs' is only traversed).
        if os.access(path, os.R_OK | os.X_OK | (os.W_OK if sub != "jobs" else 0)):
            continue
        if os.path.isdir(path):
            raise Failure(f"you cannot read and write {path}{access_hint(cfg.root)}")
        try:
            os.makedirs(path, exist_ok=True)
            os.chmod(path, mode)
        except OSError as e:
            raise Failure(f"cannot create {path}: {e.strerror}; ask the admin to "
                          f"run 'make install' for {cfg.root}")


def data_root_error(root, e):
    """One line for an OSError: a full data root says so, and where."""
    path = str(e.filename or "")
    what = f"{path}: {e.strerror or e}" if path else str(e.strerror or e)
    if e.errno in SPACE_ERRORS:
        where = f"the data root {root}" if root else "the disk"
        return one_line(f"{where} is full ({what}); free some space there "
                        f"(or ask its admin for more), then try again")
    hint = access_hint(root, e) if root and path.startswith(root) else ""
    return one_line(what) + hint


_DEFAULT = object()


def bad_file(path, why, fix, value=None):
    """Say that a file is corrupt and what to do: one line.  Returns value."""
    warn(f"ignoring corrupt file {path} ({why}); {fix}")
    return value


def read_json(path, default=None, corrupt=_DEFAULT, fix="remove it or put it right",
              skip_newer=False):
    """Read one of dq's JSON files.  Missing: `default`.  Corrupt or
    unreadable: a warning naming the file and `fix`, and `corrupt` (else
    `default`), so one bad file never stops a listing.  Written by a newer
    dq: Failure, or with `skip_newer` (a file of one job, which must not
    stop everybody's passes) a warning and `corrupt`."""
    corrupt = default if corrupt is _DEFAULT else corrupt
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return default
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return bad_file(path, str(e) if not isinstance(e, RecursionError)
                        else "nested too deep", fix, corrupt)
    except OSError as e:
        warn(f"cannot read {path}: {e.strerror}; {fix}")
        return corrupt
    if not isinstance(data, dict):
        return bad_file(path, "not a JSON object", fix, corrupt)
    version = data.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        return bad_file(path, "its 'format' is not a whole number", fix, corrupt)
    if version > FORMAT:
        newer = f"written by a newer dq (format {version}); upgrade {DQ_PY}"
        if not skip_newer:
            raise Failure(f"{path} was {newer}")
        warn(f"ignoring {path}, {newer}")
        return corrupt
    return data


def bad_field(data, fields):
    """Why `data` (a dict read by read_json) does not fit `fields`, or None.
    fields: {name: (check, what it must be, required)}; an absent field
    that is not required is fine (readers use .get)."""
    for name, (check, what, required) in fields.items():
        if name not in data:
            if required:
                return f"no {name!r}"
        elif not check(data[name]):
            return f"{name!r} must be {what}, not {json.dumps(data[name])[:40]}"
    return None


# Checks for bad_field
def is_str(v):
    return isinstance(v, str) and "\0" not in v


def is_int(v, low=0, high=None):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low \
        and (high is None or v <= high)


def is_time(v):
    """Seconds since 1970; NaN, inf and times after the year 30000 (which
    break arithmetic with floats) are garbage."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1e12


def optional(check):
    return lambda v: v is None or check(v)


def is_env(v):
    return isinstance(v, dict) and all(is_str(k) and k and "=" not in k and is_str(x)
                                       for k, x in v.items())


def is_gpu_list(v):
    return isinstance(v, list) and all(is_int(g) for g in v)


def is_share(v):
    """A share of one GPU: above 0, at most 1."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


def write_atomically(path, fill, mode=0o644, exclusive=False, durable=True):
    """Write a file atomically: fill(file) writes the text to a temp file
    in the same directory (fsynced unless not `durable`), which then
    replaces path (or, `exclusive`, is linked there: FileExistsError if
    path exists)."""
    tmp = os.path.join(os.path.dirname(path),
                       f".tmp-{os.path.basename(path)}-{os.getpid()}-{_thread.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fill(f)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def write_json(path, data, mode=0o644, exclusive=False, durable=True, compact=False):
    """Write atomically: temp file in the same directory, fsync, rename.  With
    `exclusive`, fail with FileExistsError if `path` exists (link, not rename).
    `durable=False` skips the fsync, for caches that are rebuilt anyway.
    `compact`: one line, for the state files rewritten at every job change
    (json's C encoder; an indented dump runs in Python)."""
    data = dict(data, format=FORMAT)

    def fill(f):
        json.dump(data, f, sort_keys=True, **({"separators": (",", ":")} if compact
                                              else {"indent": 1}))
        f.write("\n")
    write_atomically(path, fill, mode, exclusive, durable)


def sync_file(path):
    """fsync what write_json(durable=False) wrote, once the hurry is over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Expired(Exception):
    """A lock's deadline passed (SIGALRM; not an OSError, see Lock._try)."""


class Lock:
    """An fcntl (POSIX, NFS-safe) lock on a file, waited for with a deadline."""

    def __init__(self, path, timeout=30.0, mode=0o666):
        self.path, self.timeout, self.mode = path, timeout, mode
        self.fd = None

    def acquire(self, blocking=True):
        fd = self._open()
        try:
            if os.fstat(fd).st_uid == os.getuid():
                os.fchmod(fd, self.mode)  # umask must not lock others out
        except OSError:
            pass
        try:
            if not self._try(fd) and not (blocking and self._wait(fd)):
                os.close(fd)
                return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.since = time.monotonic()
        return True

    def _open(self):
        """Open (or create) the lock file.  A user who creates it gets it
        with their umask's mode until the fchmod below: another user who
        opens it in between is refused, so waits a moment for that fchmod
        (the first commands of a new install, all at once)."""
        for delay in (0.001, 0.01, 0.1, 0.5, None):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, self.mode)
            except PermissionError as e:
                if delay is None or not os.path.exists(self.path):
                    raise Failure(f"cannot open the lock {self.path}: {e.strerror}; its "
                                  f"mode must let every dq user write it (chmod "
                                  f"{self.mode:o} {self.path})")
                time.sleep(delay)

    def _try(self, fd, flags=fcntl.LOCK_EX | fcntl.LOCK_NB):
        try:
            fcntl.lockf(fd, flags)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN, errno.EDEADLK):
                return False
            raise Failure(f"cannot lock {self.path}: {e.strerror}")

    def _wait(self, fd):
        """Wait in the kernel, woken the moment the holder lets go, with
        SIGALRM for the deadline; outside the main thread, or when the
        kernel calls the wait a deadlock, by polling."""
        deadline = time.monotonic() + self.timeout

        def expired(*_):
            raise _Expired
        armed = False
        if self.timeout > 0:
            try:
                old = signal.signal(signal.SIGALRM, expired)
                armed = True
            except ValueError:      # not the main thread
                pass
        if armed:
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            try:
                if self._try(fd, fcntl.LOCK_EX):
                    return True
            except _Expired:
                self._timed_out()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
        delay = 0.002
        while not self._try(fd):
            if time.monotonic() > deadline:
                self._timed_out()
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return True

    def _timed_out(self):
        raise Failure(f"timed out after {self.timeout:g}s waiting for the lock "
                      f"{self.path}; a dq process holding it may hang (see "
                      f"'fuser -v {self.path}'), or NFS locking (lockd) is down")

    def release(self):
        if self.fd is not None:
            os.close(self.fd)   # closing drops the lock
            self.fd = None
            if LOCK_STATS:      # benchmarks: how long each lock was held
                with open(LOCK_STATS, "a") as f:
                    f.write(f"{os.path.basename(self.path)} {time.monotonic() - self.since:.6f}\n")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def global_lock(cfg):
    return Lock(cfg.p("state", "lock"), timeout=cfg.lock_timeout)


def wake_file(cfg, user):
    return cfg.p("state", f"wake-{user}")


def touch_wake(cfg, user):
    """Wake user's dq-schedule loop: a job of theirs was placed, or ended."""
    path = wake_file(cfg, user)
    try:
        os.utime(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        os.fchmod(fd, 0o666)
        os.close(fd)
    except PermissionError:
        pass


# Configuration ###############################################################

class Config:
    """The data root and dq.conf.  No dq.conf (or no hosts in it) means the
    cluster is this machine alone, reached without ssh."""

    # The number keys: default, and whether 0 makes sense (0 for kill_grace:
    # KILL at once; a timeout or interval of 0 would spin or never wait).
    NUMBERS = {"timeout": (15, False), "poll_interval": (2, False),
               "starve_after": (600, True), "assign_timeout": (30, False),
               "kill_grace": (5, True), "lost_after": (45, True),
               "watch_interval": (10, False), "lock_timeout": (30, False),
               "sample_interval": (10, True)}
    KEYS = {"hosts", "ssh", "multiplex", "python", "cpu_slots", "order", "admins",
            "max_gpus_per_user", "time_limit", "max_time", "fairshare_halflife",
            "smtp", "mail_domain", "share_margin", "max_jobs_per_gpu", "share_foreign",
            "mem_overuse", "shell_time", "snapshot_max", "lock_stats", "idle_after",
            "idle_kill", "shell_idle_after", "backend", "slurm_partition", "slurm_account",
            "slurm_args", "slurm_conf"} | set(NUMBERS)
    ORDERS = ("fairshare", "fifo")
    BACKENDS = ("ssh", "slurm")
    OVERUSE = ("warn", "kill")

    def __init__(self):
        self.root = os.path.abspath(os.environ.get("DQ_ROOT") or os.path.dirname(DQ_PY))
        self.path = os.path.join(self.root, "dq.conf")
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
        try:
            with open(self.path, encoding="utf-8") as f:
                parser.read_file(f)
        except FileNotFoundError:
            pass        # no dq.conf: this machine alone
        except OSError as e:
            # Not read: running on this machine alone would be a silent surprise
            raise Failure(f"cannot read {self.path}: {e.strerror}{access_hint(self.root, e)}")
        except (configparser.Error, UnicodeDecodeError) as e:
            raise Failure(f"cannot parse {self.path}: {e}; it must be UTF-8 text in INI form, "
                          f"'[dq]' then 'key = value' lines".replace("\n", " "))
        sect = parser["dq"] if parser.has_section("dq") else {}
        for key in sect:
            if key not in self.KEYS:
                warn(f"{self.path}: unknown key {key!r} ignored (known: "
                     f"{' '.join(sorted(self.KEYS - {'lock_stats'}))})")
        self.hosts = sect.get("hosts", "").split()
        for h in self.hosts:
            if not HOST_RE.match(h):
                raise Failure(f"{self.path}: bad host name {h!r} in 'hosts'")
        # backend = slurm without hosts: Slurm's nodes (need_hosts), not this machine
        self.slurm_nodes_as_hosts = not self.hosts and \
            sect.get("backend", "").strip().lower() == "slurm"
        self.local = not self.hosts and not self.slurm_nodes_as_hosts
        self.admin_names = sect.get("admins", "").replace(",", " ").split()
        for u in self.admin_names:
            if not is_user_name(u):
                raise Failure(f"{self.path}: 'admins': {u!r} is not a user name; e.g. "
                              f"'admins = alice bob'")
        if self.local:
            self.hosts = [os.uname().nodename.split(".")[0]]
        try:
            self.ssh = shlex.split(sect.get("ssh", "ssh -o BatchMode=yes -o ConnectTimeout=5"))
        except ValueError as e:
            raise Failure(f"{self.path}: 'ssh': {e}")
        if not self.ssh:
            raise Failure(f"{self.path}: 'ssh' is empty; give the ssh command, e.g. "
                          f"'ssh = ssh -o BatchMode=yes', or leave the key out")
        self.multiplex = self._yes_no(parser, "multiplex")
        self.python = sect.get("python", "python3").strip()
        if not self.python:
            raise Failure(f"{self.path}: 'python' is empty; name the hosts' Python, e.g. "
                          f"'python = python3', or leave the key out")
        for key, (default, zero_ok) in self.NUMBERS.items():
            setattr(self, key, self._number(sect, key, default, zero_ok))
        slots = sect.get("cpu_slots", "4").strip()
        self.cpu_slots = whole_number(slots, 1, MAX_SECONDS)
        if self.cpu_slots is None:
            raise Failure(f"{self.path}: 'cpu_slots' must be a whole number of jobs, 1 or "
                          f"more (not {slots!r}), e.g. 'cpu_slots = 4'")
        self.order = sect.get("order", "fairshare").strip().lower()
        if self.order not in self.ORDERS:
            raise Failure(f"{self.path}: 'order' must be fairshare or fifo, not "
                          f"{self.order!r}, e.g. 'order = fairshare'")
        # Per-user GPU limits: max_gpus_per_user for all, [limits] user = N
        # for some (a promise to the lab: GPUs stay idle above it).
        self.max_gpus_per_user = self._count(sect, "max_gpus_per_user", "[dq]")
        self.limits = {}
        if parser.has_section("limits"):
            for user, _ in parser.items("limits"):
                if not is_user_name(user):
                    raise Failure(f"{self.path}: [limits] {user!r} is not a user name")
                self.limits[user] = self._count(parser["limits"], user, "[limits]")
        # Time limits: a default for jobs without DQ_TIME, and the most one
        # may ask for (durations, e.g. 4h or 2d).
        for key in ("time_limit", "max_time"):
            setattr(self, key, duration(f"{self.path}: {key}", sect[key], key)
                    if key in sect else None)
        # dq-shell's jobs without DQ_TIME: a forgotten shell frees its GPU
        self.shell_time = duration(f"{self.path}: shell_time", sect.get("shell_time", "4h"),
                                   "shell_time")
        # Idle GPUs (see GpuWatch.idle_check): how long a job's GPUs may
        # sit unused before it is flagged idle (dq-shell's: shell_idle_after),
        # and how long after that it is stopped; 0 (or none): never.
        for key, default in (("idle_after", "30m"), ("shell_idle_after", "1h"),
                             ("idle_kill", "0")):
            setattr(self, key, self._duration_or_off(sect, key, default))
        # Mail at a job's end (DQ_MAIL): the lab's SMTP server, and the
        # domain of users' own addresses (DQ_MAIL=1).
        self.smtp = sect.get("smtp", "localhost:25").strip()
        if not re.fullmatch(r"[A-Za-z0-9._-]+(:[0-9]{1,5})?", self.smtp):
            raise Failure(f"{self.path}: 'smtp' must be HOST or HOST:PORT (not {self.smtp!r}), "
                          f"e.g. 'smtp = mail.example.org:25'")
        self.mail_domain = sect.get("mail_domain", "").strip() or None
        if self.mail_domain and not re.fullmatch(r"[A-Za-z0-9.-]+", self.mail_domain):
            raise Failure(f"{self.path}: 'mail_domain' must be a domain (not "
                          f"{self.mail_domain!r}), e.g. 'mail_domain = example.org'")
        # Fair share between users holding as many GPUs: less recent use
        # first, GPU-seconds halving every fairshare_halflife.
        self.fairshare_halflife = duration(f"{self.path}: fairshare_halflife",
                                           sect.get("fairshare_halflife", "1d"),
                                           "fairshare_halflife")
        # GPU sharing (DQ_MEM): room kept free on each shared GPU (a share
        # of it, or a size), how many dq jobs one GPU takes, whether they
        # join processes started by hand, and what a job over its booking gets.
        margin = sect.get("share_margin", "2%").strip()
        pct = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*%", margin)
        try:
            self.share_margin = (float(pct.group(1)) / 100, 0) if pct else \
                (0.0, size_mib("share_margin", margin))
        except Failure:
            self.share_margin = None
        if self.share_margin is None or self.share_margin[0] >= 1:
            raise Failure(f"{self.path}: 'share_margin' must be a share of each GPU under "
                          f"100% or a size (not {margin!r}), e.g. 'share_margin = 2%' or "
                          f"'share_margin = 1G'")
        jobs = sect.get("max_jobs_per_gpu", "8").strip()
        self.max_jobs_per_gpu = whole_number(jobs, 1, 1000)
        if self.max_jobs_per_gpu is None:
            raise Failure(f"{self.path}: 'max_jobs_per_gpu' must be a whole number of jobs, "
                          f"1 to 1000 (not {jobs!r}), e.g. 'max_jobs_per_gpu = 8'")
        self.share_foreign = self._yes_no(parser, "share_foreign")
        self.mem_overuse = sect.get("mem_overuse", "warn").strip().lower()
        if self.mem_overuse not in self.OVERUSE:
            raise Failure(f"{self.path}: 'mem_overuse' must be warn or kill, not "
                          f"{self.mem_overuse!r}, e.g. 'mem_overuse = kill'")
        # DQ_SNAPSHOT: the most one copy of a submit directory may hold, in
        # bytes (it stays in the data root as long as the job's directory).
        raw = sect.get("snapshot_max", "200M").strip()
        try:
            self.snapshot_max = size_mib("snapshot_max", raw) * 1024 * 1024
        except Failure:
            raise Failure(f"{self.path}: 'snapshot_max' must be a size (not {raw!r}), e.g. "
                          f"'snapshot_max = 200M' or 'snapshot_max = 2G'") from None
        # Who places and starts jobs: dq itself over ssh, or Slurm (see
        # "Slurm back end"), with these of its settings.
        self.backend = sect.get("backend", "ssh").strip().lower()
        if self.backend not in self.BACKENDS:
            raise Failure(f"{self.path}: 'backend' must be ssh or slurm, not "
                          f"{self.backend!r}, e.g. 'backend = slurm'")
        for key in ("slurm_partition", "slurm_account"):
            value = sect.get(key, "").strip() or None
            if value and not re.fullmatch(r"[A-Za-z0-9_.,+-]+", value):
                raise Failure(f"{self.path}: '{key}' must be a Slurm name (not {value!r}), "
                              f"e.g. '{key} = gpu'")
            setattr(self, key, value)
        try:
            self.slurm_args = shlex.split(sect.get("slurm_args", ""))
        except ValueError as e:
            raise Failure(f"{self.path}: 'slurm_args': {e}; give sbatch options as in a "
                          f"shell, e.g. 'slurm_args = --qos=normal'") from None
        bad = [a for a in self.slurm_args if not a.startswith("-")]
        if bad:
            raise Failure(f"{self.path}: 'slurm_args': {bad[0]!r} is not an sbatch option; "
                          f"e.g. 'slurm_args = --qos=normal --mem=16G'")
        self.slurm_conf = sect.get("slurm_conf", "").strip() or None
        if self.slurm_conf and not os.path.isabs(self.slurm_conf):
            raise Failure(f"{self.path}: 'slurm_conf' must be an absolute path (not "
                          f"{self.slurm_conf!r}), e.g. 'slurm_conf = /etc/slurm/slurm.conf'")
        global LOCK_STATS
        LOCK_STATS = LOCK_STATS or sect.get("lock_stats")     # bench/ sets it

    def _yes_no(self, parser, key, default=True):
        try:
            return parser.getboolean("dq", key, fallback=default)
        except ValueError:
            raise Failure(f"{self.path}: '{key}' must be yes or no, not "
                          f"{parser['dq'][key].strip().lower()!r}") from None

    def _count(self, sect, key, where):
        """A whole number of GPUs, 0 or more, or None where not set."""
        if key not in sect:
            return None
        raw = sect[key].strip()
        count = whole_number(raw, high=MAX_SECONDS)
        if count is None:
            raise Failure(f"{self.path}: {where} {key!r} must be a whole number of GPUs, "
                          f"0 or more (not {raw!r}), e.g. '{key} = 8'")
        return count

    def _duration_or_off(self, sect, key, default):
        """A duration in seconds, or 0 for '0' or 'off' (never)."""
        raw = sect.get(key, default).strip()
        if raw.lower() in ("0", "off"):
            return 0
        try:
            return duration(f"{self.path}: {key}", raw, key)
        except Failure:
            raise Failure(f"{self.path}: '{key}' must be a duration, or 0 for never (not "
                          f"{raw!r}), e.g. '{key} = 30m' or '{key} = 2h'") from None

    def gpu_limit(self, user):
        """The most GPUs user's jobs may hold at once, or None."""
        return self.limits.get(user, self.max_gpus_per_user)

    def _number(self, sect, key, default, zero_ok):
        """A number of seconds: finite (float() takes 'nan' and 'inf'), not
        negative, and above 0 unless `zero_ok`."""
        raw = sect.get(key, str(default)).strip()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and (value > 0 or zero_ok and value == 0) \
                and value <= MAX_SECONDS:
            return value
        allowed = "0 or more" if zero_ok else "above 0"
        raise Failure(f"{self.path}: '{key}' must be a number of seconds, {allowed} and at "
                      f"most {MAX_SECONDS} (not {raw!r}), e.g. '{key} = {default}'")

    def p(self, *parts):
        return os.path.join(self.root, *parts)

    def job_dir(self, job_id):
        return self.p("jobs", "backend", job_id)


# Remote execution ############################################################

class Result:
    def __init__(self, host, rc, out, err, seconds):
        self.host, self.rc, self.out, self.err, self.seconds = host, rc, out, err, seconds

    @property
    def ok(self):
        return self.rc == 0

    def why(self):
        """One line saying why a remote command failed."""
        if self.rc == 124:
            return "timed out"
        lines = [ln.strip() for ln in (self.err or "").splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.rc}"


def ssh_argv(cfg, host):
    argv = list(cfg.ssh)
    if cfg.multiplex:
        # One connection per host and user, shared by every dq process for a
        # minute: a command then costs a round trip, not a handshake.
        cdir = f"/tmp/dq-ssh-{os.getuid()}"
        try:
            os.mkdir(cdir, 0o700)
        except FileExistsError:
            pass
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={cdir}/%C",
                 "-o", "ControlPersist=60"]
    return argv + [host]


def wrap_script(script):
    # The shell parses the whole group before running it, and the commands
    # inside read /dev/null, not the rest of the script.
    return "{\n" + script.rstrip("\n") + "\n} </dev/null\n"


def shell_argv(cfg, host):
    """The command that runs a /bin/sh script (on stdin) on host: here
    without ssh when host is this machine, else over ssh."""
    if cfg.local or host in (LOCAL_HOST, SLURM_HOST):
        return ["/bin/sh", "-s"]
    return ssh_argv(cfg, host) + ["/bin/sh -s"]


class _Spawned:
    """One command of run_scripts: its pipes, what came back, how it ended.

    It is done when it exited and closed stdout; stderr is not waited for,
    as a multiplexing master that ssh forks off may keep it open."""

    def __init__(self, host, argv, env, data):
        self.host, self.argv, self.data = host, argv, data
        self.out, self.err, self.line = [], [], b""
        self.status = self.pidfd = None
        self.killed = False
        (in_r, self.stdin), (self.stdout, out_w), (self.stderr, err_w) = \
            [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
        try:
            # SIGPIPE back to the default (Python ignores it): a shell
            # pipeline must end quietly when its reader goes.  A session of
            # its own: when a job's wrapper exits right after launching the
            # next job, the SIGHUP of its terminal must not reach the new
            # screen before that detaches (screen -dm forks and returns).
            self.pid = os.posix_spawnp(
                argv[0], argv, env, setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                              (os.POSIX_SPAWN_DUP2, out_w, 1),
                              (os.POSIX_SPAWN_DUP2, err_w, 2)])
        except OSError:
            for fd in (self.stdin, self.stdout, self.stderr):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        os.set_blocking(self.stdin, False)
        try:        # readable once it exits (Linux 5.3 and later)
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pass

    def watch(self):
        import select
        fds = [(self.stdin, select.POLLOUT), (self.stdout, select.POLLIN),
               (self.stderr, select.POLLIN)]
        return fds + ([(self.pidfd, select.POLLIN)] if self.pidfd is not None else [])

    def handle(self, fd, on_line):
        """Serve a poll event on fd; False once fd is closed."""
        if self.killed:
            pass
        elif fd == self.stdin:
            try:
                self.data = self.data[os.write(fd, self.data):]
                if self.data:
                    return True
            except OSError:         # it quit without reading it all
                pass
        elif fd == self.pidfd:
            self._reap(0)
        else:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if chunk and fd == self.stderr:
                self.err.append(chunk)
            elif chunk and on_line:
                *lines, self.line = (self.line + chunk).split(b"\n")
                for ln in lines:
                    on_line(self.host, ln.decode(errors="replace") + "\n")
            elif chunk:
                self.out.append(chunk)
            elif fd == self.stdout and on_line and self.line:
                on_line(self.host, self.line.decode(errors="replace"))
            if chunk:
                return True
        self._close(fd)
        return False

    def _close(self, fd):
        os.close(fd)
        for name in ("stdin", "stdout", "stderr", "pidfd"):
            if getattr(self, name) == fd:
                setattr(self, name, None)

    def _reap(self, flags):
        if self.status is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)

    def done(self):
        if self.killed:
            self._reap(0)
            return True
        if self.stdout is not None:
            return False
        # Without a pidfd, an end of stdout means it is exiting: wait.
        self._reap(os.WNOHANG if self.pidfd is not None else 0)
        return self.status is not None

    def kill(self):
        self.killed = True
        try:
            os.killpg(self.pid, signal.SIGKILL)     # what it started too
        except ProcessLookupError:
            pass

    def result(self, seconds, timeout):
        if self.stderr is not None:
            os.set_blocking(self.stderr, False)
            try:
                self.err.append(os.read(self.stderr, 65536))
            except OSError:
                pass
        for fd in (self.stdin, self.stdout, self.stderr, self.pidfd):
            if fd is not None:
                self._close(fd)
        if self.killed:
            return Result(self.host, 124, "", f"no answer within {timeout:g}s", seconds)
        res = Result(self.host, self.status, b"".join(self.out).decode(errors="replace"),
                     b"".join(self.err).decode(errors="replace"), seconds)
        if self.argv[0] != "/bin/sh" and res.rc == 255 and not res.err.strip():
            res.err = "ssh failed"
        return res


def clean_env():
    """The environment for ssh and screen: ours, less what marks a job."""
    env = dict(os.environ)
    for k in ("DQ_JOB_ID", "DQ_DEADLINE", "DQ_CRASH_AT", "STY", "WINDOW"):
        env.pop(k, None)
    return env


def run_scripts(cfg, tasks, timeout=None, on_line=None, on_done=None):
    """Run [(host, script)] all at once: [Result], in order.

    One process each (ssh, or /bin/sh here) and no threads: one poll()
    watches every pipe.  on_line(host, line): stdout is handed over line by
    line as it comes (Result.out stays empty); on_done(host): one finished."""
    import select
    timeout = cfg.timeout if timeout is None else timeout
    env = clean_env()
    t0 = time.monotonic()
    results, running, poller = [None] * len(tasks), {}, select.poll()
    for i, (host, script) in enumerate(tasks):
        argv = shell_argv(cfg, host)
        debug(f"{host}: {shlex.join(argv)} <<'EOF'\n{script.rstrip()}\nEOF")
        try:
            proc = _Spawned(host, argv, env, wrap_script(script).encode())
        except OSError as e:
            results[i] = Result(host, 127, "", f"cannot run {argv[0]}: {e.strerror}", 0.0)
            continue
        proc.index = i
        for fd, events in proc.watch():
            running[fd] = proc
            poller.register(fd, events)
    deadline = t0 + timeout
    while running:
        wait = deadline - time.monotonic()
        events = poller.poll(wait * 1000) if wait > 0 else []
        if not events and time.monotonic() >= deadline:
            for proc in set(running.values()):      # the stragglers
                proc.kill()
            events = [(fd, 0) for fd in running]
        for fd, ev in events:
            proc = running.get(fd)
            if proc is None:
                continue
            if not proc.handle(fd, on_line):
                poller.unregister(fd)
                del running[fd]
            if proc.done():
                for other in [f for f, p in running.items() if p is proc]:
                    poller.unregister(other)
                    del running[other]
                results[proc.index] = res = proc.result(time.monotonic() - t0, timeout)
                debug(f"{proc.host}: exit {res.rc} in {res.seconds:.3f}s")
                if on_done:
                    on_done(proc.host)
    return results


def run_on(cfg, host, script, timeout=None):
    """Run a /bin/sh script on a host as the calling user and capture it.

    The script travels on stdin and the remote login shell only sees
    `/bin/sh -s`, so tcsh or zsh users parse nothing of ours.  Every ssh
    command of dq goes through run_scripts below (with a timeout and the
    --debug echo)."""
    return run_scripts(cfg, [(host, script)], timeout)[0]


def run_on_all(cfg, hosts, script_for, timeout=None, on_line=None, on_done=None):
    """Run a script on each host in parallel; {host: Result}."""
    results = run_scripts(cfg, [(h, script_for(h)) for h in hosts], timeout, on_line, on_done)
    return dict(zip(hosts, results))


def q(s):
    return shlex.quote(str(s))


def dq_argv(python, *args):
    """The argv that runs dq command `args[0]` with `python`."""
    return [python, "-S", "-c", BOOT, DQ_PY] + list(args)


def dq_command(cfg, *args):
    """A /bin/sh command line running this dq.py on a host."""
    return " ".join(q(a) for a in dq_argv(cfg.python, *args))


def spawn_detached(what, *args):
    """Start dq command `args` here in the background, detached (its own
    session, no terminal, in /), and go on; if it cannot start, warn that
    we cannot `what`."""
    import subprocess
    try:
        subprocess.Popen(dq_argv(sys.executable, *args), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, env=clean_env(), cwd="/")
    except OSError as e:
        warn(f"cannot {what}: {e.strerror}")


# Slurm commands ##############################################################

# backend = slurm (see "Slurm back end" for what it changes): Slurm's client
# commands, run here through run_scripts (cfg.timeout, the --debug echo), with
# SLURM_CONF from dq.conf's slurm_conf when it is set, and what dq reads of
# Slurm's nodes: their GPUs (gres), what its jobs hold, drains.  dq reads
# Slurm's stable text forms (--parsable, -o/-O formats), never --json (its
# shape changes between releases).

def is_slurm(cfg):
    return getattr(cfg, "backend", "ssh") == "slurm"


def slurm_call(cfg, argv, stdin=None, timeout=None):
    """Run one Slurm command here, through run_scripts; its Result.
    stdin: text for the command's standard input (sbatch's batch script)."""
    line = " ".join(q(a) for a in argv)
    if cfg.slurm_conf:
        line = f"SLURM_CONF={q(cfg.slurm_conf)} {line}"
    if stdin is not None:
        line += f" <<'DQ_SLURM_EOF'\n{stdin.rstrip()}\nDQ_SLURM_EOF"
    return run_scripts(cfg, [(SLURM_HOST, line + "\n")], timeout)[0]


def slurm_must(cfg, argv, what, stdin=None):
    """slurm_call that must work: its stdout, or a Failure naming `what`
    and Slurm's own message (e.g. 'sbatch: error: Invalid partition')."""
    res = slurm_call(cfg, argv, stdin)
    if res.rc == 127:
        raise Failure(f"{what}: {argv[0]} is not installed here (backend = slurm in "
                      f"{cfg.path}: run dq where Slurm's client commands are)")
    if not res.ok:
        raise Failure(f"{what}: {res.why()}")
    return res.out


class SlurmNode:
    """One Slurm node as sinfo -N sees it: name, state, gres (e.g.
    'gpu:a100:4(S:0)', 'shard:80'), features."""

    def __init__(self, name, state, gres, features):
        self.name, self.state = name, state
        self.gres = [] if gres in ("", "(null)") else gres.split(",")
        self.features = [] if features in ("", "(null)") else features.split(",")

    def gres_types(self, kind="gpu"):
        """{type or None: count} of this node's gres `kind`."""
        out = {}
        for g in self.gres:
            parts = g.split("(")[0].split(":")
            if parts[0] != kind or len(parts) < 2:
                continue
            kind_type = parts[1] if len(parts) == 3 else None
            count = whole_number(parts[-1])
            if count is not None:
                out[kind_type] = out.get(kind_type, 0) + count
        return out


def slurm_nodes(cfg):
    """{name: SlurmNode} of the cluster (one sinfo)."""
    out = slurm_must(cfg, ["sinfo", "-h", "-N", "-o", "%N|%T|%G|%f"], "cannot list Slurm's nodes")
    nodes = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 4 and fields[0]:
            node = nodes.get(fields[0])
            if node is None:        # a node in two partitions is listed twice
                nodes[fields[0]] = SlurmNode(*fields)
    return nodes


def expand_hostlist(text):
    """Slurm's host list 'node[1-3,7],gpu9' -> ['node1', 'node2', 'node3',
    'node7', 'gpu9']."""
    out = []
    for name, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?", text or ""):
        if not ranges:
            out.append(name)
            continue
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            out += [f"{name}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def gres_indexes(text, kind="gpu"):
    """(count, {indexes}) of gres `kind` in Gres/GresUsed text such as
    'gpu:4', 'gpu:a100:2(IDX:0,2-3)', 'gpu:0,shard:8(...)'."""
    count, idx = 0, set()
    for part in re.split(r",(?![^(]*\))", text or ""):
        m = re.match(r"([a-z_]+)(?::(?:\(null\)|[^:(]+))?:([0-9]+)(?:\(([^)]*)\))?",
                     part.strip())
        if not m or m.group(1) != kind:
            continue
        count += int(m.group(2))
        for r in re.findall(r"[0-9]+(?:-[0-9]+)?", (m.group(3) or "").partition("IDX:")[2]):
            lo, _, hi = r.partition("-")
            idx.update(range(int(lo), int(hi or lo) + 1))
    return count, idx


def slurm_gpus_in_use(cfg):
    """{node: {GPU indexes}} that Slurm's running jobs hold (scontrol -d
    show job: 'Nodes=node2 CPU_IDs=0 Mem=0 GRES=gpu:3(IDX:0-2)')."""
    out = slurm_must(cfg, ["scontrol", "-d", "-o", "show", "job"],
                     "cannot ask Slurm for its jobs")
    used = {}
    for nodes, gres in re.findall(r" Nodes=(\S+) CPU_IDs=\S+ Mem=\S+ GRES=(\S*)", out):
        for node in expand_hostlist(nodes):
            used.setdefault(node, set()).update(gres_indexes(gres)[1])
    return used


SLURM_UNUSABLE = ("DRAIN", "DOWN", "FAIL", "MAINT", "NOT_RESPONDING", "POWER")


def slurm_free(cfg):
    """dq-free's rows with backend = slurm: each node's GPUs that Slurm has
    not allocated, and its drain (Slurm's own, with its reason)."""
    out = slurm_must(cfg, ["sinfo", "-h", "-N", "-O", "NodeList:|,StateLong:|,Gres:|,Reason:|"],
                     "cannot ask Slurm for its nodes")
    used = slurm_gpus_in_use(cfg)
    rows, seen = [], set()
    for line in out.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) < 4 or not fields[0] or fields[0] in seen:
            continue
        node, state, gres, reason = fields[:4]
        seen.add(node)
        total = gres_indexes(gres)[0]
        unusable = any(s in state.upper() for s in SLURM_UNUSABLE)
        drained = {"reason": None if reason == "none" else reason, "by": None,
                   "since": None} if unusable else None
        free = [] if unusable else [i for i in range(total) if i not in used.get(node, ())]
        rows.append({"host": node, "free": free, "gpus": total, "error": None,
                     "drained": drained, "slurm_state": state,
                     "free_gpus": [{"index": i, "name": None, "memory_total_mib": None,
                                    "free_mem_mib": 0} for i in free], "shared_gpus": []})
    return rows


def slurm_drain(cfg, hosts, drain, reason):
    """dq-drain with backend = slurm: scontrol update (Slurm lets only its
    operators; others get its refusal in one line)."""
    for h in hosts:
        argv = ["scontrol", "update", f"nodename={h}",
                f"state={'drain' if drain else 'resume'}"]
        if drain:
            argv.append(f"reason={reason or 'dq-drain by ' + me()}")
        res = slurm_call(cfg, argv)
        if not res.ok:
            raise Failure(f"scontrol could not {'drain' if drain else 'resume'} {h}: "
                          f"{res.why()}" + (" (only Slurm's operators may)" if "user id"
                                             in res.why().lower() else ""))


def slurm_drains(cfg):
    """{node: {reason, by, since}} of Slurm's drained and down nodes (sinfo -R)."""
    out = slurm_must(cfg, ["sinfo", "-h", "-R", "-N", "-o", "%N|%E|%u|%H"],
                     "cannot ask Slurm for its drained nodes")
    drains = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 4 and fields[0]:
            try:
                since = time.mktime(time.strptime(fields[3], "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                since = None
            drains[fields[0]] = {"reason": fields[1], "by": fields[2], "since": since}
    return drains


# Hosts and GPUs ##############################################################

# name last: a GPU's name is the one field that might hold a comma
SMI_GPUS = ("nvidia-smi --query-gpu=index,uuid,memory.used,memory.total,name "
            "--format=csv,noheader,nounits")

SMI_APPS = "nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits"
# a job's screen session: screen -dmS (ssh) or -DmS (Slurm's batch step)
SESSION_RE = re.compile(r"SCREEN\b.*-[dD]mS\s+dq-([0-9]+-\S+)")
OWNER_RE = re.compile(r"^@job ([0-9]+) ([0-9]+-\S+)$", re.M)


class Gpu:
    """One GPU of a poll: nvidia-smi's index and UUID, memory used and in
    total (MiB; None where it said [N/A] or such), and its name."""

    def __init__(self, index, uuid, used, total, name=None):
        self.index, self.uuid, self.used, self.total = index, uuid, used, total
        self.name = name
        self.apps = []          # (pid, MiB) of compute processes nvidia-smi reports on it
        self.owners = {}        # pid -> the dq job whose screen session it runs in
        self.known = used is not None

    @property
    def pids(self):
        return [pid for pid, _ in self.apps]

    def busy(self):
        return bool(self.apps) or not self.known


class HostState:
    """What one poll of a host found.  `error` set means: nothing is free."""

    def __init__(self, host, started):
        self.host, self.started = host, started
        self.error = None
        self.reachable = True   # False: ssh failed; True with an error: nvidia-smi did
        self.gpus = []
        self.sessions = set()   # job ids with a dq screen session (None: no ps ran)
        self.ps = ""            # the poll's ps section, as the host printed it
        self.table_at = None    # when the GPU table (index, uuid, MiB, name) was read
        # Polled here without ssh (a hand-over on its own host): it proves
        # nothing of whether the others reach this host (see track_hosts).
        self.local = False

    def free(self, reserved=()):
        if self.error:
            return []
        return [g.index for g in self.gpus if not g.busy() and g.index not in reserved]


def _int_field(s):
    return whole_number(s.strip())


def parse_smi_gpus(text):
    """Rows of `index, uuid, memory.used, memory.total, name`.  A field
    such as [N/A] or [Insufficient Permissions] leaves the GPU unknown
    (never free; its size or name matches no constraint); a row that does
    not parse at all is an error for the whole host."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = [x.strip() for x in line.split(",", 4)]
        if len(f) != 5 or _int_field(f[0]) is None or not f[1].startswith("GPU-"):
            raise ValueError(line.strip()[:120])
        name = f[4] if f[4] and not f[4].startswith("[") else None
        gpus.append(Gpu(int(f[0]), f[1], _int_field(f[2]), _int_field(f[3]), name))
    return gpus


def parse_smi_apps(text):
    """Rows of `gpu_uuid, pid, used_memory` -> [(uuid, pid, MiB)], None for
    a field that is not a number."""
    apps = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("No running"):
            continue
        f = [x.strip() for x in line.split(",")]
        if len(f) != 3 or not f[0].startswith("GPU-"):
            raise ValueError(line[:120])
        apps.append((f[0], _int_field(f[1]), _int_field(f[2])))
    return apps


def smi_timeout(cfg):
    # nvidia-smi must give up before ssh does, so a wedged driver reads as
    # "nvidia-smi timed out" on a host that answers, not as a dead host.
    return max(1, int(cfg.timeout * 0.6))


# On the host, after the compute-apps query: ps once, through awk, which
# prints dq's screen sessions (`-v s=1`) and, for each PID on a GPU ($pids),
# the dq job whose session it descends from ("@job PID JOB-ID"): GPU
# sharing counts the memory of the other processes as used by hand.  Only
# those lines cross the network, whatever else the host runs.
PS_AWK = r"""{ pp[$1] = $2 }
$3 == "SCREEN" { a = $0; sub(/^[ \t]*[0-9]+[ \t]+[0-9]+[ \t]+/, "", a); if (s) print a
  if (match(a, /-[dD]mS[ \t]+dq-[0-9]+-[^ \t]+/)) {
    j = substr(a, RSTART, RLENGTH); sub(/^-[dD]mS[ \t]+dq-/, "", j); job[$1] = j } }
END { n = split(pids, w, " "); for (i = 1; i <= n; i++) { p = w[i]; k = 0
    while ((p in pp) && !(p in job) && k < 100) { p = pp[p]; k++ }
    if (p in job) print "@job " w[i] " " job[p] } }"""


def poll_script(cfg, with_ps=True, with_table=True):
    # Markers keep the sections apart whatever nvidia-smi prints.  The two
    # queries run at once (nvidia-smi takes its time): the apps one into a
    # pipe, copied out after the other (shell builtins: no temp file, no
    # cat, a few processes less per host and poll).  ps runs when asked
    # for (the sessions) or when a process is on a GPU (whose is it?).
    # with_table=False: the compute-apps query alone (see poll_handover).
    t = smi_timeout(cfg)
    ps = f"ps -eo pid=,ppid=,args= 2>/dev/null | awk -v pids=\"$pids\" -v s={int(with_ps)} " \
         f"{q(PS_AWK)}; echo '@@rc 0'"
    return (f"{{ timeout {t} {SMI_APPS} </dev/null 2>&1; echo \"@@rc $?\"; }} | {{\n" +
            (f"echo @@gpus; timeout {t} {SMI_GPUS} </dev/null 2>&1; echo \"@@rc $?\"\n"
             if with_table else "") +
            "echo @@apps; pids=; while IFS= read -r l; do printf '%s\\n' \"$l\"\n"
            "case $l in GPU-*) p=${l#*,}; pids=\"$pids ${p%%,*}\";; esac; done\n" +
            (f"echo @@ps; {ps}\n" if with_ps else
             f"if [ -n \"$pids\" ]; then echo @@own; {ps}; fi\n") + "}\n")


def parse_poll(host, res, started, table=None):
    """A HostState from a poll's output.  table: the host's GPU table from an
    earlier poll ({"at", "gpus": [[index, uuid, MiB, name], ...]}) when this poll ran
    only the compute-apps query (see poll_handover)."""
    st = HostState(host, started)
    if not res.ok:
        st.error = f"unreachable: {res.why()}"
        st.reachable = False
        return st
    sections = {}
    for m in re.finditer(r"@@(\w+)\n(.*?)@@rc (\d+)\n", res.out, re.S):
        sections[m.group(1)] = (m.group(2), int(m.group(3)))
    gtext, grc = sections.get("gpus", ("", 0 if table else -1))
    atext, arc = sections.get("apps", ("", -1))
    st.ps = sections.get("ps", ("", 0))[0]
    # ps ran whatever nvidia-smi did: lost-job checks need the sessions
    st.sessions = {m.group(1) for m in map(SESSION_RE.search, st.ps.splitlines()) if m} \
        if "ps" in sections else None
    owners = dict(OWNER_RE.findall(st.ps + sections.get("own", ("", 0))[0]))
    if grc != 0 or arc != 0:
        rc = grc if grc != 0 else arc
        first = (gtext if grc != 0 else atext).strip().splitlines()
        if rc == 127:
            st.error = "nvidia-smi not found"
        elif rc == 124:
            st.error = "nvidia-smi timed out"
        else:
            st.error = f"nvidia-smi failed (exit {rc}): {first[0][:100] if first else ''}"
        return st
    try:
        st.gpus = parse_smi_gpus(gtext) if table is None else \
            [Gpu(i, uuid, 0, total, name) for i, uuid, total, name in table["gpus"]]
        st.table_at = started if table is None else table["at"]
        by_uuid = {g.uuid: g for g in st.gpus}
        for uuid, pid, mem in parse_smi_apps(atext):
            if uuid in by_uuid:
                by_uuid[uuid].apps.append((pid, mem))
                if str(pid) in owners:
                    by_uuid[uuid].owners[pid] = owners[str(pid)]
            else:       # a process on a GPU we cannot name: trust nothing
                for g in st.gpus:
                    g.known = False
    except ValueError as e:
        st.gpus = []
        st.error = f"unexpected nvidia-smi output: {e}"
    return st


def polled_locally(cfg, host):
    """Is host polled here without ssh, on a cluster reached over ssh?"""
    return host == LOCAL_HOST and not cfg.local


def poll_hosts(cfg, hosts=None, with_ps=True):
    """Poll hosts in parallel: {host: HostState}."""
    hosts = cfg.hosts if hosts is None else hosts
    started = time.time()
    script = poll_script(cfg, with_ps)
    results = run_on_all(cfg, hosts, lambda h: script)
    polls = {h: parse_poll(h, r, started) for h, r in results.items()}
    for h, st in polls.items():
        st.local = polled_locally(cfg, h)
    return polls


GPU_TABLE_MAX_AGE = 60      # seconds a host's GPU table (index, uuid, ...) is trusted


def is_gpu_table(v):
    return isinstance(v, dict) and bad_field(v, {
        "at": (is_time, "", True), "all_known": (lambda x: isinstance(x, bool), "", True),
        "gpus": (lambda x: isinstance(x, list) and all(
            isinstance(r, list) and len(r) in (2, 4) and is_int(r[0]) and is_str(r[1])
            and (len(r) == 2 or optional(is_int)(r[2]) and optional(is_str)(r[3]))
            for r in x),
            "", True)}) is None


HOST_FIELDS = {
    "at": (is_time, "a time in seconds", True), "gpus": (is_int, "a GPU count", True),
    "ok": (lambda v: isinstance(v, bool), "true or false", True),
    "reachable": (lambda v: isinstance(v, bool), "true or false", True),
    "busy": (is_gpu_list, "a list of GPUs", True),
    "table": (optional(is_gpu_table), "a GPU table", False),
    "apps": (lambda v: isinstance(v, dict) and all(
        isinstance(rows, list) and all(
            isinstance(r, list) and len(r) == 2 and optional(is_str)(r[0])
            and optional(is_int)(r[1]) for r in rows) for rows in v.values()),
        "the processes on each GPU", False)}


def load_hosts(cfg):
    """state/hosts.json (see track_hosts) as {"down": {host: since},
    "seen": {host: what its last poll saw}}.  What is corrupt in it is left
    out, with a warning: it is only a record of the last polls."""
    path = cfg.p("state", "hosts.json")
    fix = "dq does without it until the next poll writes it anew"
    data = read_json(path, {}, fix=fix, skip_newer=True)
    down, seen = data.get("down", {}), data.get("seen", {})
    if not isinstance(down, dict) or not isinstance(seen, dict):
        bad_file(path, "'down' and 'seen' must be objects", fix)
        return {"down": {}, "seen": {}}
    good_down = {h: t for h, t in down.items() if is_time(t)}
    good_seen = {h: e for h, e in seen.items()
                 if isinstance(e, dict) and bad_field(e, HOST_FIELDS) is None}
    if len(good_down) < len(down) or len(good_seen) < len(seen):
        bad = sorted((set(down) - set(good_down)) | (set(seen) - set(good_seen)))
        bad_file(path, f"bad entries for {' '.join(bad)[:60]}", fix)
    return {"down": good_down, "seen": good_seen}


def poll_handover(cfg, host):
    """The hand-over's poll of its own host: {host: HostState}.  Which GPUs
    a host has hardly ever changes, so when a full poll of the last minute
    (hosts.json) gave the table and saw every GPU's memory, only the
    compute-apps query runs: one nvidia-smi instead of two at every job's
    end.  No ps: which sessions live is the loops' business."""
    seen = load_hosts(cfg)["seen"].get(host, {})
    table = seen.get("table")
    started = time.time()
    if not table or not table.get("all_known") or started - table["at"] > GPU_TABLE_MAX_AGE \
            or any(len(row) != 4 for row in table["gpus"]):      # from an older dq
        return poll_hosts(cfg, [host], with_ps=False)
    st = parse_poll(host, run_on(cfg, host, poll_script(cfg, False, False)), started, table)
    st.local = polled_locally(cfg, host)
    return {host: st}


def track_hosts(cfg, polls):
    """Keep state/hosts.json: since when each silent host is down (so that
    'down for lost_after seconds' spans passes and users), and what the last
    poll of each host saw (GPU count, busy GPUs), which lets dq-submit skip
    polling the cluster when nothing can be free, and the GPU table of its
    last full poll (see poll_handover).  Returns {host: down_since}."""
    path = cfg.p("state", "hosts.json")
    old = load_hosts(cfg)
    down, seen = old["down"], old["seen"]
    for h, st in polls.items():
        # A host whose last ssh poll failed stays down until one answers:
        # a hand-over's local poll of its own host does not count.
        if st.reachable and not st.local:
            down.pop(h, None)
        elif not st.reachable:
            down.setdefault(h, st.started)
        table = seen.get(h, {}).get("table")
        if not st.error and st.table_at == st.started:      # a full poll
            table = {"at": st.started,
                     "gpus": [[g.index, g.uuid, g.total, g.name] for g in st.gpus],
                     "all_known": all(g.known for g in st.gpus)}
        elif st.gpus and not all(g.known for g in st.gpus):
            table = None        # it named a GPU the table lacks: read it again
        seen[h] = {"at": st.started, "gpus": len(st.gpus), "ok": not st.error and h not in down,
                   "reachable": st.reachable and h not in down,
                   "busy": [g.index for g in st.gpus if g.busy()], "table": table,
                   # [dq job or null, MiB] per process: room for sharing jobs
                   "apps": {str(g.index): [[g.owners.get(pid), mem] for pid, mem in g.apps]
                            for g in st.gpus if g.apps}}
    write_json(path, {"down": down, "seen": seen}, mode=0o666, durable=False, compact=True)
    return down


def cached_hosts(cfg, max_age):
    """What the last polls saw of every host, if all are younger than
    max_age seconds; else None."""
    seen = load_hosts(cfg)["seen"]
    now = time.time()
    if all(h in seen and now - seen[h].get("at", 0) < max_age for h in cfg.hosts):
        return {h: seen[h] for h in cfg.hosts}
    return None


def seen_models(seen):
    """[(name, MiB)] of a host's GPUs as hosts.json remembers them (from
    its last full poll; unknown where it has none)."""
    table = (seen.get("table") or {}).get("gpus", [])
    if table and all(len(row) == 4 for row in table):
        return [(name, total) for _, _, total, name in table]
    return [(None, None)] * seen["gpus"]


def seen_gpu_type(cfg, host, gpus):
    """nvidia-smi's name of these GPUs of host (the first one's), as the
    last full poll saw them (hosts.json), or None: a job's wrapper records
    it in run.json, reading a file rather than asking nvidia-smi again."""
    seen = load_hosts(cfg)["seen"].get(host) or {}
    names = {row[0]: row[3] for row in (seen.get("table") or {}).get("gpus", [])
             if len(row) == 4}
    name = names.get(gpus[0]) if gpus else None
    return name if is_str(name) else None


def seen_host(h, seen):
    """A HostState of what the last poll of h saw (its hosts.json entry,
    None if it has none), for the planner."""
    st = HostState(h, 0)
    if not seen or not seen["ok"]:
        st.error = "not answering" if seen else "not polled yet"
        st.reachable = bool(seen and seen["reachable"])
        return st
    apps = seen.get("apps") or {}
    for i, (name, total) in enumerate(seen_models(seen)):
        g = Gpu(i, "", 0, total, name)
        if str(i) in apps:      # (pids stand in as -1, -2, ...)
            for k, (job, mem) in enumerate(apps[str(i)], 1):
                g.apps.append((-k, mem))
                if job:
                    g.owners[-k] = job
        elif i in seen["busy"]:     # (hosts.json of an older dq)
            g.apps.append((0, None))
        st.gpus.append(g)
    return st


def seen_polls(cfg):
    """The hosts as the last polls saw them (hosts.json), as {host:
    HostState} for the planner, and the hosts whose last poll failed: what
    the listings explain the queue with, polling no host."""
    hosts = load_hosts(cfg)
    return {h: seen_host(h, hosts["seen"].get(h)) for h in cfg.hosts}, set(hosts["down"])


# Drain #######################################################################

# An admin drains a host (dq-drain): no new job is placed there; running ones
# finish.  Admins are the owner of dq.conf and the users its `admins` names.
# Each admin's drains are in drain/<admin>, a file of their own in a sticky
# directory: nobody else can write, replace or remove it, and a file there
# counts only if its owner is an admin and it bears their name -- so no one
# can forge a drain (or undo one) by writing a shared file.  The latest
# entry for a host, over all admins' files, says whether it is drained.
DRAIN_HOST_FIELDS = {
    "drained": (lambda v: isinstance(v, bool), "true or false", True),
    "since": (is_time, "a time in seconds", True),
    "reason": (lambda v: isinstance(v, str), "text", False)}


def admins(cfg):
    """(the admins' user names, None) or (set(), why nobody can be trusted
    as one).  The owner of dq.conf (of the data root without one) is an
    admin, and so are the users dq.conf's `admins` names -- as far as only
    its owner can change the file: if others may write dq.conf, `admins`
    is ignored; if others may replace it, nobody is an admin."""
    try:
        root_st = os.stat(cfg.root)
        conf_st = os.stat(cfg.path) if os.path.exists(cfg.path) else root_st
    except OSError as e:
        return set(), f"cannot read {cfg.path}: {e.strerror}"
    if root_st.st_mode & 0o022 and not root_st.st_mode & 0o1000:
        return set(), (f"{cfg.root} is writable by others than its owner, so anyone "
                       f"could replace dq.conf; its owner should run 'chmod go-w {cfg.root}'")
    owner = user_of_uid(conf_st.st_uid)
    if conf_st.st_mode & 0o022 and cfg.admin_names:
        warn(f"'admins' in {cfg.path} ignored: others than its owner ({owner}) may write "
             f"the file; they should run 'chmod go-w {cfg.path}'")
        return {owner}, None
    return {owner} | set(cfg.admin_names), None


def read_drains(cfg, quiet=False):
    """{host: {reason, by, since}} of drained hosts, from the admins' files
    (the others ignored, with a warning unless quiet)."""
    try:
        names = os.listdir(cfg.p("drain"))
    except FileNotFoundError:
        return {}
    if not names:
        return {}
    trusted, why = admins(cfg)
    latest = {}
    for name in names:
        path = cfg.p("drain", name)
        try:
            owner = user_of_uid(os.lstat(path).st_uid)
        except OSError:
            continue
        if owner != name or name not in trusted:
            if not quiet and not name.startswith("."):
                warn(f"ignoring {path}: " + (why or f"{owner} is not an admin (dq.conf "
                                                    f"'admins', or the owner of dq.conf)"))
            continue
        data = read_json(path, None, None, "its owner can remove it and drain again",
                         skip_newer=True)
        hosts = data.get("hosts") if isinstance(data, dict) else None
        if data is not None and not isinstance(hosts, dict):
            bad_file(path, "no 'hosts' object", "its owner can remove it and drain again")
            continue
        for host, entry in (hosts or {}).items():
            if not isinstance(entry, dict) or bad_field(entry, DRAIN_HOST_FIELDS):
                continue
            if host not in latest or entry["since"] > latest[host]["since"]:
                latest[host] = dict(entry, by=name)
    return {h: {"reason": e.get("reason") or "", "by": e["by"], "since": e["since"]}
            for h, e in latest.items() if e["drained"]}


def set_drained(cfg, hosts, drained, reason):
    """Record drains (or their end) in the caller's own drain file."""
    user = me()
    trusted, why = admins(cfg)
    if user not in trusted:
        raise Failure("only admins may drain hosts: " + (why or (
            f"you ({user}) are not one; admins are the owner of {cfg.path} and the users "
            f"its 'admins' line names (e.g. 'admins = {user}')")))
    unknown = [h for h in hosts if h not in cfg.hosts]
    if unknown:
        raise Failure(f"{unknown[0]} is not a host of this cluster ({' '.join(cfg.hosts)}); "
                      f"see 'hosts' in {cfg.path}")
    ensure_layout(cfg)
    path = cfg.p("drain", user)
    with Lock(cfg.p("drain", "." + user + ".lock"), mode=0o644):
        data = read_json(path, None, None, "it is rewritten now")
        old = data.get("hosts") if isinstance(data, dict) else None
        entries = {h: e for h, e in (old or {}).items()
                   if isinstance(e, dict) and not bad_field(e, DRAIN_HOST_FIELDS)}
        now = time.time()
        for h in hosts:
            entries[h] = {"drained": drained, "since": now,
                          **({"reason": reason} if drained and reason else {})}
        write_json(path, {"hosts": entries})


def cmd_drain(cfg, argv):
    p = parser("drain", "Place no new job on these hosts (running jobs finish), or with "
               "--undo, end that;\nalone, list drained hosts.  Only admins may drain: the "
               "owner of dq.conf and\nthe users its 'admins' line names.")
    p.add_argument("host", nargs="*")
    p.add_argument("-r", "--reason", default="", help="why (shown to users)")
    p.add_argument("--undo", action="store_true", help="let dq use the hosts again")
    p.add_argument("--json", action="store_true", help="list as JSON")
    args = parse(p, argv)
    if not args.host:
        if args.undo or args.reason:
            raise Failure("name the hosts, e.g. dq-drain node3 -r 'new disk'")
        drains = slurm_drains(cfg) if is_slurm(cfg) else read_drains(cfg)
        if args.json:
            print(json.dumps([dict(host=h, **d) for h, d in sorted(drains.items())], indent=1))
            return 0
        if not drains:
            print("No host is drained")
            return 0
        print_table(["Host", "Since", "By", "Reason"],
                    [(h, time.strftime("%Y-%m-%d %H:%M", time.localtime(d["since"]))
                      if d["since"] else "-", d["by"],
                      d["reason"] or "-") for h, d in sorted(drains.items())])
        return 0
    if args.undo and args.reason:
        raise Failure("--undo takes no reason")
    if is_slurm(cfg):
        slurm_drain(cfg, args.host, not args.undo, args.reason.strip())
    else:
        set_drained(cfg, args.host, not args.undo, args.reason.strip())
    for h in args.host:
        print(f"{'Undrained' if args.undo else 'Drained'} {h}" +
              (f" ({args.reason.strip()})" if args.reason.strip() and not args.undo else ""))
    if args.undo:
        for user in os.listdir(cfg.p("jobs", "queue")) if os.path.isdir(
                cfg.p("jobs", "queue")) else []:
            touch_wake(cfg, user)   # their jobs may fit there now
    return 0


# Wait reasons ################################################################

# Why a queued job waits (dq-jobs queue's Reason, dq-web, /api/state), like
# Slurm's REASON column.  The planner (plan) gives each job it passes over
# the first of its rules that stopped it; each reason is registered here,
# once, and the README's table lists them all.  A reason with {job} names
# the job it is about.
WAIT_REASONS = {}


def wait_reason(words, meaning):
    """Register a reason: its words in listings, and what it means."""
    WAIT_REASONS.setdefault(words, meaning)
    return words


HELD = wait_reason("held", "held by its owner (dq-hold); dq-release lets it go")
AFTER = wait_reason("after {job}", "waits for job {job} to end (DQ_AFTER, DQ_AFTER_ANY)")
STARTING = wait_reason("starting", "placed on GPUs; its owner's dq-schedule starts it now")
NEXT_PASS = wait_reason("next pass", "what it needs is free; the next pass places it")

USER_LIMIT = wait_reason("user limit", "its owner holds as many GPUs as max_gpus_per_user / "
                                       "[limits] allow")

HOSTS_DOWN = wait_reason("hosts down", "the hosts it may use do not answer, or their "
                                       "nvidia-smi fails")

DRAINED = wait_reason("drained", "the hosts it may use are drained by an admin (dq-drain "
                                 "lists them)")

GPUS_BUSY = wait_reason("GPUs busy", "every GPU it may use is in use")

KEPT = wait_reason("kept for {job}", "GPUs it may use are free, but kept for job {job}, "
                                     "which has waited starve_after and needs more of them")

CPU_SLOTS = wait_reason("CPU slots", "every host it may use runs cpu_slots CPU-only jobs")

GPU_MEMORY = wait_reason("GPU memory: {free} free at most, needs {need}",
                         "a sharing job (DQ_MEM): no GPU it may use has that much memory "
                         "left unbooked (see dq-free)")


# Constraints #################################################################

# Where a job may run: each DQ_* variable that narrows the hosts or GPUs a
# job may take is one Constraint in CONSTRAINTS, and everything that deals
# with constraints iterates that table: dq-submit (job_needs parses them
# into the job's `need`, check_fits refuses a job no host can ever run),
# the state files (is_need checks a stored `need`), the queue
# (need_shape), the planner (a host or GPU is the job's only if every
# constraint it set allows it, and the first one that leaves it no room is
# its wait reason) and the listings (describe_need).  Adding one is one
# entry (the README's "Patching dq" shows one worked through).

HOST_PATTERN_RE = re.compile(r"^[A-Za-z0-9._*?-]+$")
MAX_RANGE = 10000       # hosts one [a-b] range may name


def _expand_range(var, item):
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if not m:
        return [item]
    head, body, tail = m.groups()
    names = []
    for part in body.split(","):
        r = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part.strip())
        lo, hi = (int(r.group(1)), int(r.group(2) or r.group(1))) if r else (1, 0)
        if not r or hi < lo or hi - lo > MAX_RANGE:
            raise Failure(f"{var}: bad range [{body}] in {item!r}; e.g. deep[1-4] or "
                          f"deep[1,3,7-9]")
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        names += [f"{head}{n:0{width}d}" for n in range(lo, hi + 1)]
    return [x for name in names for x in _expand_range(var, name + tail)]


def host_patterns(var, text):
    """'deep[1-4],deep1*' -> ['deep1', ..., 'deep4', 'deep1*']: names and
    shell globs, ranges expanded."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    out = []
    for item in items + [cur]:
        for pat in _expand_range(var, item.strip()):
            if not HOST_PATTERN_RE.match(pat):
                raise Failure(f"{var}: {item.strip()!r} is not a host name, range or glob; "
                              f"e.g. {var}=deep1,deep[3-5],gpu*")
            out.append(pat)
    return out


def is_host_patterns(v):
    return isinstance(v, list) and all(is_str(p) and HOST_PATTERN_RE.match(p) for p in v)


def matches_host(patterns, host):
    import fnmatch
    return any(fnmatch.fnmatchcase(host, p) for p in patterns)


# What dq-submit says when no host of the cluster can ever run a job for a
# constraint: {words} are the job's constraints in the user's words
# ({host_words}: its host constraints only), {hosts} the cluster's hosts,
# {want} the GPUs asked for, {inventory} the cluster's GPUs (gpu_inventory).
NO_HOST = ("{host_words} leaves no host of the cluster (its hosts: {hosts}); change "
           "DQ_HOSTS or DQ_EXCLUDE")

NO_GPU = "no host has {want} GPU(s) for {words}; the cluster has {inventory}"


class Constraint:
    """One entry of CONSTRAINTS:

    var      the DQ_* variable a user sets at submit
    key      its key in the job's `need` (its jobs/active entry)
    parse    stripped, non-empty text -> the value kept in `need`; raises
             Failure naming the fix
    valid    stored value -> bool, and `what` a good one is (is_need)
    host     (value, host) -> may the job use that host (None: all hosts)
    gpu      (value, nvidia-smi's name, memory.total MiB; None where
             unknown) -> may it use that GPU (None: a host constraint);
             a GPU constraint is refused with DQ_GPUS=0
    show     value -> the words for it in listings and refusals
    reason   the wait reason (WAIT_REASONS) of a job it alone keeps waiting
    refusal  dq-submit's words when it leaves the job no place (NO_HOST,
             NO_GPU or a text of its own with their fields)

    The queue's shape (need_shape) hashes the whole `need`, so a new key
    is part of it with nothing to add."""

    def __init__(self, var, key, parse, valid, what, show, reason, host=None, gpu=None,
                 refusal=None):
        self.var, self.key, self.parse, self.valid, self.what = var, key, parse, valid, what
        self.show, self.host, self.gpu = show, host, gpu
        self.reason = wait_reason(*reason)
        self.refusal = refusal or (NO_GPU if gpu else NO_HOST)


HOSTS_REASON = ("hosts", "GPUs are free, but only on hosts DQ_HOSTS/DQ_EXCLUDE rule out")
KIND_REASON = ("GPU kind", "GPUs are free, but none of the type or size it asks for")


def booking_mib(text):
    mib = size_mib("DQ_MEM", text)
    if mib < 1:
        raise Failure(f"DQ_MEM={text!r} books no memory; give the GPU memory the job needs, "
                      f"e.g. DQ_MEM=10G")
    return mib

CONSTRAINTS = [
    # hosts first: a job's hosts are settled before its GPUs
    Constraint("DQ_HOSTS", "hosts", lambda t: host_patterns("DQ_HOSTS", t), is_host_patterns,
               "host patterns", lambda v: "DQ_HOSTS=" + ",".join(v), HOSTS_REASON,
               host=matches_host),
    Constraint("DQ_EXCLUDE", "exclude", lambda t: host_patterns("DQ_EXCLUDE", t),
               is_host_patterns, "host patterns", lambda v: "DQ_EXCLUDE=" + ",".join(v),
               HOSTS_REASON, host=lambda v, h: not matches_host(v, h)),
    Constraint("DQ_GPU_TYPE", "gpu_type", lambda t: t, is_str, "a text",
               lambda v: f"DQ_GPU_TYPE={v}", KIND_REASON,
               gpu=lambda v, name, total: name is not None and v.lower() in name.lower()),
    Constraint("DQ_GPU_MEM", "gpu_mem", lambda t: size_mib("DQ_GPU_MEM", t),
               lambda v: is_int(v, 1), "a size in MiB", lambda v: f"DQ_GPU_MEM={v}M",
               KIND_REASON, gpu=lambda v, name, total: total is not None and total >= v),
    # a booking: the job shares GPUs with other sharing jobs (see GPU sharing)
    Constraint("DQ_MEM", "mem", booking_mib, lambda v: is_int(v, 1), "a size in MiB",
               lambda v: f"DQ_MEM={fmt_mib(v)}", KIND_REASON,
               gpu=lambda v, name, total: total is not None and total >= v),
]


def is_need(v):
    """Is v a good stored `need`: keys and values of CONSTRAINTS' entries?"""
    fields = {c.key: (c.valid, c.what, False) for c in CONSTRAINTS}
    return isinstance(v, dict) and set(v) <= set(fields) and bad_field(v, fields) is None


def job_needs(env, want):
    """The job's constraints from its DQ_* variables, checked: its `need`
    ({key: value} of those it set)."""
    need = {}
    for c in CONSTRAINTS:
        raw = env.get(c.var, "").strip()
        if raw:
            need[c.key] = c.parse(raw)
    gpu_vars = [c.var for c in CONSTRAINTS if c.gpu and c.key in need]
    if want == 0 and gpu_vars:
        one = len(gpu_vars) == 1
        raise Failure(f"{' and '.join(gpu_vars)} choose{'s' * one} GPUs, but DQ_GPUS=0 asks "
                      f"for none; drop {'it' if one else 'them'}, or ask for GPUs with DQ_GPUS")
    return need


def set_constraints(need):
    """The entries of CONSTRAINTS this need sets, in the table's order."""
    return [c for c in CONSTRAINTS if need and c.key in need]


def gpu_allowed(need, name, total):
    """Does a GPU (nvidia-smi's name and memory.total, None if unknown) fit?"""
    return all(c.gpu(need[c.key], name, total) for c in set_constraints(need) if c.gpu)


def describe_need(need, hosts=False):
    """The constraints in the user's words (hosts: only the host ones)."""
    return " ".join(c.show(need[c.key]) for c in set_constraints(need)
                    if not (hosts and c.gpu))


def need_shape(need):
    """A short name for a set of constraints: jobs of one shape (and as
    many GPUs) fit or not alike, so a pass can skip the rest at once."""
    if not need:
        return "-"
    import hashlib
    return hashlib.sha1(json.dumps(need, sort_keys=True).encode()).hexdigest()[:12]


# GPU sharing (DQ_MEM) ########################################################

# A job with DQ_MEM=SIZE shares GPUs: it is booked for SIZE of each of its
# GPUs, and a GPU takes sharing jobs while it holds no exclusive dq job and
#     memory used by processes dq did not start (by hand, or a dq job's on
#     a GPU not its own) + the bookings of dq's sharing jobs there
#     + the new booking + share_margin  <=  the GPU's memory.total
# and it runs fewer than max_jobs_per_gpu dq jobs (share_foreign = no: and
# no process by hand).  Bookings, not a snapshot of free memory: a job
# that grows later stays within what it booked, or its wrapper's sampling
# (GpuWatch) flags it and, with mem_overuse = kill, stops it.  A sharing
# job counts as its booked share of a GPU (`share`: booking / total) for
# fair share, per-user limits and usage.  Placements carry `mem` and
# `share` for sharing jobs.  Pure functions of polls and placements.

# A job is over its booking once it uses this much more (nvidia-smi's
# figures move by a few MiB; a CUDA context alone is ~300-500 MiB).
def over_booking(used, booked):
    return used > booked + max(256, booked // 20)


def margin_mib(rules, total):
    """The memory (MiB) share_margin keeps free on a shared GPU."""
    share, size = rules.share_margin
    return math.ceil(share * total) + size


def booked_share(mem, total):
    """A booking as a share of one GPU (fair share, limits, usage)."""
    return min(1.0, round(mem / total, 4)) if total else 1.0


def placed_share(p):
    """How many GPUs a placement counts as: its GPUs, times its share."""
    return len(p.get("gpus", [])) * p.get("share", 1)


def gpu_bookings(places):
    """{(host, GPU): [MiB booked by sharing jobs, dq jobs on it, exclusive?]}."""
    out = {}
    for p in places.values():
        for g in p.get("gpus", []):
            b = out.setdefault((p["host"], g), [0, 0, False])
            b[0] += p.get("mem", 0)
            b[1] += 1
            b[2] = b[2] or "mem" not in p
    return out


def foreign_mib(g, host, places):
    """Memory on GPU g used by processes dq did not start there: by hand,
    or a dq job's on a GPU not its own.  None if nvidia-smi did not say
    how much one of them uses."""
    total = 0
    for pid, mem in g.apps:
        job = g.owners.get(pid)
        p = places.get(job) if job else None
        if p and p["host"] == host and g.index in p.get("gpus", ()):
            continue
        if mem is None:
            return None
        total += mem
    return total


def gpu_room(g, host, places, rules, bookings=None):
    """(MiB a new sharing job may book on GPU g, dq jobs on it), or None
    where no sharing job may go (see the section's rule)."""
    if not g.known or not g.total:
        return None
    booked, jobs, exclusive = (bookings if bookings is not None else gpu_bookings(places)) \
        .get((host, g.index), (0, 0, False))
    if exclusive or jobs >= rules.max_jobs_per_gpu:
        return None
    foreign = foreign_mib(g, host, places)
    if foreign is None or foreign and not rules.share_foreign:
        return None
    return g.total - margin_mib(rules, g.total) - foreign - booked, jobs


def share_rooms(polls, places, rules, hosts):
    """{host: {GPU: [room MiB, dq jobs]}} of the GPUs of these hosts that
    may take sharing jobs and have room left."""
    bookings = gpu_bookings(places)
    out = {}
    for h in hosts:
        rooms = {}
        for g in polls[h].gpus:
            r = gpu_room(g, h, places, rules, bookings)
            if r is not None and r[0] > 0:
                rooms[g.index] = list(r)
        out[h] = rooms
    return out


SHARE_ARG_RE = re.compile(r"-|([0-9]+)/([01](?:\.[0-9]+)?)")


def share_arg(share):
    """A sharing job's booking as the job's wrapper gets it: 'MiB/share'
    ('-': an exclusive job); read back by parse_share_arg."""
    return "-" if not share else f"{share[0]}/{share[1]}"


def parse_share_arg(text):
    m = SHARE_ARG_RE.fullmatch(text)
    return (int(m.group(1)), float(m.group(2))) if m and m.group(1) else None


def pack(rooms, mem, want, gpus_ok):
    """The GPUs of one host a sharing job of `want` GPUs takes: those with
    the least room that still fit `mem` (whole GPUs stay free for
    exclusive jobs), or None.  gpus_ok: the indices its constraints allow."""
    fit = sorted((r[0], i) for i, r in rooms.items() if r[0] >= mem and i in gpus_ok)
    return [i for _, i in fit[:want]] if len(fit) >= want else None


# Planning (pure: data in, decisions out) #####################################

def order_key(number, priority, top):
    """Within one user: DQ_PRIORITY (higher first), then dq-top (the latest
    first), then submission."""
    return (-priority, -top, number)


class Queued:
    """A queued job as the planner sees it, all of it data: its ID, GPUs
    wanted (0: CPU only), constraints (`need`, see CONSTRAINTS) and their
    shape (need_shape), when it was submitted (None: unknown), its order
    key among its owner's jobs, and whether it is held (dq-hold) or
    waiting for its dependencies (DQ_AFTER; waits_on: which one, where
    the caller looked it up)."""
    __slots__ = ("job_id", "gpus", "need", "shape", "submitted", "key", "held", "waiting",
                 "waits_on")

    def __init__(self, job_id, gpus, need=None, submitted=None, key=None, shape=None,
                 held=False, waiting=False, waits_on=None):
        self.job_id, self.gpus, self.need, self.submitted = job_id, gpus, need or None, submitted
        self.shape = need_shape(need) if shape is None else shape
        self.key, self.held, self.waiting, self.waits_on = key, held, waiting, waits_on


class UserQueue:
    """One user's queue for a pass: a sub-queue per shape (GPUs wanted and
    constraints), each a list of (order key, payload), merged in the
    user's order; make(payload, (gpus, shape)) turns an entry into a
    Queued when it comes up.  Once a job of a shape found no room, drop()
    discards the rest of that shape at once: a pass walks the shapes, not
    the jobs."""

    def __init__(self, groups, make):
        import heapq
        self._heapq, self._make, self._groups = heapq, make, groups
        for entries in groups.values():
            entries.sort(key=lambda e: e[0])
        self._pos = dict.fromkeys(groups, 0)
        self._heap = [(entries[0][0], group) for group, entries in groups.items()]
        heapq.heapify(self._heap)
        self._dropped = set()

    def __iter__(self):
        return self

    def __next__(self):
        while self._heap:
            _, group = self._heapq.heappop(self._heap)
            if group in self._dropped:
                continue
            entries, i = self._groups[group], self._pos[group]
            self._pos[group] = i + 1
            if i + 1 < len(entries):
                self._heapq.heappush(self._heap, (entries[i + 1][0], group))
            return self._make(entries[i][1], group)
        raise StopIteration

    def drop(self, gpus, shape):
        self._dropped.add((gpus, shape))


def reserved_by_host(places):
    out = {}
    for p in places.values():
        out.setdefault(p["host"], set()).update(p.get("gpus", []))
    return out


def gpus_held(places):
    """{user: how many GPUs their placed and running jobs hold (a sharing
    job: its share of each)}."""
    out = {}
    for p in places.values():
        out[p["user"]] = out.get(p["user"], 0) + placed_share(p)
    return out


def cpu_jobs_by_host(places):
    """{host: how many CPU-only jobs are placed or running there}."""
    out = {}
    for p in places.values():
        if not p.get("gpus"):
            out[p["host"]] = out.get(p["host"], 0) + 1
    return out


class Plan:
    """The planner's answer: `placed`, [(job_id, host, gpus)] in the order
    decided, `shares`, {job_id: (MiB booked per GPU, share of a GPU)} of
    the sharing jobs among them, and `reasons`, {job_id: why it was passed
    over} (the words of WAIT_REASONS, their fields filled in)."""

    def __init__(self):
        self.placed, self.shares, self.reasons = [], {}, {}


def host_rules(need, hosts, up, closed):
    """The rules on where a job may run, in order: (the first that leaves
    it no host, None) or (None, the hosts it may use now).  hosts: every
    host of the cluster, in dq.conf's order; up: those that answered;
    closed: drained ones."""
    left = list(hosts)
    for c in set_constraints(need):
        if c.host:
            left = [h for h in left if c.host(need[c.key], h)]
            if not left:
                return c.reason, []
    left = [h for h in left if h in up]
    if not left:
        return HOSTS_DOWN, []
    left = [h for h in left if h not in closed]
    return (DRAINED, []) if not left else (None, left)


def plan(queues, cpu_queue, polls, places, now, rules, drained=(), silent=(), usage=None,
         explain=False):
    """Decide which queued jobs go where, and why the others wait.  Pure:
    data in, a Plan out, no I/O, so every rule is a unit test away.

    queues: {user: that user's GPU jobs in their order} (iterables of
    Queued; a UserQueue drops the rest of a shape once one of its jobs
    found no room, so a pass costs about the same with ten or ten thousand
    jobs waiting).  cpu_queue: the CPU-only jobs (DQ_GPUS=0), oldest first.
    polls: {host: HostState} of every host, in dq.conf's order.  places:
    the placements ({job_id: {user, host, gpus, ...}}).  rules: order,
    starve_after, cpu_slots, gpu_limit(user), share_margin, max_jobs_per_gpu
    and share_foreign (the Config).  drained,
    silent: hosts no job goes to (drained by an admin; whose last poll
    failed).  usage: {user: decayed GPU-seconds}.  explain: give every job
    a reason (the listings) instead of stopping once no GPU is left.

    The rules, in the order a job meets them (the first that stops it is
    its reason): held, waiting for its dependencies (after ID), already
    placed (starting), its owner's GPU limit (user limit), the host rules
    (host_rules: its host constraints, hosts down, drained), then room:
    GPUs busy if no open host has enough free GPUs, else the first of its
    constraints (CONSTRAINTS' order) that leaves no host enough, else the
    host it fits is kept for a starving job (kept for ID).  A job that
    passes them all is placed (next pass, in a listing).  A sharing job
    (need["mem"], see GPU sharing) meets the same rules over the GPUs that
    take sharing jobs (GPUs busy if none), and waits for GPU memory where
    none has room for its booking.

    Order (rules.order): `fairshare` takes next the first job of the user
    who holds the fewest GPUs (placed or running, this pass's placements
    included); between users holding as many, the one with less recent
    usage, then the earlier job.  `fifo` takes the oldest job of all.
    Within one user: their order (order_key).  Backfill: a job that cannot
    fit yet is passed over by the ones behind it, except that once it has
    waited starve_after seconds the host closest to fitting it is kept for
    it.  Among hosts that fit, the one with the fewest free GPUs wins,
    which keeps whole hosts free for multi-GPU jobs; a sharing job packs
    (pack: the GPUs and host with the least room that fits), which keeps
    whole GPUs free for exclusive jobs.  CPU-only jobs go to
    the host running the fewest, at most cpu_slots each; they take no GPU,
    so they never wait for or block a GPU job."""
    out = Plan()
    usage = usage or {}
    reserved = reserved_by_host(places)
    up = [h for h, s in polls.items() if not s.error and h not in silent]
    free = {h: polls[h].free(reserved.get(h, ())) for h in up if h not in drained}
    rooms = share_rooms(polls, places, rules, free)     # for sharing jobs
    info = {h: {g.index: g for g in polls[h].gpus} for h in free}
    kept_for = {}           # host -> the job that starves for it
    held = gpus_held(places)    # this plan's placements are added as it goes
    no_room = {}            # (GPUs, shape) -> reason: jobs of one shape fail alike
    streams = {u: iter(q) for u, q in queues.items()}
    heads = {}

    def queue_rule(item):
        if item.held:
            return HELD
        if item.waiting:
            return AFTER.format(job=item.waits_on) if item.waits_on else NEXT_PASS
        if item.job_id in places:
            return STARTING
        return None

    def number(u):
        return int(heads[u].job_id.split("-", 1)[0])   # the head's age

    def turn():
        """Whose head goes next."""
        if rules.order != "fairshare" or len(heads) == 1:
            return min(heads, key=number)
        fewest = min(held.get(u, 0) for u in heads)
        users = [u for u in heads if held.get(u, 0) == fewest]
        if len(users) > 1:
            least = min(usage.get(u, 0.0) for u in users)
            users = [u for u in users if usage.get(u, 0.0) == least]
        return min(users, key=number)

    def usable(h, gpus, need):
        """Of these GPUs of h (indices), those the job's constraints allow."""
        if not need:
            return list(gpus)
        return [i for i in gpus if gpu_allowed(need, info[h][i].name, info[h][i].total)]

    def no_room_reason(item):
        """Why a job that passed the host rules does not fit."""
        want, need = item.gpus, item.need or {}
        pool = {h: list(rooms[h] if "mem" in need else free[h]) for h in free}
        if not any(len(v) >= want for v in pool.values()):
            return GPUS_BUSY
        for c in set_constraints(need):
            if c.host:
                pool = {h: v for h, v in pool.items() if c.host(need[c.key], h)}
            else:
                pool = {h: [i for i in v if c.gpu(need[c.key], info[h][i].name,
                                                  info[h][i].total)]
                        for h, v in pool.items()}
            if not any(len(v) >= want for v in pool.values()):
                return c.reason
        if "mem" in need:
            # the most a job of `want` GPUs could book on one host
            most = max((sorted((rooms[h][i][0] for i in v), reverse=True)[want - 1]
                        for h, v in pool.items() if len(v) >= want), default=0)
            if most < need["mem"]:
                return GPU_MEMORY.format(free=fmt_mib(max(0, most)), need=fmt_mib(need["mem"]))
        keeper = next((kept_for[h] for h, v in pool.items()
                       if len(v) >= want and h in kept_for), None)
        return KEPT.format(job=keeper) if keeper else GPUS_BUSY

    def share_fits(hosts, item):
        """{host: the GPUs a sharing job would take there} where it fits."""
        mem = item.need["mem"]
        out = {}
        for h in hosts:
            if h not in kept_for:
                gpus = pack(rooms[h], mem, item.gpus, usable(h, rooms[h], item.need))
                if gpus is not None:
                    out[h] = gpus
        return out

    def take_shared(user, item, h, gpus):
        """Book a sharing job on these GPUs of h; False if that would put
        its owner over their limit."""
        mem = item.need["mem"]
        share = booked_share(mem, info[h][gpus[0]].total)
        limit = rules.gpu_limit(user)
        if limit is not None and held.get(user, 0) + item.gpus * share > limit + 1e-9:
            return False
        for i in gpus:
            rooms[h][i][0] -= mem
            rooms[h][i][1] += 1
            if rooms[h][i][1] >= rules.max_jobs_per_gpu or rooms[h][i][0] <= 0:
                del rooms[h][i]
        free[h] = [g for g in free[h] if g not in gpus]
        out.placed.append((item.job_id, h, gpus))
        out.shares[item.job_id] = (mem, share)
        held[user] = held.get(user, 0) + item.gpus * share
        return True

    while explain or any(free[h] or rooms[h] for h in free if h not in kept_for):
        for u in [u for u in streams if u not in heads]:
            item = next(streams[u], None)
            if item is None:
                del streams[u]
            else:
                heads[u] = item
        if not heads:
            break
        user = turn()
        item = heads.pop(user)
        job_id, want = item.job_id, item.gpus
        why = queue_rule(item)
        limit = rules.gpu_limit(user)
        sharing = bool(item.need) and "mem" in item.need
        if why is None and limit is not None and held.get(user, 0) + (0 if sharing else want) \
                > limit - (1e-9 if sharing else 0):
            why = USER_LIMIT
            if held.get(user, 0) >= limit and not explain:
                streams.pop(user, None)     # none of theirs fits: read no more
        if why is None and (want, item.shape) in no_room:
            why = no_room[(want, item.shape)]
        if why is not None:
            out.reasons[job_id] = why
            continue
        why, hosts = host_rules(item.need, polls, up, drained)
        if sharing:
            mine = share_fits(hosts, item)
            fits = list(mine)
        else:
            mine = {h: usable(h, free[h], item.need) for h in hosts if h not in kept_for}
            fits = [h for h in mine if len(mine[h]) >= want]
        if fits and sharing:
            h = min(fits, key=lambda h: (sum(rooms[h][i][0] for i in mine[h]), len(free[h])))
            if not take_shared(user, item, h, mine[h]):
                out.reasons[job_id] = USER_LIMIT
            continue
        if fits:
            h = min(fits, key=lambda h: len(free[h]))
            gpus = sorted(mine[h])[:want]
            free[h] = [g for g in free[h] if g not in gpus]
            rooms[h] = {i: r for i, r in rooms[h].items() if i not in gpus}
            out.placed.append((job_id, h, gpus))
            held[user] = held.get(user, 0) + want
            continue
        why = why or no_room_reason(item)
        out.reasons[job_id] = no_room[(want, item.shape)] = why
        if not explain:
            for q in queues.values():
                if isinstance(q, UserQueue):
                    q.drop(want, item.shape)    # the rest of that shape, unread
        if item.submitted is not None and now - item.submitted >= rules.starve_after:
            # (a sharing job: the host with the most room for it)
            big = [h for h in (hosts if sharing else mine) if h not in kept_for and len(
                usable(h, [g.index for g in polls[h].gpus], item.need)) >= want]
            if big:
                kept_for[max(big, key=lambda h: sum(r[0] for r in rooms[h].values())
                              if sharing else len(mine[h]))] = job_id

    cpu_used = cpu_jobs_by_host(places)
    reachable = [h for h, s in polls.items() if s.reachable and h not in silent]
    for item in cpu_queue:
        why = queue_rule(item)
        if why is None:
            why, hosts = host_rules(item.need, polls, reachable, drained)
            if why is None:
                hosts = [h for h in hosts if cpu_used.get(h, 0) < rules.cpu_slots]
                why = None if hosts else CPU_SLOTS
        if why is not None:
            out.reasons[item.job_id] = why
            continue
        h = min(hosts, key=lambda h: cpu_used.get(h, 0))
        cpu_used[h] = cpu_used.get(h, 0) + 1
        out.placed.append((item.job_id, h, []))
    return out


# Job files ###################################################################

MAX_GPUS = 64       # per job: more is a typo
MAX_PRIORITY = 1_000_000    # DQ_PRIORITY, either way

RUN_FIELDS = {
    "host": (lambda v: is_str(v) and HOST_RE.match(v), "a host name", True),
    "gpus": (is_gpu_list, "a list of GPUs", False),
    "pid": (is_int, "a PID", False), "pgid": (is_int, "a process group", False),
    "started": (is_time, "a time in seconds", True),
    "mem": (lambda v: is_int(v, 1), "MiB booked (DQ_MEM)", False),
    "share": (lambda v: is_share(v), "a share of a GPU", False),
    # its wrapper acts on dq-kill --grace (not one of a dq from before it)
    "grace": (lambda v: v is True, "true", False),
    # nvidia-smi's name of its GPUs, from the last full poll of its host
    # (hosts.json), for dq-report's --by gpu-type; absent where unknown
    "gpu_type": (is_str, "a GPU name", False)}

# dq-kill --grace's request, jobs/backend/<id>/grace.json: written once
# (exclusively) by the owner's dq-kill, acted on by the job's wrapper alone
# (TimeLimit), which sends the warning and records the end.
GRACE_FILE = "grace.json"
GRACE_FIELDS = {
    "grace": (lambda v: is_int(v, 1, 10 ** 9), "seconds", True),
    "reason": (is_str, "a text", True),
    "requested": (is_time, "a time in seconds", False)}

# resumed: it exited 75 (EX_TEMPFAIL, "checkpointed, run me again") and
# DQ_RESUME queued its next run, which its end.json's requeued_as names.
END_STATES = ("done", "failed", "killed", "lost", "timeout", "cancelled", "resumed")

END_FIELDS = {
    "state": (lambda v: v in END_STATES, " or ".join(END_STATES), True),
    "reason": (optional(is_str), "a text", False),
    "exit_code": (optional(lambda v: is_int(v, -1 << 31)), "an exit status", False),
    "signal": (optional(is_str), "a signal name", False),
    "ended": (optional(is_time), "a time in seconds", False),
    "host": (optional(is_str), "a host name", False),
    "requeued_as": (optional(is_str), "a job ID", False)}

LOST_FIELDS = {"reason": (optional(is_str), "a text", False),
               "ended": (optional(is_time), "a time in seconds", False)}


def is_id_list(v):
    return isinstance(v, list) and all(isinstance(i, str) and JOB_ID_RE.match(i) and "-" in i
                                       for i in v)


def is_inner_path(v):
    """A path inside a directory: relative, without '..'."""
    return is_str(v) and v and not v.startswith("/") and ".." not in v.split("/")


def is_snapshot(v):
    """job.json's `snapshot` (DQ_SNAPSHOT, see SnapshotPlan.take): the job
    whose directory holds the copy, the directory it copies (top), the
    job's cwd and script inside it (script null: it lies outside), how
    many files and bytes it holds, whether git chose them."""
    return isinstance(v, dict) and bad_field(v, {
        "job": (lambda x: is_id_list([x]), "a job ID", True),
        "top": (lambda x: is_str(x) and x.startswith("/"), "an absolute path", True),
        "cwd": (is_inner_path, "a path inside it", True),
        "script": (optional(is_inner_path), "a path inside it", False),
        "files": (is_int, "a count", True), "bytes": (is_int, "a size", True),
        "git": (lambda x: isinstance(x, bool), "true or false", False)}) is None


# What each of a job's files holds (see bad_field): a file that does not
# fit is corrupt, and read as the fallback its reader names.
JOB_FIELDS = {
    "id": (is_str, "the job ID", True), "user": (is_str, "a user name", True),
    "script": (lambda v: is_str(v) and v.startswith("/"), "an absolute path", True),
    "cwd": (lambda v: is_str(v) and v.startswith("/"), "an absolute path", True),
    "env": (is_env, "an object of DQ_* variables and their string values", False),
    "gpus": (lambda v: is_int(v, 0, MAX_GPUS), f"a number of GPUs, 0 to {MAX_GPUS}", False),
    "submitted": (is_time, "a time in seconds", True),
    "submit_host": (optional(is_str), "a host name", False),
    "restart_of": (optional(is_str), "a job ID", False),
    "requeues": (is_int, "a count", False),
    "time_limit": (optional(lambda v: is_int(v, 1)), "seconds", False),
    "after": (lambda v: is_id_list(v), "a list of job IDs", False),
    "after_any": (lambda v: is_id_list(v), "a list of job IDs", False),
    "retry_of": (optional(is_str), "a job ID", False),
    "retries": (is_int, "a count", False),
    "resume_of": (optional(is_str), "a job ID", False),
    "resumes": (is_int, "a count", False),
    "snapshot": (optional(is_snapshot), "where its snapshot is (DQ_SNAPSHOT)", False),
    # dq-shell's jobs: run for a terminal, with arguments to the program
    "interactive": (lambda v: v is True, "true (dq-shell)", False),
    "args": (lambda v: isinstance(v, list) and all(is_str(a) for a in v), "a list of texts",
             False)}

INDEX_FIELDS = {
    "gpus": (lambda v: is_int(v, 0, MAX_GPUS), f"a number of GPUs, 0 to {MAX_GPUS}", True),
    "submitted": (optional(is_time), "a time in seconds", False),
    "need": (lambda v: is_need(v), "the job's constraints (see job_needs)", False),
    "held": (lambda v: v is True, "true (dq-hold)", False),
    "priority": (lambda v: is_int(v, -MAX_PRIORITY, MAX_PRIORITY), "a whole number (DQ_PRIORITY)",
                 False),
    "top": (lambda v: is_int(v, 0, 10 ** 15), "a whole number (dq-top)", False),
    "after": (lambda v: is_id_list(v), "a list of job IDs (DQ_AFTER)", False),
    "after_any": (lambda v: is_id_list(v), "a list of job IDs (DQ_AFTER_ANY)", False),
    "waiting": (lambda v: v is True, "true (its dependencies have not ended)", False)}


GPU_USE_FIELDS = {
    "at": (is_time, "a time in seconds", True),
    "samples": (is_int, "a count", True),
    "booked_mib": (optional(is_int), "MiB booked (DQ_MEM)", False),
    "mem_mib": (optional(is_int), "MiB, the most on one of its GPUs", False),
    "peak_mem_mib": (is_int, "MiB", False),
    "mem_sum": (is_int, "MiB summed over samples", False),
    "util": (optional(is_int), "a percentage", False),
    "util_sum": (is_int, "percentages summed over samples", False),
    "util_peak": (is_int, "a percentage", False),
    "last": (lambda v: isinstance(v, list), "a list of samples", False),
    "over": (optional(lambda v: isinstance(v, dict)), "when it went over its booking", False),
    # GPU-seconds its GPUs were sampled at 0% utilisation (see GpuWatch.record)
    "idle_gpu_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) and v >= 0, "GPU-seconds, 0 or more", False),
    # flagged idle (idle_after), and since when its GPUs sat unused (see GpuWatch)
    "idle": (lambda v: isinstance(v, bool), "true or false", False),
    "idle_since": (optional(is_time), "a time in seconds", False)}


def read_gpu_use(job_dir):
    """A job's gpu.json (see GpuWatch), or None (none yet, or corrupt)."""
    data = read_json(os.path.join(job_dir, "gpu.json"), None, None, skip_newer=True)
    return data if data and bad_field(data, GPU_USE_FIELDS) is None else None


def gpu_use_summary(use):
    """What a job's gpu.json says in short, for listings and the history:
    mean and peak utilisation (%) and memory (MiB, on the one of its GPUs
    where it used most), idle GPU-seconds, how many samples; None without
    samples."""
    if not use or not use["samples"]:
        return None
    n = use["samples"]
    return {"samples": n, "util_mean": round(use.get("util_sum", 0) / n, 1),
            "util_peak": use.get("util_peak", 0),
            "mem_mean_mib": round(use.get("mem_sum", 0) / n),
            "mem_peak_mib": use.get("peak_mem_mib", 0),
            "idle_gpu_s": round(use.get("idle_gpu_s", 0), 1)}


def snapshot_dir(cfg, snap):
    """Where a job's snapshot (job.json's `snapshot`) lies: in the
    directory of the job that took it (a sweep's first job, or the first
    run of a job run again)."""
    return os.path.join(cfg.job_dir(snap["job"]), "snapshot")


def snapshot_info(cfg, snap):
    """A snapshot for listings: {files, bytes, dir, top, git}, or None."""
    if not snap:
        return None
    return {"files": snap["files"], "bytes": snap["bytes"], "dir": snapshot_dir(cfg, snap),
            "top": snap["top"], "git": snap.get("git", False)}


def run_paths(cfg, job):
    """(script, cwd) the job runs: as submitted, or (DQ_SNAPSHOT) their
    copies in its snapshot, the script too when it lay in the copied tree."""
    script, cwd, snap = job.spec["script"], job.spec["cwd"], job.spec.get("snapshot")
    if not snap:
        return script, cwd
    inside = snapshot_dir(cfg, snap)
    return (os.path.join(inside, snap["script"]) if snap.get("script") else script,
            os.path.normpath(os.path.join(inside, snap["cwd"])))


def read_job_file(path, fields, corrupt, fix):
    """One of a job's JSON files: {} when missing, `corrupt` when it exists
    but cannot be trusted (a warning naming it and `fix` says so)."""
    data = read_json(path, None, False, fix, skip_newer=True)
    if data is None:
        return {}
    if data is False:
        return corrupt
    why = bad_field(data, fields)
    return bad_file(path, why, fix, corrupt) if why else data


class Job:
    """A job as its files say.  job.json is written once by the submitter;
    run.json by the job's wrapper when it starts; end.json once, when it
    ends (by the wrapper, dq-kill, or whoever finds it lost).  Its state
    is read from which files exist (state()), never stored twice:

    state     files                          written by
    --------  -----------------------------  ---------------------------------
    queued    job.json, jobs/active/<id>     dq-submit, dq-restart, a requeue
    running   + run.json                     its wrapper, in its screen session
    lost      + jobs/lost/<id>, no end.json  a pass that proved its session
                                             gone or its host silent (see
                                             Placements); the owner's next
                                             pass records the end
    done,     + end.json (state, exit code,  the wrapper when the script exits
    failed,     signal, reason); out of      (timeout: it stopped the job at
    timeout,    jobs/active                  its time limit; killed: it stopped
    resumed,                                 it for a dq-kill --grace, whose
    killed,                                  grace.json asked; resumed: it
    lost,                                    exited 75 and DQ_RESUME queued its
    cancelled                                next run); dq-kill (killed,
                                             written before it kills); the
                                             owner's pass (lost, and cancelled:
                                             a dependency did not end done)

    Whether it holds GPUs meanwhile is the placement's business
    (Placements: assigned, launching, running)."""

    def __init__(self, cfg, job_id, spec, owner):
        self.cfg, self.id, self.spec, self.owner = cfg, job_id, spec, owner
        self.dir = cfg.job_dir(job_id)
        self._run = self._end = self._lost = None

    n = property(lambda self: int(self.id.split("-", 1)[0]))

    # A file that exists counts, whatever it holds: an end.json, however
    # broken, means the job ended, and a lost marker that it was lost (the
    # queue goes by their existence too).  A broken run.json reads as not
    # started, so nobody acts on a host or process group it does not name.

    @property
    def run(self):
        if self._run is None:
            self._run = read_job_file(os.path.join(self.dir, "run.json"), RUN_FIELDS, {},
                                      "dq takes the job as not started")
        return self._run

    @property
    def end(self):
        if self._end is None:
            self._end = read_job_file(
                os.path.join(self.dir, "end.json"), END_FIELDS,
                {"state": "failed", "reason": "its end.json is corrupt"},
                "dq counts the job as failed")
        return self._end

    def lost_marker(self):
        if self._lost is None:
            self._lost = read_job_file(
                self.cfg.p("jobs", "lost", self.id), LOST_FIELDS,
                {"reason": "lost (its marker in jobs/lost is corrupt)"},
                "dq counts the job as lost")
        return self._lost

    def is_active(self):
        return os.path.exists(self.cfg.p("jobs", "active", self.id))

    def state(self):
        if self.end:
            return self.end.get("state", "failed")
        if self.lost_marker():
            return "lost"
        if self.run:
            return "running"
        if self.is_active():
            return "queued"
        return "lost"

    def to_dict(self, placement=None):
        """The job for listings; `placement` gives host and GPUs of a job
        that is placed but not started yet."""
        state = self.state()
        host = self.run.get("host") or (placement or {}).get("host") or self.end.get("host")
        gpus = self.run.get("gpus") if self.run else (placement or {}).get("gpus", [])
        reason = self.end.get("reason") or self.lost_marker().get("reason")
        return {
            "id": self.id, "user": self.owner, "state": state,
            "host": host if state != "queued" or placement else None,
            "gpus": gpus or [], "gpus_wanted": self.spec.get("gpus", 1),
            "script": self.spec.get("script"), "cwd": self.spec.get("cwd"),
            "env": self.spec.get("env", {}), "desc": self.spec.get("env", {}).get("DQ_DESC"),
            "submitted": self.spec.get("submitted"), "started": self.run.get("started"),
            "ended": self.end.get("ended") or self.lost_marker().get("ended"),
            "exit_code": self.end.get("exit_code"), "signal": self.end.get("signal"),
            "reason": reason, "restart_of": self.spec.get("restart_of"),
            "submit_host": self.spec.get("submit_host"),
            "time_limit": self.spec.get("time_limit"),
            "sweep": self.spec.get("env", {}).get("DQ_SWEEP"),
            "after": self.spec.get("after", []), "after_any": self.spec.get("after_any", []),
            "retry_of": self.spec.get("retry_of"), "retries": self.spec.get("retries", 0),
            "resume_of": self.spec.get("resume_of"), "resumes": self.spec.get("resumes", 0),
            "requeued_as": self.end.get("requeued_as"),
            "snapshot": snapshot_info(self.cfg, self.spec.get("snapshot")),
            "notify": self.notify_problems() if self.end else {},
            # a sharing job's booking (MiB per GPU), and what it uses (GpuWatch)
            "interactive": bool(self.spec.get("interactive")),
            "args": self.spec.get("args", []),
            "mem_mib": self.run.get("mem") or (placement or {}).get("mem") or self.booking(),
            # its GPU use (GpuWatch's gpu.json), running and ended jobs alike
            "gpu_use": read_gpu_use(self.dir) if state != "queued" and gpus else None,
        }

    def booking(self):
        """DQ_MEM in MiB, or None (an exclusive job)."""
        try:
            return booking_mib(self.spec["env"]["DQ_MEM"])
        except (KeyError, Failure):
            return None

    def notify_problems(self):
        """{mail|hook: what went wrong} at the job's end (notify.json)."""
        data = read_json(os.path.join(self.dir, "notify.json"), {}, {}, skip_newer=True)
        return {k: v["error"] for k, v in data.items()
                if isinstance(v, dict) and isinstance(v.get("error"), str)}


def load_job(cfg, job_id, quiet=False):
    """Load a job, its owner taken from the file system, not from the JSON:
    a job.json naming somebody else than the file's owner is refused."""
    path = os.path.join(cfg.job_dir(job_id), "job.json")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    spec = read_job_file(path, JOB_FIELDS, None,
                         f"dq leaves job {job_id} out; remove {os.path.dirname(path)} "
                         f"if nobody needs it")
    if not spec:
        return None
    owner = user_of_uid(st.st_uid)
    if spec.get("user") != owner or spec.get("id") != job_id or not job_id.endswith("-" + owner):
        if not quiet:
            warn(f"ignoring {path}: it names user {spec.get('user')!r} but belongs to {owner!r}")
        return None
    if spec.get("snapshot") and not spec["snapshot"]["job"].endswith("-" + owner):
        if not quiet:       # a job runs only its owner's own copies
            warn(f"ignoring {path}: its snapshot lies in {spec['snapshot']['job']}, a job "
                 f"of another user")
        return None
    return Job(cfg, job_id, spec, owner)


def job_log(job):
    return os.path.join(job.dir, "log")


def last_lines_offset(f, n, most=None):
    """Offset in a binary file where its last n lines start (or, with
    `most`, `most` bytes before its end, if they start before that)."""
    f.seek(0, os.SEEK_END)
    end = pos = f.tell()
    if n <= 0:
        return end
    floor = max(0, end - most) if most is not None else 0
    count, block = 1, 65536         # the last line, with or without its newline
    while pos > floor:
        step = min(block, pos - floor)
        pos -= step
        f.seek(pos)
        chunk = f.read(step)
        if pos + step == end:
            chunk = chunk[:-1] if chunk.endswith(b"\n") else chunk
        i = len(chunk)
        while True:
            i = chunk.rfind(b"\n", 0, i)
            if i < 0:
                break
            count += 1
            if count > n:
                return pos + i + 1
    return floor


def session_name(job_id):
    # Screen matches -S by prefix; ids are unique numbers followed by '-',
    # so no session name is a prefix of another.
    return f"dq-{job_id}"


# Job IDs #####################################################################

RANGE_RE = re.compile(r"^([0-9]+)-([0-9]+)$")
MAX_IDS = 100_000


def id_arguments(p):
    """The arguments of a command that takes several jobs: IDs (N, N-user),
    ranges of your own (N-M) and --sweep ID."""
    p.add_argument("job_id", nargs="*", help="N or N-user, or N-M: your jobs N to M")
    p.add_argument("--sweep", metavar="ID", action="append", default=[],
                   help="every job of the sweep whose first job is ID (its DQ_SWEEP)")


def sweep_jobs(cfg, job):
    """The IDs of the sweep `job` belongs to (sweep.json in its first job)."""
    first = job.spec.get("env", {}).get("DQ_SWEEP")
    if not first or not JOB_ID_RE.match(first) or "-" not in first:
        raise Failure(f"job {job.id} is not part of a sweep (submit one with dq-submit "
                      f"--grid or --each)")
    path = os.path.join(cfg.job_dir(first), "sweep.json")
    data = read_json(path, None, None, "its owner can name the jobs by range instead")
    ids = data.get("jobs") if isinstance(data, dict) else None
    if not is_id_list(ids):
        raise Failure(f"cannot read the list of sweep {first} ({path}); name its jobs by "
                      f"range instead (e.g. {first.split('-')[0]}-...)")
    return ids


def _find_job(cfg, arg, m):
    if m.group(2):
        job = load_job(cfg, arg)
    elif os.path.isdir(cfg.job_dir(f"{m.group(1)}-{me()}")):
        job = load_job(cfg, f"{m.group(1)}-{me()}")     # mostly one's own: no listing
    else:
        backend = cfg.p("jobs", "backend")
        try:
            names = [n for n in os.listdir(backend) if n.startswith(m.group(1) + "-")]
        except FileNotFoundError:
            names = []
        job = load_job(cfg, names[0]) if len(names) == 1 else None
        if len(names) > 1:
            raise Failure(f"job {arg} is ambiguous: {' '.join(sorted(names))}")
    return job


def resolve_job(cfg, arg):
    """'42' or '42-alice' -> Job, or Failure naming the problem: when the
    job's files are what is wrong, the warning about them is the error."""
    global _held
    m = JOB_ID_RE.match(arg or "")
    if not m:
        raise Failure(f"{arg!r} is not a job ID (expected N or N-user, e.g. 42 or 42-{me()})")
    _held = []
    try:
        job = _find_job(cfg, arg, m)
    finally:
        said, _held = _held, None
    if job is None:
        raise Failure(f"no job {arg}" + (f" that dq can use: {said[0]}" if said
                                         else " (see dq-jobs complete)"))
    for msg in said:
        warn(msg)
    return job


def ids_of(cfg, arg):
    """The full IDs an argument names: one job (N, N-user), or a range of
    the caller's own (N-M: those of them that exist)."""
    m = RANGE_RE.match(arg)
    if not m:
        return [resolve_job(cfg, arg).id]
    lo, hi = int(m.group(1)), int(m.group(2))
    if hi < lo or hi - lo >= MAX_IDS:
        raise Failure(f"{arg!r} is not a range of job numbers (e.g. 40-49, low to high, "
                      f"at most {MAX_IDS})")
    mine = [f"{n}-{me()}" for n in range(lo, hi + 1)
            if os.path.isdir(cfg.job_dir(f"{n}-{me()}"))]
    if not mine:
        raise Failure(f"you have no job numbered {lo} to {hi} (see dq-jobs complete)")
    return mine


def resolve_jobs(cfg, args):
    """The jobs named by id_arguments, each once, in order."""
    if not args.job_id and not args.sweep:
        raise Failure("name the jobs: IDs (42, 42-bob), ranges of yours (40-49) or "
                      "--sweep ID")
    ids = [i for arg in args.job_id for i in ids_of(cfg, arg)]
    for arg in args.sweep:
        ids += sweep_jobs(cfg, resolve_job(cfg, arg))
    seen, jobs = set(), []
    for job_id in ids:
        if job_id not in seen:
            seen.add(job_id)
            job = load_job(cfg, job_id)
            if job is None:
                raise Failure(f"no job {job_id} that dq can use")
            jobs.append(job)
    return jobs


def require_owner(job, verb):
    if job.owner != me():
        raise Failure(f"job {job.id} belongs to {job.owner}; you cannot {verb} it")


def full_id(cfg, text):
    """'42' -> '42-alice' (as resolve_job finds it), or the text as it is."""
    try:
        return resolve_job(cfg, text.strip()).id
    except Failure:
        return text.strip()


# Job index ###################################################################

def sorted_ids(names):
    """The job IDs among these file names, oldest (lowest number) first."""
    out = []
    for name in names:
        m = JOB_ID_RE.match(name)
        if m and m.group(2):
            out.append((int(m.group(1)), name))
    return [name for _, name in sorted(out)]


def index_names(cfg, index="active", user=None):
    """Names in jobs/<index> (active: queued and running jobs; cpu: those
    of them that need no GPU), oldest first; only `user`'s if given.  No
    I/O per entry: a pass looks at as few entries as its decisions need."""
    try:
        names = os.listdir(cfg.p("jobs", index))
    except FileNotFoundError:
        return []
    if user is not None:
        names = [n for n in names if n.endswith("-" + user)]
    return sorted_ids(names)


def owns_entry(path, job_id):
    """Is the index entry owned by the user its name says?"""
    try:
        return user_of_uid(os.stat(path).st_uid) == job_id.split("-", 1)[1]
    except OSError:
        return False


def active_ids(cfg, who=None):
    """Ids of queued and running jobs (of user `who`), oldest first, each
    checked to be owned by the user its name says."""
    active = cfg.p("jobs", "active")
    return [i for i in index_names(cfg, user=who) if owns_entry(os.path.join(active, i), i)]


def all_job_ids(cfg):
    try:
        return sorted_ids(os.listdir(cfg.p("jobs", "backend")))
    except FileNotFoundError:
        return []


# Ended jobs and usage counters ###############################################

def final_state(cfg, job_id):
    """How a job ended, following its requeues, retries and resumes (each
    run's end.json names the next in requeued_as) to the last run: (state
    or None while it has not ended, the job ID of that run)."""
    for _ in range(1000):
        end = read_json(os.path.join(cfg.job_dir(job_id), "end.json"), None, {}, skip_newer=True)
        if end is None:
            if not os.path.isdir(cfg.job_dir(job_id)):
                return "gone", job_id       # removed by hand: it will never end done
            return None, job_id
        state = end.get("state") if end.get("state") in END_STATES else "failed"
        after = end.get("requeued_as")
        if not (isinstance(after, str) and JOB_ID_RE.match(after)):
            return state, job_id
        job_id = after
    return "failed", job_id


COMPLETE_RECENT = 30    # ended jobs of yours that completion offers


def job_usage(job):
    """GPU-seconds a job used: its GPUs (a sharing job: its share of each)
    times how long it ran."""
    started, ended = job.run.get("started"), job.end.get("ended")
    if not is_time(started) or not is_time(ended):
        return 0.0
    return len(job.run.get("gpus") or []) * job.run.get("share", 1) * max(0.0, ended - started)


def decayed(counters, now, halflife):
    """A user's GPU-seconds as of now: each halves every `halflife` seconds
    (fairshare_halflife), so yesterday's big run counts less than today's."""
    age = max(0.0, now - counters["usage_at"])
    return counters["usage"] * 0.5 ** (age / halflife)


COUNTER_FIELDS = {
    "done": (is_int, "a count", True),
    "usage": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v) and v >= 0, "GPU-seconds, 0 or more", False),
    "usage_at": (is_time, "a time in seconds", False),
    "recent": (lambda v: is_id_list(v), "a list of job IDs", False)}


def stored_counters(cfg, user):
    """{done, usage, usage_at, recent} from jobs/done/<user>, or None
    (missing, or not to be trusted: then counted again).  recent: the IDs
    of the user's last ended jobs, newest first (shell completion).  A
    counter from before usage was kept starts its usage at 0."""
    path = cfg.p("jobs", "done", user)
    fix = "remove it, and dq counts the user's ended jobs again"
    data = read_json(path, None, fix=fix, skip_newer=True)
    if data is None or not owns_entry(path, "0-" + user):
        return None
    why = bad_field(data, COUNTER_FIELDS)
    if why:
        return bad_file(path, why, fix)
    return {"done": data["done"], "usage": data.get("usage", 0.0),
            "usage_at": data.get("usage_at", time.time()), "recent": data.get("recent", [])}


def user_counters(cfg, user):
    """How many of user's jobs have ended, and their decayed GPU-seconds:
    counters kept in jobs/done/<user> as they end, so neither `dq-jobs
    summary` nor a pass need list the whole history.  Missing or corrupt
    (delete it to recount): counted from the job directories once, and
    saved when it is the user's own."""
    counters = stored_counters(cfg, user)
    if counters is not None:
        return counters
    count, usage, now, last = 0, 0.0, time.time(), []
    reading = True      # newest first: once a job ended 30 half-lives ago, no more reads
    for job_id in reversed(all_job_ids(cfg)):
        if not job_id.endswith("-" + user) or \
                not os.path.exists(os.path.join(cfg.job_dir(job_id), "end.json")):
            continue
        count += 1
        if len(last) < COMPLETE_RECENT:
            last.append(job_id)
        job = load_job(cfg, job_id, quiet=True) if reading else None
        if job is not None:
            ended = job.end.get("ended") if is_time(job.end.get("ended")) else now
            reading = now - ended < 30 * cfg.fairshare_halflife
            usage += job_usage(job) * 0.5 ** (max(0.0, now - ended) / cfg.fairshare_halflife)
    counters = {"done": count, "usage": usage, "usage_at": now, "recent": last}
    if user == me():
        try:
            write_json(cfg.p("jobs", "done", user), counters)
        except OSError:
            pass
    return counters


# The history: jobs/done/<user>.history, one JSON line per ended job of
# the user (history_record), appended by whoever records the end (always
# the owner: its wrapper, its dq-kill, its pass) under the user's counter
# lock; lab-readable, for dq-report.  Lines follow each other in the order
# they were written (`logged`), so a report of the last days seeks to them
# (history_offset) instead of reading years.  Missing: rebuilt from the job
# directories (rebuild_history), like the counters.  It lives beside the
# counters, in jobs/done, so an upgraded install needs no new directory.
HISTORY = ".history"
HISTORY_FORMAT = 1
# How far out of order `logged` may be: hosts' clocks disagree a little,
# and a wrapper appends a moment after the end it records.
HISTORY_SLACK = 3600

def history_ok(rec):
    """Is a parsed history line one dq-report can use?  (By hand, not with
    bad_field: a report of a busy month checks ~10,000 lines.)"""
    num = (int, float)      # not bool: type(True) is bool
    try:
        return (rec["format"].__class__ is int and rec["format"] <= HISTORY_FORMAT
                and rec["id"].__class__ is str and "-" in rec["id"]
                and rec["state"] in END_STATES
                and rec["gpus"].__class__ is int and 0 <= rec["gpus"] <= MAX_GPUS
                and rec["ended"].__class__ in num and 0 <= rec["ended"] <= 1e12
                and rec["logged"].__class__ in num
                and all(rec.get(k) is None or (rec[k].__class__ in num and 0 <= rec[k] <= 1e12)
                        for k in ("started", "submitted"))
                and all(rec.get(k) is None or rec[k].__class__ is str for k in ("host", "gpu_type"))
                and rec.get("share", 1).__class__ in num and 0 < rec.get("share", 1) <= 1
                and rec.get("idle_gpu_s", 0).__class__ in num and rec.get("idle_gpu_s", 0) >= 0)
    except (KeyError, TypeError, AttributeError):
        return False


def history_path(cfg, user):
    return cfg.p("jobs", "done", user + HISTORY)


def history_record(job, logged=None):
    """The history's line for an ended job: what dq-report needs of it
    (history_ok checks it): format, id, state, host, gpus (a count), share
    (of each GPU, 1 unless DQ_MEM), gpu_type (or null), submitted, started
    (null: it never ran), ended, logged (when written), and its GPU use in
    short (gpu_use_summary: util_mean, util_peak, mem_mean_mib,
    mem_peak_mib, idle_gpu_s; absent without samples)."""
    end = job.end or {"state": "lost"}
    ended = end.get("ended") if is_time(end.get("ended")) else \
        job.lost_marker().get("ended") if is_time(job.lost_marker().get("ended")) else None
    started = job.run.get("started")
    ended = ended or started or job.spec.get("submitted") or time.time()
    use = gpu_use_summary(read_gpu_use(job.dir)) if job.run.get("gpus") else None
    share = job.run.get("share", 1)
    rec = {"format": HISTORY_FORMAT, "id": job.id, "state": job.state(),
           "host": job.run.get("host") or end.get("host"),
           "gpus": len(job.run.get("gpus") or []), "share": share,
           "gpu_type": job.run.get("gpu_type"), "submitted": job.spec.get("submitted"),
           "started": started, "ended": ended, "logged": logged or ended}
    if use:     # idle GPU-seconds, like GPU-hours, count a sharing job's share
        rec.update(use, idle_gpu_s=round(use["idle_gpu_s"] * share, 1))
        del rec["samples"]
    return rec


def history_line(rec):
    return json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"


def write_history(cfg, user, records):
    """The user's whole history, oldest line first (atomically, as write_json)."""
    write_atomically(history_path(cfg, user), lambda f: f.writelines(
        history_line(r) for r in sorted(records, key=lambda r: r["logged"])), durable=False)


def rebuild_history(cfg, user, save):
    """The user's history from their job directories (every one that has
    ended): once, when the file is missing; saved if `save` (the owner
    alone writes it)."""
    records = []
    for job_id in all_job_ids(cfg):
        if job_id.endswith("-" + user) and \
                os.path.exists(os.path.join(cfg.job_dir(job_id), "end.json")):
            job = load_job(cfg, job_id, quiet=True)
            if job is not None:
                records.append(history_record(job))
    if save:
        try:
            write_history(cfg, user, records)
        except OSError as e:
            warn(f"cannot write {history_path(cfg, user)}: {e.strerror}")
    return records


def history_offset(f, size, since):
    """A line start in an open history (binary) before which every line was
    logged before `since`: a binary search on `logged` (in write order, see
    HISTORY), reading ~log2(size) lines.  A line it cannot read sends it
    left (reading more, never less)."""
    lo, hi = 0, size        # lo: a line start, every line before it early
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()        # to the next line start
        start = f.tell()
        try:
            logged = json.loads(f.readline())["logged"]
            early = is_time(logged) and logged < since
        except (ValueError, KeyError, TypeError, RecursionError):
            early = False
        if early and start < hi:
            lo = start
        else:
            hi = mid
    return lo


def history_records(data, path, since=None, quiet=False):
    """The records in a piece of a history (bytes, whole lines) that ended
    from `since` on; a line that is not one of dq's is skipped, with one
    warning (unless `quiet`)."""
    lines = [line for line in data.splitlines() if line.strip()]
    try:        # all at once, in C; line by line only when one is broken
        parsed = json.loads(b"[" + b",".join(lines) + b"]")
    except (ValueError, RecursionError):
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except (ValueError, RecursionError):
                parsed.append(None)
    records, bad = [], 0
    for rec in parsed:
        if not history_ok(rec):
            bad += 1
        elif since is None or rec["ended"] >= since:
            records.append(rec)
    if bad and not quiet:
        warn(f"skipped {bad} line(s) of {path} that are not dq's history (or are of a newer "
             f"dq); remove the file and dq rebuilds it from the job directories")
    return records


def read_history(cfg, user, since=None):
    """The records of user's jobs that ended from `since` on (None: all),
    without reading the lines logged long before.  A line that is not one
    of dq's is skipped, one warning per file; a missing file is rebuilt
    from the job directories (and saved when it is the caller's own)."""
    path = history_path(cfg, user)
    if not os.path.exists(path):
        if user != me():
            records = rebuild_history(cfg, user, save=False)
        else:
            with Lock(cfg.p("jobs", "done", user + ".lock"), mode=0o644):
                records = None if os.path.exists(path) else rebuild_history(cfg, user, True)
        if records is not None:
            return [r for r in records if since is None or r["ended"] >= since]
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            if user_of_uid(st.st_uid) != user:     # its owner alone writes it
                warn(f"ignoring {path}: it belongs to {user_of_uid(st.st_uid)}, not {user}")
                return []
            if since is not None and size > 65536:
                f.seek(history_offset(f, size, since - HISTORY_SLACK))
            data = f.read()
    except OSError as e:
        warn(f"cannot read {path}: {e.strerror}; dq-report leaves {user}'s jobs out")
        return []
    return history_records(data, path, since)


def period_start(t, by):
    """The local midnight that starts t's day (by day) or week (Monday)."""
    tm = time.localtime(t)
    back = tm.tm_wday if by == "week" else 0
    return time.mktime((tm.tm_year, tm.tm_mon, tm.tm_mday - back, 0, 0, 0, 0, 0, -1))


def next_period(start, by):
    """The local midnight a day (or a week) after `start` (mktime counts
    the days, so a day with a clock change lasts its 23 or 25 hours)."""
    tm = time.localtime(start)
    days = 7 if by == "week" else 1
    return time.mktime((tm.tm_year, tm.tm_mon, tm.tm_mday + days, 0, 0, 0, 0, 0, -1))


REPORT_STATES = ("done", "failed", "killed", "lost", "timeout")


# Day summaries: jobs/done/<user>.days, so that a report of a month reads
# a few lines per user, not every job of the month.  Made from the whole
# history, from scratch, by its owner alone (append_history; the owner's
# dq-report) whenever the history has grown more than DAYS_TAIL bytes past
# what the summary covers (`through`): the lines after it (the tail) are
# read as records.  Lab-readable; safe to delete (dq-report then reads the
# records, and the owner's next job end or report makes it again).
#
# Line 1, the header: format, ino (the history's inode: a history written
# anew is another file), through (bytes of the history it covers), tz
# (days_tz: what local midnights depend on), index ([day, offset of its
# totals line, offset of its detail line], offsets from the end of the
# header).  Then two lines per local day that has any data, in day order:
#   totals: cumulative over every day up to and including this one, so a
#     window of whole days is the difference of two lines: day, n ([jobs,
#     then REPORT_STATES' counts] of the jobs that ended), gpu_s and idle_s
#     (split by the hours jobs ran on each day, as report_rows does), waits
#     ([[count of bucket 0, 1, ...], [sum of bucket 0, 1, ...]], see
#     wait_bucket: ~300 buckets for waits up to a day);
#   detail: the day alone, for a window that starts or ends inside it: day,
#     r0 ([jobs running, their GPUs, their idle GPUs] at its midnight), ev
#     (flat [s after midnight, then the same three, ...] after each start
#     or end, in time order), ends (flat [s after midnight, index in
#     REPORT_STATES or -1, wait or -1, ...] of the jobs that ended on it,
#     in time order), so a part of the day is found by bisection.
# Numbers are compact lists, not objects, and rounded (waits to the ms,
# starts and ends in ev to the ms, GPUs to 1e-6): they are what a report
# parses.  The ends' times are t - midnight, exact in floating point
# (Sterbenz), so a job ends inside a window by the summary exactly when
# it does by its record.
DAYS = ".days"
DAYS_FORMAT = 1
DAYS_TAIL = 65536       # ~200 lines: the most a report reads as records


def days_path(cfg, user):
    return cfg.p("jobs", "done", user + DAYS)


def days_tz():
    """What local midnights depend on: a summary made under another time
    zone is not used (its days are other days)."""
    return [time.timezone, time.altzone, list(time.tzname)]


def wait_bucket(wait):
    """A wait's bucket in a summary: 0 under 10 ms, then 16 per doubling
    (each 4.4% wide).  Each keeps count and sum: a percentile of summed
    days is good to a bucket, and exact where its waits are all equal."""
    return 0 if wait < 0.01 else 1 + int(16 * math.log2(wait / 0.01))


def day_summaries(records):
    """[(day, totals, detail)] of a history's records (see DAYS), the
    lines as dicts, in day order."""
    days = {}       # midnight -> [ends, events, gpu_s, idle_s, counts, waits]
    state_index = {s: i for i, s in enumerate(REPORT_STATES)}

    def of(t):
        day = period_start(t, "day")
        if day not in days:
            days[day] = [[], [], 0.0, 0.0, [0] * (1 + len(REPORT_STATES)), {}]
        return day, days[day]
    for r in records:
        ended, started, submitted = r["ended"], r.get("started"), r.get("submitted")
        day, d = of(ended)
        state = state_index.get(r["state"], -1)
        wait = -1
        if started is not None and submitted is not None:
            wait = max(0.0, started - submitted)
            bucket = d[5].setdefault(wait_bucket(wait), [0, 0.0])
            bucket[0] += 1
            bucket[1] += wait
        d[0].append((ended - day, state, round(wait, 3)))
        d[4][0] += 1
        if state >= 0:
            d[4][1 + state] += 1
        if started is None or not r["gpus"] or ended <= started:
            continue
        weight = r["gpus"] * r.get("share", 1)
        idle = min(r.get("idle_gpu_s", 0) / (ended - started), weight)
        for t, sign in ((started, 1), (ended, -1)):
            day, d = of(t)
            d[1].append((t - day, sign * weight, sign * idle))
        t = started
        while t < ended:
            day, d = of(t)
            stop = min(ended, next_period(day, "day"))
            d[2] += weight * (stop - t)
            d[3] += idle * (stop - t)
            t = stop
    out, running = [], [0, 0.0, 0.0]
    n, gpu_s, idle_s, waits = [0] * (1 + len(REPORT_STATES)), 0.0, 0.0, {}
    for day in sorted(days):
        ends, evs, day_gpu, day_idle, counts, day_waits = days[day]
        n = [a + b for a, b in zip(n, counts)]
        gpu_s += day_gpu
        idle_s += day_idle
        for b, (c, total) in day_waits.items():
            w = waits.setdefault(b, [0, 0.0])
            w[0] += c
            w[1] += total
        top = range(max(waits) + 1 if waits else 0)
        ev = []
        out.append((day, {"day": day, "n": n, "gpu_s": round(gpu_s, 3),
                          "idle_s": round(idle_s, 3),
                          "waits": [[waits[b][0] if b in waits else 0 for b in top],
                                    [round(waits[b][1], 3) if b in waits else 0 for b in top]]},
                    {"day": day, "r0": [running[0], round(running[1], 6), round(running[2], 6)],
                     "ev": ev, "ends": [x for e in sorted(ends) for x in e]}))
        for t, w, i in sorted(evs):
            running[0] += 1 if w > 0 else -1
            running[1] += w
            running[2] += i
            if running[0] <= 0:     # no drift from sums of +-0.3
                running = [0, 0.0, 0.0]
            ev += [round(t, 3), running[0], round(running[1], 6), round(running[2], 6)]
    return out


def write_days(cfg, user):
    """Summarize user's whole history into jobs/done/<user>.days (see
    DAYS), atomically; by its owner.  OSError if it cannot."""
    with open(history_path(cfg, user), "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    if user_of_uid(st.st_uid) != user:
        return
    through = data.rfind(b"\n") + 1     # whole lines: one being appended is tail
    lines, index, offset = [], [], 0
    for day, totals, detail in day_summaries(history_records(data[:through], None, quiet=True)):
        a, b = (json.dumps(x, separators=(",", ":")) + "\n" for x in (totals, detail))
        index.append([day, offset, offset + len(a)])    # ASCII: characters are bytes
        lines += [a, b]
        offset += len(a) + len(b)
    head = json.dumps({"format": DAYS_FORMAT, "ino": st.st_ino, "through": through,
                       "tz": days_tz(), "index": index}, separators=(",", ":")) + "\n"
    write_atomically(days_path(cfg, user), lambda f: f.writelines([head] + lines),
                     durable=False)


def open_days(cfg, user, history_st):
    """(open file, header) of user's summary if it is one to use with the
    history whose os.stat is history_st, else None: written by the user,
    of this format, of this history file (inode), covering no more than
    it holds (a truncated history is another), under this time zone."""
    try:
        f = open(days_path(cfg, user), "rb")
    except OSError:
        return None
    try:
        if user_of_uid(os.fstat(f.fileno()).st_uid) == user:
            head = json.loads(f.readline())
            through = head["through"]
            if (head["format"] == DAYS_FORMAT and head["ino"] == history_st.st_ino
                    and through.__class__ is int and 0 <= through <= history_st.st_size
                    and head["tz"] == days_tz() and head["index"].__class__ is list):
                return f, head
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        pass
    f.close()
    return None


def refresh_days(cfg, user):
    """Make user's summary anew (the owner alone calls this) when the
    history holds more than DAYS_TAIL bytes it does not cover.  Never
    fails: without a summary dq-report reads the records, only slower."""
    try:
        st = os.stat(history_path(cfg, user))
        if st.st_size <= DAYS_TAIL:
            return
        opened = open_days(cfg, user, st)
        if opened is not None:
            opened[0].close()
            if st.st_size - opened[1]["through"] <= DAYS_TAIL:
                return
        write_days(cfg, user)
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        pass


def append_history(cfg, job):
    """Add an ended job to its owner's history (under the counter lock);
    a missing history is rebuilt, this job with it.  Then the day summary
    (DAYS) is made anew if the history has outgrown it."""
    path = history_path(cfg, job.owner)
    if not os.path.exists(path):
        rebuild_history(cfg, job.owner, save=True)
        refresh_days(cfg, job.owner)
        return
    data = history_line(history_record(job, time.time())).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)        # one write: one line
        except OSError:
            written = None
        if written != len(data):    # a full disk: no torn line is left behind
            os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        os.close(fd)
    refresh_days(cfg, job.owner)


def count_done(cfg, job):
    """Count an ended job in its owner's counters (jobs/done/<user>): how
    many ended, and their GPU-seconds for fair share; and add it to the
    owner's history (dq-report)."""
    try:
        with Lock(cfg.p("jobs", "done", job.owner + ".lock"), mode=0o644):
            try:
                append_history(cfg, job)
            except OSError as e:
                warn(f"cannot add {job.id} to {history_path(cfg, job.owner)}: "
                     f"{e.strerror}; remove the file and dq rebuilds it")
            counters = stored_counters(cfg, job.owner)
            if counters is None:
                user_counters(cfg, job.owner)   # counts this job too, and saves
            else:
                now = time.time()
                write_json(cfg.p("jobs", "done", job.owner), {
                    "done": counters["done"] + 1,
                    "usage": decayed(counters, now, cfg.fairshare_halflife) + job_usage(job),
                    "usage_at": now,
                    "recent": ([job.id] + [i for i in counters["recent"]
                                           if i != job.id])[:COMPLETE_RECENT]})
    except (OSError, Failure) as e:
        warn(f"cannot count {job.id} as completed: {e}")


def record_end(cfg, job, state, reason=None, exit_code=None, sig=None, host=None,
               durable=True, requeued_as=None, ended=None):
    """Write end.json once and count the job as completed; False if the job
    already had an end.  durable=False (the wrapper, in a hurry to hand the
    GPUs over): the caller fsyncs end.json and counts the job later, with
    finish_end.  requeued_as: the job that runs it again (DQ_REQUEUE,
    DQ_RETRY, DQ_RESUME), which dependencies and dq-wait follow."""
    data = {"state": state, "reason": reason, "exit_code": exit_code,
            "signal": sig, "ended": ended or time.time(), "host": host or job.run.get("host")}
    if requeued_as:
        data["requeued_as"] = requeued_as
    try:
        write_json(os.path.join(job.dir, "end.json"), data, exclusive=True, durable=durable)
    except FileExistsError:
        return False
    job._end = None
    if durable:
        count_done(cfg, job)
    return True


def finish_end(cfg, job):
    """What record_end(durable=False) left for later."""
    sync_file(os.path.join(job.dir, "end.json"))
    count_done(cfg, job)


def done_count(cfg, user):
    return user_counters(cfg, user)["done"]


# Submit-time variables #######################################################

def check_script(path):
    if not os.path.exists(path):
        raise Failure(f"{path}: no such file")
    if os.path.isdir(path):
        raise Failure(f"{path} is a directory, not a script")
    if not os.access(path, os.R_OK):
        raise Failure(f"{path} is not readable")
    if not os.access(path, os.X_OK):
        raise Failure(f"{path} is not executable; run 'chmod +x {path}' (and give it a "
                      f"#! line)")
    return os.path.abspath(path)


def submit_cwd():
    """The working directory as the user sees it ($PWD keeps symlinked or
    automounted paths such as /deep/u/avati) when it is the same directory."""
    try:
        cwd = os.getcwd()
    except OSError as e:
        raise Failure(f"cannot tell the current directory ({e.strerror}): it was probably "
                      f"deleted; cd to the job's directory again and resubmit")
    pwd_env = os.environ.get("PWD")
    try:
        if pwd_env and os.path.samefile(pwd_env, cwd):
            return pwd_env
    except OSError:
        pass
    return cwd


def wanted_gpus(env):
    raw = env.get("DQ_GPUS", "1").strip()
    want = whole_number(raw, 0, MAX_GPUS)
    if want is None:
        raise Failure(f"DQ_GPUS={raw!r} is not a number of GPUs from 0 to {MAX_GPUS} "
                      f"(0 for a CPU-only job), e.g. DQ_GPUS=2")
    return want


def job_priority(env):
    """DQ_PRIORITY: a whole number, higher first, among the owner's own jobs."""
    raw = env.get("DQ_PRIORITY", "").strip()
    if not raw:
        return 0
    priority = whole_number(raw, -MAX_PRIORITY, MAX_PRIORITY, signed=True)
    if priority is None:
        raise Failure(f"DQ_PRIORITY={raw!r} is not a whole number from -{MAX_PRIORITY} to "
                      f"{MAX_PRIORITY}; e.g. DQ_PRIORITY=10 (higher goes first among your "
                      f"own jobs)")
    return priority


def job_dependencies(cfg, env):
    """DQ_AFTER / DQ_AFTER_ANY: job IDs (N or N-user, anyone's) and ranges
    of the submitter's own (N-M), each of existing jobs -> (after,
    after_any) as full IDs."""
    out = []
    for var in ("DQ_AFTER", "DQ_AFTER_ANY"):
        ids = []
        for item in env.get(var, "").split(","):
            if not item.strip():
                continue
            try:
                for job_id in ids_of(cfg, item.strip()):
                    if load_job(cfg, job_id) is None:
                        raise Failure(f"no job {job_id} that dq can use")
                    ids.append(job_id)
            except Failure as e:
                raise Failure(f"{var}={env[var]!r}: {e}; give IDs of existing jobs, e.g. "
                              f"{var}=42,43-{me()}") from None
        out.append(sorted(set(ids), key=lambda i: int(i.split("-")[0])))
    return tuple(out)


def job_time_limit(cfg, env):
    """Seconds the job may run (DQ_TIME, else time_limit), or None;
    refused above max_time."""
    raw = env.get("DQ_TIME", "").strip()
    limit = duration("DQ_TIME", raw, "DQ_TIME") if raw else cfg.time_limit
    if limit and cfg.max_time and limit > cfg.max_time:
        raise Failure(f"DQ_TIME={raw} is above this cluster's max_time of "
                      f"{fmt_duration(cfg.max_time)}; ask for less")
    return limit


# DQ_SIGNAL=SIG@TIME: the job's warning.  Its wrapper sends SIG to the
# job's processes TIME before its time limit (TimeLimit), and at once on a
# `dq-kill --grace` (then TERM when the grace runs out), so that the job can
# save a checkpoint and exit.  KILL and STOP cannot be trapped: a warning
# the job cannot act on is refused at submit.
SIGNAL_EXAMPLE = "DQ_SIGNAL=USR1@10m (SIGUSR1 10 minutes before the job's time limit)"
UNTRAPPABLE = ("SIGKILL", "SIGSTOP")


def parse_signal(raw):
    """'USR1@10m', 'SIGUSR2@90s', 'TERM@30' -> (signal.Signals, seconds
    before the time limit); 'USR1' alone -> (SIGUSR1, None): no warning
    before the limit, only on dq-kill --grace."""
    name, at, when = raw.strip().partition("@")
    name = name.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        sig = signal.Signals[name]
    except KeyError:
        raise Failure(f"DQ_SIGNAL={raw!r}: {name[3:] or '(none)'} is not a signal; e.g. "
                      f"{SIGNAL_EXAMPLE}") from None
    if sig.name in UNTRAPPABLE:
        raise Failure(f"DQ_SIGNAL={raw!r}: {sig.name} cannot be trapped, so the job could "
                      f"not act on it; e.g. {SIGNAL_EXAMPLE}")
    if not at:
        return sig, None
    try:
        lead = duration("DQ_SIGNAL", when, "DQ_SIGNAL")
    except Failure:
        raise Failure(f"DQ_SIGNAL={raw!r}: {when.strip()!r} is not a time above 0 (90s, 10m, "
                      f"1h30m); e.g. {SIGNAL_EXAMPLE}") from None
    return sig, lead


def job_signal(env, limit):
    """DQ_SIGNAL, checked against the job's time limit (seconds or None):
    (signal, lead or None), or None without one.  A warning TIME before
    the limit that comes before the job starts is refused."""
    raw = env.get("DQ_SIGNAL", "").strip()
    if not raw:
        return None
    sig, lead = parse_signal(raw)
    if lead and limit and lead >= limit:
        raise Failure(f"DQ_SIGNAL={raw!r}: {fmt_duration(lead)} before the job's time limit "
                      f"of {fmt_duration(limit)} is before it starts; give a shorter time, "
                      f"e.g. DQ_SIGNAL={sig.name[3:]}@{fmt_duration(max(1, limit // 10))}")
    return sig, lead


def warning_signal(spec):
    """A job's DQ_SIGNAL as its wrapper takes it (job.json's env and time
    limit): (signal, lead or None), or None -- also for one that dq-submit
    did not check (a job submitted before it did)."""
    try:
        return job_signal(spec.get("env", {}), spec.get("time_limit"))
    except Failure:
        return None


# When a job ends, after its end is recorded and its GPUs handed over (the
# wrapper, or a detached `_notify` for jobs that end without one: lost,
# cancelled): DQ_MAIL sends a mail (one summary for a sweep, when its last
# job ends), and the owner's ~/.config/dq/on-end hook gets the job's JSON.
# Each with a timeout; what went wrong is kept in the job's notify.json and
# shown by dq-jobs.  Nothing here can delay a job's start or lose its end.
MAIL_ON = ("always", "fail")


def mail_address(cfg, env, user):
    """DQ_MAIL: an address, or 1 for the user's own (user@mail_domain)."""
    raw = env.get("DQ_MAIL", "").strip()
    if not raw:
        return None
    if raw == "1":
        if not cfg.mail_domain:
            raise Failure(f"DQ_MAIL=1 means {user}@ the lab's mail domain, but {cfg.path} has "
                          f"no 'mail_domain'; give your address (DQ_MAIL={user}@example.org) "
                          f"or ask the admin to set it")
        return f"{user}@{cfg.mail_domain}"
    if not re.fullmatch(r"[^@\s,<>]+@[^@\s,<>]+", raw):
        raise Failure(f"DQ_MAIL={raw!r} is not a mail address; e.g. DQ_MAIL={user}@example.org, "
                      f"or DQ_MAIL=1 for your own")
    return raw


def mail_on(env):
    raw = env.get("DQ_MAIL_ON", "always").strip().lower() or "always"
    if raw not in MAIL_ON:
        raise Failure(f"DQ_MAIL_ON={raw!r}: say 'fail' (mail only for jobs that did not end "
                      f"done) or 'always'")
    return raw


def env_count(env, var, what, example):
    """A DQ_* count (0 if unset): a whole number from 0 to 1000."""
    raw = env.get(var, "").strip()
    if not raw:
        return 0
    count = whole_number(raw, 0, 1000)
    if count is None:
        raise Failure(f"{var}={raw!r} is not a number of {what} from 0 to 1000; e.g. {example}")
    return count


def retry_limit(env):
    """DQ_RETRY: how many times a failed job runs again."""
    return env_count(env, "DQ_RETRY", "retries",
                     "DQ_RETRY=3 (a failed job runs up to 3 more times)")


def requeue_limit(env):
    """DQ_REQUEUE: how many times a lost job is queued again."""
    return env_count(env, "DQ_REQUEUE", "requeues",
                     "DQ_REQUEUE=1 (a lost job is queued again up to once)")


# Exit status 75 (EX_TEMPFAIL in sysexits.h): "I saved a checkpoint, run
# me again".  DQ_RESUME=N queues such a job again, up to N times.
RESUME_EXIT = 75


def resume_limit(env):
    """DQ_RESUME: how many times a job that exits 75 runs again (0: unset)."""
    raw = env.get("DQ_RESUME", "").strip()
    if not raw:
        return 0
    count = whole_number(raw, 1, 1000)
    if count is None:
        raise Failure(f"DQ_RESUME={raw!r} is not a number of resumes from 1 to 1000; e.g. "
                      f"DQ_RESUME=10 (a job that exits {RESUME_EXIT} after saving a "
                      f"checkpoint runs up to 10 more times)")
    return count


def snapshot_wanted(env):
    """DQ_SNAPSHOT: 1 (run the job from a copy of its directory taken at
    submit), 0 or unset (from the directory itself)."""
    raw = env.get("DQ_SNAPSHOT", "").strip()
    if raw not in ("", "0", "1"):
        raise Failure(f"DQ_SNAPSHOT={raw!r}: say DQ_SNAPSHOT=1 (run the job from a copy of "
                      f"the directory's files taken now) or 0 (from the directory itself)")
    return raw == "1"


# Queue (jobs/queue/<user>/) ##################################################

# Each user's queue, in the order the passes take it: jobs/queue/<user>/, a
# directory of the user's own (no one else can add to it or reorder it),
# holds one empty file per queued job, whose name says all a pass needs to
# order and skip it without opening anything:
#     <number>_<gpus>_<shape>_<priority>_<top>_<submitted>[_h][w]
# shape: a hash of the job's constraints ('-': none; need_shape);
# submitted: whole seconds, rounded up (names of an older dq lack it: the
# owner's next pass renames them); _h: held, _w: waiting for its
# dependencies (_hw: both).  A pass lists these directories, not the whole
# queue, and reads one jobs/active entry per shape (its constraints), then
# the entries of the jobs it placed, to check they are still queued.
# The jobs/active entries stay the record (listings read them); the names
# are derived from them, so the owner rebuilds a lost directory from them.
QUEUE_NAME_RE = re.compile(r"^([0-9]+)_([0-9]+)_(-|[0-9a-f]{12})_(-?[0-9]+)_([0-9]+)"
                           r"(?:_([0-9]+))?(_h?w?)?$")


def queue_name(job_id, info):
    """The queue file name of a job from its jobs/active entry."""
    submitted = info.get("submitted")
    return (f"{job_id.split('-', 1)[0]}_{info['gpus']}_{need_shape(info.get('need'))}_"
            f"{info.get('priority', 0)}_{info.get('top', 0)}" +
            (f"_{math.ceil(submitted)}" if submitted is not None else "") +
            ("_" + "h" * bool(info.get("held")) + "w" * bool(info.get("waiting"))
             if info.get("held") or info.get("waiting") else ""))


def read_entry(cfg, job_id, stale=None):
    """A job's jobs/active entry, if it is still queued or running and the
    entry can be trusted; else None.  Entries of jobs that ended or were
    lost go to `stale`.  A bad entry keeps its job out of the queue (with
    a warning at each pass), never the others."""
    path = cfg.p("jobs", "active", job_id)
    if not owns_entry(path, job_id):
        return None
    fix = f"its owner can dq-kill {job_id} and dq-restart it"
    info = read_json(path, None, False, fix, skip_newer=True)
    if info is None:
        return None
    if os.path.exists(os.path.join(cfg.job_dir(job_id), "end.json")) or \
            os.path.exists(cfg.p("jobs", "lost", job_id)):
        if stale is not None:
            stale.append(job_id)
        return None
    if info is False:
        return None         # read_json said why
    why = bad_field(info, INDEX_FIELDS)
    if why:
        bad_file(path, why, fix)
        return None
    return info


def queued_entry(cfg, places, job_id):
    """The entry of a job a pass may place (queued, not placed, neither
    held nor waiting), or None."""
    if job_id in places:
        return None
    info = read_entry(cfg, job_id)
    return None if info is None or info.get("held") or info.get("waiting") else info


def read_queue(cfg, places, stale=None, user=None):
    """Yield the IDs of jobs (of `user`) a pass may place, oldest first,
    reading each entry only when asked for it."""
    for job_id in index_names(cfg, "active", user):
        info = None if job_id in places else read_entry(cfg, job_id, stale)
        if info is not None and not info.get("held") and not info.get("waiting"):
            yield job_id


def user_queue_names(cfg, user):
    """The names in the user's queue directory, or None when it is missing
    or not the user's own (then the entries are read instead)."""
    path = cfg.p("jobs", "queue", user)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        if user_of_uid(os.fstat(fd).st_uid) != user:
            warn(f"ignoring {path}: it belongs to {user_of_uid(os.fstat(fd).st_uid)}, not "
                 f"{user}; ask the admin of {cfg.root} to remove it")
            return None
        return os.listdir(fd)
    finally:
        os.close(fd)


def user_queue(cfg, skip, user, everything=False, waits_on=None, needs=None):
    """The user's queued jobs as the planner takes them: (a UserQueue of
    their GPU jobs in their order, [their CPU-only jobs]), each a Queued.
    From the names in their queue directory, reading one entry per shape
    not in `needs` ({shape: its constraints}, shared between users: a
    shape is a hash of the constraints); without a usable directory, from
    their entries.  skip: jobs to leave out (the placed ones); everything:
    held, waiting and placed jobs too, for the listings' reasons
    (waits_on: {job_id: the job it waits for})."""
    waits_on = waits_on or {}
    needs = {"-": None} if needs is None else needs
    skip = () if everything else skip
    names = user_queue_names(cfg, user)
    groups, cpu = {}, []
    if names is None:       # no usable directory: read the entries
        for job_id in index_names(cfg, user=user):
            info = None if job_id in skip else read_entry(cfg, job_id)
            if info is None or not everything and (info.get("held") or info.get("waiting")):
                continue
            key = order_key(int(job_id.split("-")[0]), info.get("priority", 0),
                            info.get("top", 0))
            item = Queued(job_id, info["gpus"], info.get("need"), info.get("submitted"), key,
                          held=bool(info.get("held")), waiting=bool(info.get("waiting")),
                          waits_on=waits_on.get(job_id))
            if item.gpus:
                groups.setdefault((item.gpus, item.shape), []).append((key, item))
            else:
                cpu.append(item)
        return UserQueue(groups, lambda item, group: item), cpu
    suffix = "-" + user
    for name in names:
        m = QUEUE_NAME_RE.match(name)
        if not m or m.group(7) and not everything:
            continue        # held or waiting, or not one of dq's names
        number, gpus, shape, priority, top = m.groups()[:5]
        if number + suffix in skip:
            continue
        groups.setdefault((int(gpus), shape), []).append(
            (order_key(int(number), int(priority), int(top)), m))
    for (_, shape), entries in groups.items():
        for _, m in entries if shape not in needs else ():    # any of them says it
            info = read_entry(cfg, m.group(1) + suffix)
            if info is not None and need_shape(info.get("need")) == shape:
                needs[shape] = info.get("need")
                break
        # (a shape none of whose entries can be read places nothing)

    def make(m, group):
        job_id, submitted, flags = m.group(1) + suffix, m.group(6), m.group(7) or ""
        return Queued(job_id, group[0], needs[group[1]], submitted and int(submitted), None,
                      group[1], held="h" in flags, waiting="w" in flags,
                      waits_on=waits_on.get(job_id))
    cpu = [make(payload, group) for group, entries in groups.items()
           if group[0] == 0 and group[1] in needs for _, payload in entries]
    return UserQueue({g: e for g, e in groups.items() if g[0] and g[1] in needs}, make), cpu


def read_queues(cfg, skip, everything=False, waits_on=None):
    """Every user's queue for the planner: ({user: UserQueue of their GPU
    jobs}, [CPU-only jobs of all, oldest first]).  One directory listed
    per user, one entry read per shape of constraints; see user_queue."""
    try:
        users = os.listdir(cfg.p("jobs", "queue"))
    except FileNotFoundError:
        users = []
    gpu, cpu, needs = {}, [], {"-": None}
    for user in users:
        if is_user_name(user):
            gpu[user], theirs = user_queue(cfg, skip, user, everything, waits_on, needs)
            cpu += theirs
    cpu.sort(key=lambda item: int(item.job_id.split("-", 1)[0]))
    return gpu, cpu


def rebuild_own_queue(cfg):
    """Make the caller's queue directory if it is missing (a new user, an
    install from before it existed, or removed by hand), from their
    jobs/active entries: built aside, then renamed into place, so that a
    pass sees all of it or none."""
    user = me()
    final = cfg.p("jobs", "queue", user)
    if os.path.isdir(final):
        return
    import tempfile
    try:
        os.makedirs(cfg.p("jobs", "queue"), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{user}-", dir=cfg.p("jobs", "queue"))
        os.chmod(tmp, 0o755)
        for job_id in index_names(cfg, user=user):
            info = read_json(cfg.p("jobs", "active", job_id), None, None, skip_newer=True)
            if info and not bad_field(info, INDEX_FIELDS):
                open(os.path.join(tmp, queue_name(job_id, info)), "w").close()
        try:
            os.rename(tmp, final)
        except OSError:         # another command of ours made it meanwhile
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        warn(f"cannot make {final}: {e.strerror}; your jobs are taken in submission "
             f"order meanwhile")


def set_queue_name(cfg, job_id, info, new=False):
    """Put the job's queue file in line with its entry (info; None: the job
    left the queue; new: a job just created, with no file yet).  The
    owner's only; a failure costs order, not jobs."""
    user = job_id.split("-", 1)[1]
    path = cfg.p("jobs", "queue", user)
    prefix = job_id.split("-", 1)[0] + "_"
    try:
        old = [] if new else [n for n in os.listdir(path) if n.startswith(prefix)]
    except OSError:
        return
    new = queue_name(job_id, info) if info else None
    try:
        if new and new not in old:
            open(os.path.join(path, new), "w").close()
        for name in old:
            if name != new:
                os.unlink(os.path.join(path, name))
    except OSError as e:
        if e.errno != errno.ENOENT:
            warn(f"cannot update {path}: {e.strerror}")


def sync_own_queue(cfg):
    """Put the caller's queue directory in line with their jobs/active
    entries (each pass of theirs): a name missing (a crash between the two
    writes, a full disk) is added, one whose job left the queue a while ago
    removed, one of an older dq renamed.  Reads only the entries that
    disagree."""
    rebuild_own_queue(cfg)
    user = me()
    names = user_queue_names(cfg, user)
    if names is None:
        return
    have, renamed = {}, []
    for name in names:
        m = QUEUE_NAME_RE.match(name)
        if m:
            have[m.group(1) + "-" + user] = name
            if m.group(6) is None:      # an older dq's name, without the submit time
                renamed.append(m.group(1) + "-" + user)
    active = set(index_names(cfg, user=user))
    for job_id in sorted(active - set(have)) + [j for j in renamed if j in active]:
        if not owns_entry(cfg.p("jobs", "active", job_id), job_id):
            continue
        info = read_json(cfg.p("jobs", "active", job_id), None, None, skip_newer=True)
        if info and not bad_field(info, INDEX_FIELDS):
            set_queue_name(cfg, job_id, info)
    for job_id in set(have) - active:
        path = cfg.p("jobs", "queue", user, have[job_id])
        try:
            if time.time() - os.stat(path).st_mtime > 60:   # not a submit under way
                os.unlink(path)
        except OSError:
            pass


def rewrite_entry(cfg, job_id, info):
    """The owner changes a queued job's jobs/active entry (held, dq-top,
    released from its dependencies): the entry, then its queue name."""
    info = {k: v for k, v in info.items() if k != "format"}
    write_json(cfg.p("jobs", "active", job_id), info)
    set_queue_name(cfg, job_id, info)


def drop_from_index(cfg, job_id):
    if job_id.endswith("-" + me()):
        set_queue_name(cfg, job_id, None)
    for index in ("active", "cpu"):
        try:
            os.unlink(cfg.p("jobs", index, job_id))
        except FileNotFoundError:
            pass


# Snapshots (DQ_SNAPSHOT) #####################################################

# DQ_SNAPSHOT=1: the job runs from a copy of its directory taken at submit,
# so that edits made after dq-submit do not reach it while it waits.  In a
# git repository the copy holds what git knows of (`git ls-files -cmo
# --exclude-standard`: tracked files as they are now, and new ones it does
# not ignore), from the repository's top, so that the job's relative paths
# (../data, a sibling package) reach the same files; outside one, the
# submit directory's whole tree.  Regular files and symlinks only (no
# FIFOs or devices), with their modes.  The copy lies in the directory of
# the job that took it (jobs/backend/<id>/snapshot): a sweep's jobs, a
# job's retries and resumes, and dq-restart all run from that one copy (a
# resumed run finds there the checkpoint its last run wrote).

SNAPSHOT_GIT_TIMEOUT = 60       # seconds git may take to list a big repository


def git_files(cwd):
    """(top, its files as relative paths) of the git repository holding
    cwd, or None: not in one (or no git to ask)."""
    import subprocess

    def git(*args):
        return subprocess.run(("git",) + args, cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=SNAPSHOT_GIT_TIMEOUT)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or not top.stdout.strip():
            return None
        top = os.fsdecode(top.stdout.rstrip(b"\n"))
        listed = git("-C", top, "ls-files", "-z", "-cmo", "--exclude-standard")
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        raise Failure(f"DQ_SNAPSHOT: git took over {SNAPSHOT_GIT_TIMEOUT}s to list the files "
                      f"of the repository holding {cwd}; submit without DQ_SNAPSHOT") from None
    if listed.returncode != 0:
        why = (listed.stderr.decode("utf-8", "replace").strip().splitlines() or ["?"])[-1]
        raise Failure(f"DQ_SNAPSHOT: 'git ls-files' failed in {top}: {why}")
    # (-m lists a modified file a second time)
    return top, sorted({os.fsdecode(p) for p in listed.stdout.split(b"\0") if p})


def tree_files(top, skip=(), avoid=None):
    """Every file under top (relative paths, a symlink to a directory as a
    link), leaving out directories named in `skip` and the directory
    `avoid` (a path under top)."""
    out = []

    def cannot(e):
        raise Failure(f"DQ_SNAPSHOT: cannot read {e.filename}: {e.strerror}")
    for d, dirs, files in os.walk(top, onerror=cannot):
        dirs[:] = sorted(x for x in dirs if x not in skip and os.path.join(d, x) != avoid)
        links = [x for x in dirs if os.path.islink(os.path.join(d, x))]
        out += [os.path.relpath(os.path.join(d, x), top) for x in sorted(files) + links]
    return out


def relative_inside(path, top):
    """path relative to top (both resolved), or None if it lies outside."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(top))
    return None if rel == ".." or rel.startswith("../") else rel


class SnapshotPlan:
    """What a snapshot copies, listed and sized at submit, before any job
    is written (so a snapshot over snapshot_max queues nothing); `take`
    copies it once the job's directory exists."""

    def __init__(self, cfg, cwd, script):
        import stat
        found = git_files(cwd)
        self.git = found is not None
        self.top, names = found if found else (cwd, None)
        # Never the data root itself, should it lie in the tree
        root = relative_inside(cfg.root, self.top)
        if names is None:
            names = tree_files(cwd, avoid=os.path.join(cwd, root) if root else None)
        elif root:
            names = [n for n in names if n != root and not n.startswith(root + "/")]
        self.cwd = relative_inside(cwd, self.top) or "."
        script_dir = relative_inside(os.path.dirname(script), self.top)
        self.script = None if script_dir is None else \
            os.path.normpath(os.path.join(script_dir, os.path.basename(script)))
        if self.script and self.script not in names:
            names.append(self.script)       # the job's own script, even if git ignores it
        self.entries, self.files, self.bytes = [], 0, 0
        while names:
            rel = names.pop()
            path = os.path.join(self.top, rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue        # deleted, still in git's index
            except OSError as e:
                raise Failure(f"DQ_SNAPSHOT: cannot read {path}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):    # a git submodule: its files
                names += [os.path.join(rel, x) for x in tree_files(path, skip=(".git",))]
                continue
            if stat.S_ISREG(st.st_mode) and not os.access(path, os.R_OK):
                raise Failure(f"DQ_SNAPSHOT: cannot read {path}: permission denied; make it "
                              f"readable, or leave it out of the directory")
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                self.entries.append(rel)
                self.files += 1
                self.bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0
        self.entries.sort()
        if self.bytes > cfg.snapshot_max:
            raise Failure(
                f"DQ_SNAPSHOT: the snapshot of {self.top} would be {fmt_bytes(self.bytes)} "
                f"({self.files:,} files), over snapshot_max ({fmt_bytes(cfg.snapshot_max)}, "
                f"in {cfg.path}); " +
                ("keep big files out of git (.gitignore them)" if self.git else
                 "submit from a smaller directory") + ", or submit without DQ_SNAPSHOT")

    def take(self, cfg, job_id):
        """Copy the files into job_id's directory (as the submitting user:
        it is their job directory), under a temporary name renamed once
        complete: a snapshot is never half there.  Returns job.json's
        `snapshot`.  Copying that fails on the data root's side raises
        OSError (a full disk), on the source's a Failure naming the file."""
        import shutil
        job_dir = cfg.job_dir(job_id)
        tmp, final = os.path.join(job_dir, ".snapshot.tmp"), os.path.join(job_dir, "snapshot")
        os.mkdir(tmp, 0o755)
        files = size = 0
        made = {tmp}
        for rel in self.entries:
            src, dst = os.path.join(self.top, rel), os.path.join(tmp, rel)
            parent = os.path.dirname(dst)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            try:
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                else:       # its contents, mode (the executable bits) and times
                    shutil.copy2(src, dst, follow_symlinks=False)
                    size += os.lstat(dst).st_size
                files += 1
            except FileNotFoundError as e:
                if e.filename == src:
                    continue        # removed since it was listed
                raise
            except (OSError, shutil.Error) as e:
                if isinstance(e, OSError) and (e.errno in SPACE_ERRORS or
                                               str(e.filename or "").startswith(tmp)):
                    raise
                raise Failure(f"DQ_SNAPSHOT: cannot copy {src}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        os.makedirs(os.path.join(tmp, self.cwd), exist_ok=True)    # (if no file lies in it)
        os.sync()       # all of it on disk before it counts as there
        os.rename(tmp, final)
        return {"job": job_id, "top": self.top, "cwd": self.cwd, "script": self.script,
                "files": files, "bytes": size, "git": self.git}


# Slurm back end ##############################################################

# backend = slurm in dq.conf: Slurm decides where and when jobs run, and
# dq stays the front end.  dq-submit writes the job as always (job.json, its
# jobs/active entry), then hands it to sbatch (submit_to_slurm): the batch
# step, on the node Slurm chose, runs `dq.py _slurm JOB` (cmd__slurm), which
# runs dq's own wrapper (`_run`, as in a screen session of the ssh back end)
# in a screen session, so the log, run.json, end.json, dq-tail, dq-attach,
# DQ_SIGNAL/DQ_TIME to the second, DQ_RETRY/DQ_RESUME, mail and hooks are
# what they are with ssh.  The job's Slurm ID is in its slurm.json.
#
# What Slurm does instead of dq: placement, fair share, limits, priorities
# (dq's planner, dq-schedule's passes and placements.json are not used).
# Each DQ_* variable is one entry of SLURM_VARS: the sbatch options that
# honour it, or a Failure saying why Slurm cannot (refused at submit, never
# dropped).  Queued jobs' reasons come from squeue (SLURM_REASONS).  A job
# Slurm dropped without dq's wrapper recording its end (cancelled by an
# admin, its DQ_AFTER job failed, its node died) is found by its owner's
# dq-jobs, dq-wait or dq-schedule (slurm_reconcile) and recorded.
#
# Every Slurm command runs through run_scripts (a /bin/sh here, with
# cfg.timeout and the --debug echo), with SLURM_CONF from dq.conf's
# slurm_conf when it is set.  dq reads Slurm's stable text forms
# (--parsable, -o formats), never --json (its shape changes by release).
SLURM_FILE = "slurm.json"   # in the job's directory: {"format", "id": "123" or "123_4"}
SLURM_ARRAY = "slurm-array.json"    # a job array's first job: {"jobs": [its dq IDs]}
# Slurm counts time limits in whole minutes and enforces them on a ~30 s
# tick; dq's wrapper enforces DQ_TIME (and DQ_SIGNAL's warning) to the
# second itself, and Slurm's limit, this much later, is only the backstop.
SLURM_TIME_SLACK = 60


def slurm_id(cfg, job_id):
    """The Slurm ID of a dq job (slurm.json), or None."""
    data = read_json(os.path.join(cfg.job_dir(job_id), SLURM_FILE), None, None)
    sid = data.get("id") if isinstance(data, dict) else None
    return sid if isinstance(sid, str) and re.fullmatch(r"[0-9]+(_[0-9]+)?", sid) else None


def slurm_hosts_args(var, patterns, nodes, exclude):
    """DQ_HOSTS / DQ_EXCLUDE with dq's patterns matched against Slurm's node
    names.  DQ_HOSTS means 'one of these' and sbatch's --nodelist 'all of
    these', so several hosts become an --exclude of all the others."""
    matched = sorted(n for n in nodes if matches_host(patterns, n))
    if not matched and not exclude:
        raise Failure(f"{var}={','.join(patterns)} matches none of Slurm's nodes "
                      f"({', '.join(sorted(nodes)[:8]) or 'none'}); name them as "
                      f"sinfo -N does")
    if exclude:
        return [f"--exclude={','.join(matched)}"] if matched else []
    if len(matched) == 1:
        return [f"--nodelist={matched[0]}"]
    others = sorted(set(nodes) - set(matched))
    return [f"--exclude={','.join(others)}"] if others else []


def slurm_gpu_type(cfg, want, text, nodes):
    """DQ_GPU_TYPE: a gres type ('gpu:TYPE:N') where the nodes' GPUs have
    types, else a node feature (--constraint); the first that contains the
    text, as dq's own rule (case-insensitive).  ([gres options], type)."""
    types = sorted({t for n in nodes.values() for t in n.gres_types() if t})
    for t in types:
        if text.lower() in t.lower():
            return [], t
    features = sorted({f for n in nodes.values() for f in n.features})
    for f in features:
        if text.lower() in f.lower():
            return [f"--constraint={f}"], None
    raise Failure(f"DQ_GPU_TYPE={text}: Slurm's GPUs have no such type (gres types: "
                  f"{', '.join(types) or 'none'}; node features: {', '.join(features) or 'none'})"
                  f"; drop DQ_GPU_TYPE, or name one of those")


def slurm_dependency(cfg, env, var, kind):
    """DQ_AFTER (afterok) / DQ_AFTER_ANY (afterany): the Slurm IDs of the
    jobs not ended yet (an ended one either let the job go, or dq cancels
    it at submit, as with ssh).  [options]."""
    ids = []
    for dep in job_dependencies(cfg, {var: env[var]})[0 if kind == "afterok" else 1]:
        state, last = final_state(cfg, dep)
        if state is not None:
            if kind == "afterok" and state != "done":
                raise Failure(f"{var}: {dep} ended {state}; this job would never start")
            continue
        sid = slurm_id(cfg, last or dep)
        if sid is None:
            raise Failure(f"{var}: {dep} is not a Slurm job (it was queued before "
                          f"backend = slurm); wait for it to end, or drop {var}")
        ids.append(sid)
    return [f"--dependency={kind}:{':'.join(ids)}"] if ids else []


def _slurm_time(cfg, spec):
    limit = spec.get("time_limit")
    if not limit:
        return []
    minutes = math.ceil((limit + cfg.kill_grace + SLURM_TIME_SLACK) / 60)
    return [f"--time={minutes}"]


def _slurm_priority(env):
    p = job_priority(env)
    if p > 0:
        raise Failure(f"DQ_PRIORITY={p}: on Slurm only an operator may raise a job's "
                      f"priority; use dq-top to move a job to the front of your own, or a "
                      f"negative DQ_PRIORITY to let others go first")
    return [f"--nice={-p}"] if p < 0 else []


def _slurm_gres(cfg, spec, nodes_of):
    """DQ_GPUS (with DQ_GPU_TYPE's type) and DQ_MEM: --gres."""
    env, gpus = spec.get("env", {}), spec.get("gpus", 1)
    extra, gtype = [], None
    if env.get("DQ_GPU_TYPE", "").strip():
        extra, gtype = slurm_gpu_type(cfg, gpus, env["DQ_GPU_TYPE"].strip(), nodes_of())
    if env.get("DQ_MEM", "").strip():
        mib = booking_mib(env["DQ_MEM"])
        if not any(n.gres_types("shard") for n in nodes_of().values()):
            raise Failure("DQ_MEM: this Slurm cluster has no GPU shards (gres shard) to "
                          "share GPUs by; drop DQ_MEM for a whole GPU, or ask your admins "
                          "for shards (README: dq on Slurm)")
        # one shard per GiB of GPU memory (the README's advice for gres.conf)
        return extra + [f"--gres=shard:{gpus * math.ceil(mib / 1024)}"]
    if gpus == 0:
        return extra
    return extra + [f"--gres=gpu:{gtype + ':' if gtype else ''}{gpus}"]


def _refuse_on_slurm(var, why):
    raise Failure(f"{var}: {why} (backend = slurm)")


# DQ_* variable -> (sbatch options that honour it, from (cfg, spec,
# nodes_of)), or a Failure saying why Slurm cannot.  Variables not listed
# are dq's own business, in the wrapper or at the job's end (DQ_DESC,
# DQ_MAIL, DQ_SIGNAL, DQ_RETRY, DQ_RESUME, DQ_REQUEUE, DQ_SNAPSHOT, ...).
SLURM_VARS = {
    "DQ_GPUS": _slurm_gres,
    "DQ_TIME": lambda cfg, spec, nodes_of: _slurm_time(cfg, spec),
    "DQ_AFTER": lambda cfg, spec, nodes_of: slurm_dependency(
        cfg, spec["env"], "DQ_AFTER", "afterok") if spec["env"].get("DQ_AFTER") else [],
    "DQ_AFTER_ANY": lambda cfg, spec, nodes_of: slurm_dependency(
        cfg, spec["env"], "DQ_AFTER_ANY", "afterany") if spec["env"].get("DQ_AFTER_ANY")
        else [],
    "DQ_HOSTS": lambda cfg, spec, nodes_of: slurm_hosts_args(
        "DQ_HOSTS", host_patterns("DQ_HOSTS", spec["env"]["DQ_HOSTS"]), nodes_of(), False)
        if spec["env"].get("DQ_HOSTS", "").strip() else [],
    "DQ_EXCLUDE": lambda cfg, spec, nodes_of: slurm_hosts_args(
        "DQ_EXCLUDE", host_patterns("DQ_EXCLUDE", spec["env"]["DQ_EXCLUDE"]), nodes_of(), True)
        if spec["env"].get("DQ_EXCLUDE", "").strip() else [],
    "DQ_GPU_MEM": lambda cfg, spec, nodes_of: _refuse_on_slurm(
        "DQ_GPU_MEM", "Slurm has no request for a GPU's memory size; name the GPUs with "
        "DQ_GPU_TYPE instead") if spec["env"].get("DQ_GPU_MEM", "").strip() else [],
    "DQ_PRIORITY": lambda cfg, spec, nodes_of: _slurm_priority(spec["env"]),
    "DQ_DESC": lambda cfg, spec, nodes_of: [
        "--job-name=" + (spec["env"].get("DQ_DESC") or os.path.basename(spec["script"]))[:100]],
}


def slurm_site_args(cfg):
    """dq.conf's sbatch options for every job: slurm_partition,
    slurm_account, slurm_args."""
    return ([f"--partition={cfg.slurm_partition}"] if cfg.slurm_partition else []) + \
        ([f"--account={cfg.slurm_account}"] if cfg.slurm_account else []) + cfg.slurm_args


def slurm_options(cfg, spec, nodes_of):
    """The sbatch options for one job (job.json's spec), every DQ_*
    variable honoured or refused (SLURM_VARS); dq.conf's slurm_partition,
    slurm_account and slurm_args first."""
    opts = ["--parsable", "--no-requeue", "--kill-on-invalid-dep=yes", "--export=ALL",
            "--open-mode=append"] + slurm_site_args(cfg)
    for var, options in SLURM_VARS.items():
        opts += options(cfg, spec, nodes_of)
    return opts


def slurm_batch_script(cfg, first, array):
    """The batch script: dq's _slurm on the node Slurm chose."""
    args = ["_slurm", "--array", first] if array else ["_slurm", first]
    return f"#!/bin/sh\nexec {dq_command(cfg, *args)}\n"


def submit_to_slurm(cfg, ids):
    """sbatch the jobs just written (create_jobs): one sbatch per job, or one
    job array for the jobs of a sweep that ask Slurm the same; each job's
    Slurm ID goes to its slurm.json.  A Failure (a variable Slurm cannot
    honour, sbatch's refusal) leaves no job behind in Slurm: those already
    sent are cancelled, and create_jobs removes them all."""
    nodes = []

    def nodes_of():         # one sinfo, and only when a variable needs it
        if not nodes:
            nodes.append(slurm_nodes(cfg))
        return nodes[0]
    groups = {}
    for job_id in ids:
        job = load_job(cfg, job_id)
        key = tuple(slurm_options(cfg, job.spec, nodes_of))
        groups.setdefault(key, []).append(job)
    sent = []
    try:
        for opts, jobs in groups.items():
            first = jobs[0]
            out = os.path.join(first.dir, "slurm.out")
            argv = ["sbatch"] + list(opts) + [f"--output={out}", f"--chdir={first.dir}"]
            if len(jobs) > 1:
                write_json(os.path.join(first.dir, SLURM_ARRAY),
                           {"jobs": [j.id for j in jobs]}, durable=False)
                argv.append(f"--array=0-{len(jobs) - 1}")
            text = slurm_must(cfg, argv, f"sbatch refused {first.id}",
                              slurm_batch_script(cfg, first.id, len(jobs) > 1))
            sid = text.strip().split(";")[0]
            if not re.fullmatch(r"[0-9]+", sid):
                raise Failure(f"sbatch said {text.strip()!r}, not a job ID")
            sent.append(sid)
            for i, job in enumerate(jobs):
                write_json(os.path.join(job.dir, SLURM_FILE),
                           {"format": FORMAT, "id": f"{sid}_{i}" if len(jobs) > 1 else sid},
                           durable=len(ids) == 1)
    except (Failure, OSError):
        if sent:
            slurm_call(cfg, ["scancel"] + sent)
        raise


def squeue_jobs(cfg, user=None):
    """{Slurm ID: (state, reason)} of the jobs Slurm has pending or running
    (of `user`, or everybody's), array tasks one by one."""
    argv = ["squeue", "-h", "-r", "-o", "%i|%T|%r"] + (["-u", user] if user else [])
    out = slurm_must(cfg, argv, "cannot ask Slurm for its queue")
    jobs = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            jobs[fields[0]] = (fields[1], fields[2])
    return jobs


# Slurm's reasons for a pending job, in dq's words (Slurm's own word is kept
# beside them: "GPUs busy (Slurm: Resources)").
SLURM_REASONS = {
    "Resources": "GPUs busy", "Priority": "other jobs first",
    "Dependency": "waiting for its DQ_AFTER jobs",
    "DependencyNeverSatisfied": "its DQ_AFTER job failed",
    "JobHeldUser": "held", "JobHeldAdmin": "held by an admin",
    "BeginTime": "not before its start time", "None": "not looked at by Slurm yet",
    "ReqNodeNotAvail": "its hosts are not available", "PartitionDown": "partition down",
    "PartitionNodeLimit": "asks more than its partition has",
    "QOSMaxGRESPerUser": "at your GPU limit", "AssocGrpGRES": "at your group's GPU limit",
    "QOSMaxJobsPerUserLimit": "at your job limit", "Licenses": "waiting for licenses",
}


def slurm_reason(state, reason):
    if state != "PENDING":
        return "starting" if state in ("CONFIGURING", "RUNNING", "COMPLETING") else \
            f"Slurm: {state}"
    words = SLURM_REASONS.get(reason) or (
        "at a limit" if "Limit" in reason or reason.startswith(("QOS", "Assoc")) else None)
    return f"{words} (Slurm: {reason})" if words else f"Slurm: {reason}"


def slurm_queue_reasons(cfg, queued):
    """Each queued job's `reason`, from squeue."""
    seen = squeue_jobs(cfg)
    for j in queued:
        sid = slurm_id(cfg, j["id"])
        if sid in seen and seen[sid][1] == "Dependency":    # which one, as with ssh
            dep = next((d for d in j["after"] + j["after_any"]
                        if final_state(cfg, d)[0] is None), None)
            j["reason"] = f"after {dep} (Slurm: Dependency)" if dep else \
                slurm_reason(*seen[sid])
        elif sid in seen:
            j["reason"] = slurm_reason(*seen[sid])
        elif sid:
            j["reason"] = "ending in Slurm"
        else:
            j["reason"] = "not in Slurm yet"
        j["slurm_id"] = sid


def slurm_out_tail(job):
    """The last line Slurm wrote about the job's batch step (slurm.out)."""
    try:
        with open(os.path.join(job.dir, "slurm.out"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()
                     if ln.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


# Creating jobs ###############################################################

def next_number(cfg):
    """The counter, or (missing or corrupt) one past the highest job."""
    path, fix = cfg.p("state", "next_id"), "dq counts on from the highest job ID and rewrites it"
    counter = read_json(path, None, fix=fix)
    if counter is not None:
        why = bad_field(counter, {"next": (lambda v: is_int(v, 1, 10 ** 12), "a job number",
                                           True)})
        if not why:
            return counter["next"]
        bad_file(path, why, fix)
    ids = all_job_ids(cfg)
    return int(ids[-1].split("-")[0]) + 1 if ids else 1


def prepare_job(cfg, env, deps=True):
    """What a job's DQ_* variables ask, checked before anything is written:
    {env, gpus, need, time_limit, priority, after, after_any, snapshot}
    (snapshot: True if DQ_SNAPSHOT asks for one; the caller replaces it
    with a SnapshotPlan, or the snapshot a run again reuses)."""
    want = wanted_gpus(env)
    retry_limit(env)
    resume_limit(env)
    requeue_limit(env)
    mail_address(cfg, env, me())
    mail_on(env)
    after, after_any = job_dependencies(cfg, env) if deps else ([], [])
    limit = job_time_limit(cfg, env)
    job_signal(env, limit)
    return {"env": env, "gpus": want, "need": job_needs(env, want),
            "time_limit": limit, "priority": job_priority(env),
            "after": after, "after_any": after_any, "snapshot": snapshot_wanted(env)}


def _write_jobs(cfg, user, ids, script, cwd, jobs, restart_of, requeues, chain, sweep):
    """create_jobs' writes, once the IDs are claimed."""
    now = time.time()
    host = os.uname().nodename
    entries = []
    taken = {}      # SnapshotPlan -> its snapshot: one copy for the jobs that share it
    for i, (job_id, job) in enumerate(zip(ids, jobs)):
        env = dict(job["env"], DQ_SWEEP=ids[0], DQ_SWEEP_INDEX=str(i)) if sweep else job["env"]
        spec = {"id": job_id, "user": user, "script": script, "cwd": cwd, "env": env,
                "gpus": job["gpus"], "submitted": now, "submit_host": host,
                "restart_of": restart_of, "requeues": requeues,
                "time_limit": job["time_limit"]}
        for key in ("after", "after_any"):
            if job[key]:
                spec[key] = job[key]
        spec.update(chain or {})
        snap = job.get("snapshot")
        if isinstance(snap, SnapshotPlan):
            if snap not in taken:
                taken[snap] = snap.take(cfg, job_id)
            snap = taken[snap]
        if isinstance(snap, dict):
            spec["snapshot"] = snap
        spec.update(job.get("spec", {}))     # (dq-shell: interactive, args)
        write_json(os.path.join(cfg.job_dir(job_id), "job.json"), spec,
                   durable=len(jobs) == 1)
        entry = {"gpus": job["gpus"], "submitted": now}
        for key in ("need", "priority", "after", "after_any"):
            if job[key]:
                entry[key] = job[key]
        if job["after"] or job["after_any"]:
            entry["waiting"] = True     # until its dependencies allow (release_dependents)
        entries.append((job_id, entry))
    if sweep:
        write_json(os.path.join(cfg.job_dir(ids[0]), "sweep.json"), {"jobs": ids},
                   durable=False)
    if len(jobs) > 1:
        os.sync()       # one flush for the whole sweep, not an fsync per file
    rebuild_own_queue(cfg)
    for job_id, entry in entries:
        if entry["gpus"] == 0:
            write_json(cfg.p("jobs", "cpu", job_id), {}, durable=len(jobs) == 1)
        set_queue_name(cfg, job_id, entry, new=True)
        write_json(cfg.p("jobs", "active", job_id), entry, durable=len(jobs) == 1)
    if len(jobs) > 1:
        os.sync()
    return ids


def create_jobs(cfg, script, cwd, jobs, restart_of=None, requeues=0, chain=None, sweep=False):
    """Take the next numbers from the counter under the global lock, then
    claim each with a mkdir (the directory claims the id), then write the
    jobs (prepare_job).  The counter only grows; an id whose directory
    exists is skipped, so a lost or rolled-back counter never hands out an
    id twice.  A job is queued once its jobs/active entry exists, which is
    written last (after its name in the owner's queue directory).  One hold
    of the lock and two os.sync() for a whole sweep (an fsync per file took
    0.5 ms each).  `sweep`: its jobs get DQ_SWEEP (the first ID) and
    DQ_SWEEP_INDEX, and the first job's directory a list of them
    (sweep.json).  `chain`: job.json fields saying which run a run again
    follows (see run_again).  A job's SnapshotPlan is taken into the
    directory of the first job that has it."""
    user = me()
    ensure_layout(cfg)
    ids = []
    while len(ids) < len(jobs):
        need = len(jobs) - len(ids)
        with global_lock(cfg):      # a block of numbers: the counter moves past it
            n = next_number(cfg)
            # Not fsynced: a counter that rolls back in a crash only makes
            # the mkdirs below skip ids whose directories exist.
            write_json(cfg.p("state", "next_id"), {"next": n + need}, mode=0o666,
                       durable=False)
        for number in range(n, n + need):
            try:
                os.mkdir(cfg.job_dir(f"{number}-{user}"), 0o755)
                ids.append(f"{number}-{user}")
            except FileExistsError:
                pass        # (after a rollback) taken: more numbers, next round
    try:
        _write_jobs(cfg, user, ids, script, cwd, jobs, restart_of, requeues, chain, sweep)
        if is_slurm(cfg):       # (see "Slurm back end", below)
            submit_to_slurm(cfg, ids)
        return ids
    except (OSError, Failure):
        # A full data root, a snapshot that could not be copied: no
        # half-written job (or snapshot) stays behind (its number stays
        # taken: the counter moved past it).
        import shutil
        for job_id in ids:
            drop_from_index(cfg, job_id)
            shutil.rmtree(cfg.job_dir(job_id), ignore_errors=True)
        raise


def create_job(cfg, script, cwd, job, restart_of=None, requeues=0, chain=None):
    return create_jobs(cfg, script, cwd, [job], restart_of, requeues, chain)[0]


def again_job(cfg, job):
    """prepare_job for a job's new run (requeue, retry, resume): its
    variables, time limit and snapshot as submitted; its dependencies were
    met."""
    again = prepare_job(cfg, job.spec.get("env", {}), deps=False)
    again["time_limit"] = job.spec.get("time_limit")
    again["snapshot"] = job.spec.get("snapshot")
    return again


# How a job runs again by itself at its end, as a new job: (the job.json
# field naming the run it follows, the count of such runs along its chain
# so far, the limit its variable sets).  Each new run carries every count,
# so "up to N times" holds across the whole chain, however the kinds mix.
RUN_AGAIN = {"retry": ("retry_of", "retries", retry_limit),      # DQ_RETRY: it failed
             "resume": ("resume_of", "resumes", resume_limit)}   # DQ_RESUME: it exited 75


def chain_counts(job):
    return {count: job.spec.get(count, 0) for _, count, _ in RUN_AGAIN.values()}


def requeue(cfg, job):
    """DQ_REQUEUE=N: a lost job is queued again, up to N times.  Returns the
    new id or None."""
    try:
        limit = requeue_limit(job.spec.get("env", {}))
    except Failure as e:        # submitted before dq-submit checked DQ_REQUEUE
        warn(f"cannot requeue {job.id}: {e}")
        return None
    done = job.spec.get("requeues", 0)
    if done >= limit or job.spec.get("interactive"):    # nobody waits at a terminal for it
        return None
    return create_job(cfg, job.spec["script"], job.spec["cwd"], again_job(cfg, job),
                      restart_of=job.id, requeues=done + 1, chain=chain_counts(job))


def run_again(cfg, job, kind):
    """DQ_RETRY=N (kind 'retry': a failed job, not killed, not timed out)
    and DQ_RESUME=N ('resume': a job that exited 75) queue the job again,
    up to N times in all: same script, directory, variables and snapshot.
    Returns the new ID, or None (none left, or it could not be written)."""
    of, count, limit = RUN_AGAIN[kind]
    if job.spec.get("interactive"):     # a dq-shell: nobody waits at a terminal for it
        return None
    try:
        if job.spec.get(count, 0) >= limit(job.spec.get("env", {})):
            return None
        chain = dict(chain_counts(job), **{of: job.id, count: job.spec.get(count, 0) + 1})
        return create_job(cfg, job.spec["script"], job.spec["cwd"], again_job(cfg, job),
                          chain=chain)
    except OSError as e:
        if e.errno in SPACE_ERRORS:
            raise       # the wrapper tries again once there is room
        warn(f"cannot {kind} {job.id}: {e}")
        return None
    except Failure as e:
        warn(f"cannot {kind} {job.id}: {e}")
        return None


def mark_lost(cfg, job, reason):
    path = cfg.p("jobs", "lost", job.id)
    try:
        write_json(path, {"reason": reason, "ended": time.time()}, exclusive=True)
    except FileExistsError:
        pass
    except OSError as e:
        warn(f"cannot mark {job.id} lost: {e.strerror}")


# Leases ######################################################################

# A running job's wrapper renews its lease, jobs/backend/<id>/lease (its
# mtime, set by the file server), every `renew` seconds; a pass judges a
# job whose host does not answer by its lease, never by ssh alone.  With L
# = lost_after (at least LEASE_FLOOR):
#
#   renew = min(L/8, 5 s)   one utime() and two stats: ~12 a minute by default
#   term  = L/2             no renewal for this long: the wrapper TERMs its job
#   kill  = term + min(kill_grace, L/4)     ... and KILLs what is left
#   lost  = L               a pass may count the job lost (and a copy start)
#
# The wrapper measures from the start of its last renewal that succeeded,
# so the lease's mtime is never older than what it counts from: by the
# time a pass sees a lease L old, the job had been KILLed for L - kill >=
# L/4 seconds (11 s by default), which covers clock skew (CLOCK_SLACK) and
# the wrapper's watchdog period.  A wrapper that sees its job counted lost
# (jobs/lost/<id>), or killed by a dq-kill that could not reach the host,
# stops it at once.
LEASE_FLOOR = 2.0
WATCHDOG_PERIOD = 0.25


class LeaseTimes:
    def __init__(self, cfg):
        self.lost = max(cfg.lost_after, LEASE_FLOOR)
        self.renew = min(self.lost / 8, 5.0)
        self.term = self.lost / 2
        self.kill = self.term + min(cfg.kill_grace, self.lost / 4)


def lease_times(cfg):
    return LeaseTimes(cfg)


def lease_path(cfg, job_id):
    return os.path.join(cfg.job_dir(job_id), "lease")


def lease_age(cfg, job_id, now):
    """Seconds since the job's lease was last renewed, read fresh (open()
    revalidates an NFS client's cached attributes); None without one."""
    mtime = _mtime(lease_path(cfg, job_id))
    return None if mtime is None else now - mtime / 1e9


# Placement ###################################################################

# A launch's ssh may take `timeout`; its screen session is there within
# this many seconds more, or it never started.
LAUNCH_GRACE = 5


# How far the hosts' clocks may disagree: a run.json written on the job's
# host and a poll started elsewhere are compared with this margin.
CLOCK_SLACK = 1


class Placements(dict):
    """The GPUs dq has handed out: state/placements.json, {job_id: placement}
    with placement = {user, host, gpus, state, since[, seen][, mem, share]}
    (mem, share: a sharing job's booking per GPU and share of a GPU).  Only this
    class changes it, through the transitions below, under the global lock:

        with Placements.locked(cfg) as places:    # lock, load (or rebuild)
            places.assign(job_id, host, gpus, now)
        # saved only if a transition changed something; a save that handed
        # out GPUs is fsynced after the lock is released, before any launch

    Placements.read(cfg) is a snapshot without the lock, for listings and
    for guesses that a pass checks again under the lock.

    A placement's life (a job's GPUs are reserved from the decision until
    the job ends, so a job that loads data for a minute before touching
    its GPU keeps it):

    state      set by                 means                 leaves it
    ---------  ---------------------  --------------------  ----------------------------
    assigned   assign(): any user's   GPUs reserved for a   claim(): its owner's next
               pass decided it        queued job; owner's   pass -> launching.
                                      loop woken            drop(): nobody claimed it in
                                                            assign_timeout (the owner has
                                                            no loop): the job keeps its
                                                            place in the queue
    launching  claim(): the owner's   its screen session    confirm(): a poll saw the
               pass, just before it   is being started      session, or the wrapper's
               launches (since=then)                        run.json older than the poll
                                                            -> running.  drop(): launch
                                                            failed (queued again), a late
                                                            launch found its GPU taken
                                                            (the wrapper: queued again),
                                                            or no session and no run.json
                                                            by timeout + LAUNCH_GRACE
                                                            after since
    running    confirm() (seen=when   the job runs in its   drop(): end.json exists (the
               that pass had its      session               wrapper, dq-kill, the owner
               poll's answer)                               recording a lost job; one
                                                            dq-kill wrote, here or in
                                                            launching: once the job is
                                                            surely gone, see dying),
                                                            or it is lost (below)
    (gone)     drop()                 not in the file

    Which poll may prove a session gone (it lists the host's screen
    sessions; the job has no end.json): only one that began after the
    session surely existed -- for `running`, after `seen`; for `launching`,
    after the wrapper's run.json (CLOCK_SLACK later) or, without one,
    timeout + LAUNCH_GRACE after the claim; never for `assigned`.  A poll that began
    earlier may predate the session and proves nothing, whatever the
    placement says by the time that pass holds the lock.  A session proven
    gone without an end is `lost` (jobs/lost/<id>).

    A running job whose host does not answer is judged by its lease (see
    Leases), never by ssh: it stays `running` while the lease is renewed,
    and is `lost` once the lease is lost_after (L) old.  The timing that
    keeps a job from running twice: the wrapper counts from the start of
    its last renewal that worked, which is no later than the lease's
    mtime; it TERMs the job L/2 after it and KILLs it by 3L/4; so when a
    pass sees the lease L old, the job has been dead for at least L/4,
    more than the clock slack between hosts.  A copy (DQ_REQUEUE) is
    queued by the owner's pass only after that, or after a kill on the
    job's host went through (surely_stopped); the copy never goes to a
    host whose last poll failed (reconcile sets `silent`).  A job that
    ended meanwhile has its end.json, which no lost verdict overwrites.

    A crash leaves: assigned -- dropped after assign_timeout, job queued;
    launching -- no session: dropped after timeout + LAUNCH_GRACE and
    queued again, a session: confirmed by the next pass; running -- a
    wrapper that died leaves no session: lost, recorded (and requeued with
    DQ_REQUEUE) by the owner's next pass.  A corrupt file is rebuilt from
    the running jobs' run.json (assigned and launching ones are queued
    again)."""

    ASSIGNED, LAUNCHING, RUNNING = "assigned", "launching", "running"
    STATES = (ASSIGNED, LAUNCHING, RUNNING)

    def __init__(self, cfg, jobs=(), changed=False):
        super().__init__(jobs)
        self.cfg = cfg
        self.changed = changed      # save on the way out of `locked`
        self.handed_out = False     # ... and fsync it before any launch
        self.silent = set()         # hosts whose last poll failed (reconcile)
        self._dropped_launching = []    # see _restore_started
        self._lock = None

    # Loading and saving

    @classmethod
    def path(cls, cfg):
        return cfg.p("state", "placements.json")

    @classmethod
    def read(cls, cfg):
        """The placements now (no lock); rebuilt if the file is corrupt."""
        path = cls.path(cfg)
        fix = "dq rebuilds it from the running jobs' run.json files"
        data = read_json(path, None, False, fix)
        if data is None:
            return cls(cfg)
        if data is False:
            return cls.rebuild(cfg)
        jobs = data.get("jobs")
        why = "'jobs' is not an object" if not isinstance(jobs, dict) else \
            next(filter(None, (cls._invalid(job_id, p) for job_id, p in jobs.items())), None)
        return bad_file(path, why, fix, cls.rebuild(cfg)) if why else cls(cfg, jobs)

    FIELDS = {"host": (lambda v: is_str(v) and HOST_RE.match(v), "a host name", True),
              "gpus": (is_gpu_list, "a list of GPU indices", True),
              "state": (lambda v: v in Placements.STATES, " or ".join(STATES), True),
              "since": (is_time, "a time", True), "seen": (is_time, "a time", False),
              "polled": (is_time, "a time", False),
              "mem": (lambda v: is_int(v, 1), "MiB booked", False),
              "share": (is_share, "a share of a GPU", False)}

    @classmethod
    def _invalid(cls, job_id, p):
        """Why one placement cannot be trusted, or None."""
        m = JOB_ID_RE.match(job_id)
        if not (m and m.group(2)):
            return f"{job_id!r} is not a job ID"
        if not isinstance(p, dict) or p.get("user") != m.group(2):
            return f"the placement of {job_id} is not an object naming its user"
        why = bad_field(p, cls.FIELDS)
        return f"the placement of {job_id}: {why}" if why else None

    @classmethod
    def rebuild(cls, cfg):
        """The running jobs' run.json files say which GPUs are held, so
        nothing is handed out twice; the next locked pass saves it."""
        places = cls(cfg, changed=True)
        for job_id in active_ids(cfg):
            job = load_job(cfg, job_id, quiet=True)
            if job and job.run and not job.end:
                started = job.run.get("started", 0)
                places[job_id] = {"user": job.owner, "host": job.run["host"],
                                  "gpus": job.run.get("gpus", []), "state": cls.RUNNING,
                                  "since": started, "seen": started}
                if "mem" in job.run:
                    places[job_id].update(mem=job.run["mem"], share=job.run.get("share", 1))
        return places

    @classmethod
    def locked(cls, cfg):
        """The placements, loaded under the global lock, held until the
        `with` block ends (see the class docstring)."""
        lock = global_lock(cfg)
        lock.acquire()
        try:
            places = cls.read(cfg)
        except BaseException:
            lock.release()
            raise
        places._lock = lock
        return places

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            # Not fsynced under the lock: a write that only drops
            # reservations costs nothing if a crash loses it (the next
            # pass redoes it).
            if exc_type is None and self.changed:
                self._save()
                self._restore_started()
        finally:
            self._lock.release()
        if exc_type is None and self.handed_out:
            # Durable before anything is launched, but fsynced outside the
            # lock (a crash before this loses a decision nobody acted on).
            sync_file(self.path(self.cfg))

    # Transitions

    def assign(self, job_id, host, gpus, now, share=None, polled=None):
        """(queued) -> assigned: these GPUs of host are the job's (share:
        a sharing job's (MiB booked per GPU, share of a GPU); polled: when
        the poll of host that found them free began)."""
        self[job_id] = {"user": job_id.split("-", 1)[1], "host": host, "gpus": gpus,
                        "state": self.ASSIGNED, "since": now}
        if polled:
            self[job_id]["polled"] = polled
        if share:
            self[job_id].update(mem=share[0], share=share[1])
        self.changed = self.handed_out = True

    def claim(self, user, now):
        """assigned -> launching, for user's jobs: [(job_id, host, gpus,
        share)], which the caller launches once the lock is released."""
        mine = []
        for job_id, p in self.items():
            if p["user"] == user and p["state"] == self.ASSIGNED:
                p["state"], p["since"] = self.LAUNCHING, now
                mine.append((job_id, p["host"], p["gpus"],
                             (p["mem"], p.get("share", 1)) if "mem" in p else None))
        if mine:
            self.changed = self.handed_out = True
        return mine

    def confirm(self, job_id, now):
        """launching -> running: a pass saw the job run.  `now` is after
        that pass's polls answered (see the class docstring)."""
        p = self[job_id]
        p["state"], p["seen"] = self.RUNNING, now
        self.changed = True

    def drop(self, job_id, unstarted=False):
        """any -> gone: the job ended, was lost or killed, or goes back to
        the queue (unstarted: a launching job that has no run.json, which
        goes back to the queue; see _restore_started).  False if it had no
        placement."""
        p = self.pop(job_id, None)
        if p is None:
            return False
        if unstarted and p["state"] == self.LAUNCHING:
            self._dropped_launching.append((job_id, p))
        self.changed = True
        return True

    def _restore_started(self):
        """A launching job dropped (no run.json when its pass looked) whose
        wrapper wrote run.json meanwhile gets its placement back, still
        under the lock.  The wrapper writes run.json, then reads the
        placements: it reads either this save, and does not run the job,
        or the older one -- then its run.json is there now, and the
        placement comes back before anyone can give its GPUs away."""
        back = [(j, p) for j, p in self._dropped_launching
                if j not in self and os.path.exists(os.path.join(self.cfg.job_dir(j), "run.json"))
                and not os.path.exists(os.path.join(self.cfg.job_dir(j), "end.json"))]
        self._dropped_launching = []
        if back:
            self.update(back)
            self._save()

    def _save(self):
        write_json(self.path(self.cfg), {"jobs": dict(self)}, mode=0o666, compact=True,
                   durable=False)

    # Questions

    def state(self, job_id):
        return self[job_id]["state"] if job_id in self else None

    def unclaimed_users(self):
        """Users with jobs assigned to them: their loops are to be woken."""
        return {p["user"] for p in self.values() if p["state"] == self.ASSIGNED}

    def counts(self, user):
        """(assigned, launching or running) placements of user's jobs."""
        waiting = sum(1 for p in self.values() if p["user"] == user
                      and p["state"] == self.ASSIGNED)
        held = sum(1 for p in self.values() if p["user"] == user
                   and p["state"] != self.ASSIGNED)
        return waiting, held

    def expired(self, job_id, now):
        """An assignment its owner did not claim in assign_timeout (their
        dq-schedule is not running)."""
        p = self[job_id]
        return p["state"] == self.ASSIGNED and now - p["since"] > self.cfg.assign_timeout

    def session_verdict(self, job_id, poll, run_started, now):
        """What a poll of the job's host proves about its screen session:
        'seen', 'gone' or None (nothing; see the class docstring).
        run_started: the wrapper's start (run.json), None if it has not
        written one; asked for only where it matters (a callable)."""
        p = self[job_id]
        if poll.sessions is None or p["state"] == self.ASSIGNED:
            return None
        if job_id in poll.sessions:
            return "seen"
        if p["state"] == self.RUNNING:
            return "gone" if poll.started > p.get("seen", p["since"]) else None
        if poll.started <= p["since"]:
            return None
        ran = run_started()
        if ran is not None:
            return "gone" if ran < poll.started - CLOCK_SLACK else None
        return "gone" if now - p["since"] >= LAUNCH_GRACE + self.cfg.timeout else None


def dying(cfg, places, job_id, st, now):
    """Is a job that dq-kill recorded killed perhaps still dying?  Once it
    was launched (launching or running), its GPUs stay its own until the
    kill went through (dq-kill frees them then), its wrapper hands them
    over, a poll of its host proves its session gone, or its lease is
    lost_after old (the wrapper is gone or has stopped it): the next job
    never starts beside the last of it, whichever pass comes first --
    one that did not poll its host, or found it silent, included."""
    if places[job_id]["state"] == Placements.ASSIGNED:
        return False
    end = read_json(os.path.join(cfg.job_dir(job_id), "end.json"), {}, {}, skip_newer=True)
    if end.get("state") != "killed":
        return False
    if st is not None and st.reachable and st.sessions is not None:
        if job_id in st.sessions:
            return True

        def started():
            ran = read_json(os.path.join(cfg.job_dir(job_id), "run.json"), {}, {},
                            skip_newer=True).get("started")
            return ran if is_time(ran) else None
        if places.session_verdict(job_id, st, started, now) == "gone":
            return False
    # No lease: a launch that never started its wrapper (or a wrapper of an
    # older dq), counted from the claim
    age = lease_age(cfg, job_id, now)
    return (now - places[job_id]["since"] if age is None else age) < lease_times(cfg).lost


def reconcile(cfg, places, polls, now):
    """Bring the placements in line with what the polls saw, under the
    lock: drop those of jobs that ended and assignments nobody claimed,
    confirm launched jobs seen running, and mark lost the jobs whose
    session a poll proves gone without an end (Placements.session_verdict)
    or whose lease stopped for lost_after seconds while its host is silent.
    Sets places.silent: the hosts whose last poll failed, where no job goes."""
    down = track_hosts(cfg, polls)
    places.silent = set(down)
    for job_id, p in list(places.items()):
        # Under the lock at every job change: a stat per placement, and a
        # job's files are read only where this poll can say more of it.
        st = polls.get(p["host"])
        if os.path.exists(os.path.join(cfg.job_dir(job_id), "end.json")) \
                or places.expired(job_id, now):
            if not dying(cfg, places, job_id, st, now):
                places.drop(job_id)
            continue
        if st is None:
            continue
        job = None

        def load():
            nonlocal job
            job = job or load_job(cfg, job_id, quiet=True)
            return job
        if not st.reachable:
            # A silent host proves nothing of its jobs: a job whose wrapper
            # still renews its lease runs on (see the class docstring).
            since = down.get(p["host"], now)
            if p["state"] == Placements.RUNNING or (load() and job.run):
                age = lease_age(cfg, job_id, now)
                if age is None:         # a wrapper of an older dq: no lease
                    age = now - since
                if age >= lease_times(cfg).lost and load():
                    mark_lost(cfg, job, f"host {p['host']} stopped answering ({st.error}) "
                                        f"and the job's lease was last renewed {age:.0f}s ago")
                    places.drop(job_id)
            elif now - since >= cfg.lost_after:
                places.drop(job_id, unstarted=True)     # never started: back to the queue
            continue
        verdict = places.session_verdict(
            job_id, st, lambda: (load() and job.run.get("started")) or None, now)
        if verdict == "seen" and p["state"] == Placements.LAUNCHING:
            places.confirm(job_id, now)
        elif verdict == "gone":
            if load() and (p["state"] == Placements.RUNNING or job.run):
                mark_lost(cfg, job, f"its screen session on {p['host']} ended without "
                                    f"recording an exit status")
                places.drop(job_id)
            else:
                places.drop(job_id, unstarted=True)


# Job processes ###############################################################

def job_owns(job_id, pgid, pid):
    """Does process pid belong to the job: in its process group, or
    carrying DQ_JOB_ID=<id> (it may have left the group with setsid)?
    Raises OSError for a process that is gone or not ours to read."""
    if pgid > 1 and os.getpgid(pid) == pgid:
        return True
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f"DQ_JOB_ID={job_id}".encode() in f.read().split(b"\0")


def job_processes(job_id, pgid):
    """PIDs of ours on this host that belong to the job (job_owns)."""
    found = set()
    for pid in os.listdir("/proc"):
        if whole_number(pid) in (None, os.getpid()):
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == os.getuid() and job_owns(job_id, pgid, int(pid)):
                found.add(int(pid))
        except OSError:
            continue
    return found


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _write_all(fd, data):
    """Write to a terminal that may be gone (screen quit): errors are moot."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def kill_stragglers(job_id, pgid, kill_at):
    """After a TERM: wait until the job's processes are gone or the time
    kill_at (monotonic) comes, then KILL what is left; those PIDs."""
    pids = job_processes(job_id, pgid)
    while pids and time.monotonic() < kill_at:
        time.sleep(0.1)
        pids = job_processes(job_id, pgid)
    signal_all(pids, signal.SIGKILL)
    return pids


def stop_processes(job_id, pgid, grace):
    """TERM every process of the job, KILL what is left after `grace`
    seconds; the PIDs that needed the KILL."""
    signal_all(job_processes(job_id, pgid), signal.SIGTERM)
    return kill_stragglers(job_id, pgid, time.monotonic() + grace)


def cmd__kill(cfg, argv):
    """Internal, on the job's host as its owner: kill the job's process
    group, then every process still carrying DQ_JOB_ID=<id> (it may have
    left the group with setsid), TERM then KILL after a grace period, then
    quit the screen session."""
    internal_args(argv, "_kill JOB_ID PGID", "run by dq-kill on the job's host",
                  (full_job_id, lambda a: whole_number(a) is not None))
    job_id, pgid = argv[0], int(argv[1])
    pids = stop_processes(job_id, pgid, cfg.kill_grace)
    import subprocess
    try:
        subprocess.run(["screen", "-S", session_name(job_id), "-X", "quit"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        # Its processes are gone, which is what counts; the session ends
        # with them.
        warn(f"could not quit the screen session of {job_id}: {e}")
    print(f"killed {len(pids)} straggler(s)" if pids else "ok")
    return 0


def kill_on_host(cfg, job, host):
    """Kill every process of a job on its host (see cmd__kill); a Result."""
    return run_on(cfg, host, "exec " + dq_command(cfg, "_kill", job.id,
                                                  str(job.run.get("pgid", 0))),
                  timeout=cfg.timeout + cfg.kill_grace)


# dq-kill --grace wakes the job's wrapper with this signal, so that it
# reads the job's grace.json at once instead of at its next lease renewal.
# Only the wrapper signals the job: the warning goes out once, however the
# request reaches it.  URG, because its default is to be ignored: a
# wrapper that has no handler for it (a dq from before --grace) lives on.
POKE = signal.SIGURG


def cmd__grace(cfg, argv):
    """Internal, on the job's host as its owner (dq-kill --grace): poke the
    job's wrapper, PID, if it is still there.  Prints 'ok' or 'gone'."""
    internal_args(argv, "_grace JOB_ID PID", "run by dq-kill --grace on the job's host",
                  (full_job_id, lambda a: whole_number(a, 2) is not None))
    job_id, pid = argv[0], int(argv[1])
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        ours = os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        args, ours = [], False
    # A PID is reused: only the job's own wrapper is poked.
    if not ours or b"_run" not in args or job_id.encode() not in args:
        print("gone")
        return 0
    os.kill(pid, POKE)
    print("ok")
    return 0


def poke_on_host(cfg, job, host):
    """Wake the job's wrapper on its host (see cmd__grace); a Result."""
    return run_on(cfg, host, "exec " + dq_command(cfg, "_grace", job.id,
                                                  str(job.run.get("pid", 0))))


def kill_leftovers(cfg, polls, user):
    """A screen session of ours whose job dq already counts as killed or
    lost (its host came back, or a dq-kill died half-way) is killed, so that
    nothing runs twice and no GPU stays held by a job dq has written off."""
    for host, st in polls.items():
        for job_id in st.sessions or ():
            if not job_id.endswith("-" + user):
                continue
            job = load_job(cfg, job_id, quiet=True)
            if job and (job.lost_marker() or job.end.get("state") in ("killed", "lost")):
                warn(f"killing what is left of {job_id} on {host} "
                     f"({job.end.get('state') or 'lost'})")
                kill_on_host(cfg, job, host)


# Notifications ###############################################################

def hook_path(user):
    try:
        home = pwd.getpwnam(user).pw_dir
    except KeyError:
        return None
    path = os.path.join(home, ".config", "dq", "on-end")
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def wants_notice(cfg, job):
    return bool(job.spec.get("env", {}).get("DQ_MAIL")) or hook_path(job.owner) is not None


def notify_later(cfg, job):
    """For an end recorded by a pass (lost, cancelled): notify from a
    detached process, so that the pass goes on at once."""
    if not wants_notice(cfg, job):
        return
    spawn_detached(f"notify of {job.id}'s end", "_notify", job.id)


def send_mail(cfg, to, subject, body):
    import smtplib
    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = to, to, subject
    msg.set_content(body)
    try:        # smtplib takes HOST:PORT as it is (port 25 without one)
        with smtplib.SMTP(cfg.smtp, timeout=cfg.timeout) as smtp:
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as e:
        return {"to": to, "error": f"cannot mail {to} through {cfg.smtp}: "
                                   f"{getattr(e, 'strerror', None) or e}"}
    return {"to": to, "sent": time.time()}


def send_sweep_mail(cfg, job, to, only_fail):
    first = job.spec["env"]["DQ_SWEEP"]
    try:
        ids = sweep_jobs(cfg, job)
    except Failure as e:
        return {"error": str(e)}
    ends = {i: final_state(cfg, i) for i in ids}
    if any(state is None for state, _ in ends.values()):
        return None         # the sweep's last job sends it
    try:        # the one that claims it sends it (two may end together)
        fd = os.open(os.path.join(cfg.job_dir(first), "sweep-mailed"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
    except FileExistsError:
        return None
    counts = {}
    for state, _ in ends.values():
        counts[state] = counts.get(state, 0) + 1
    bad = [(i, state, last) for i, (state, last) in ends.items() if state != "done"]
    if only_fail and not bad:
        return None
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    subject = f"dq: sweep {first} ended: {tally}"
    lines = [f"Sweep {first}: {len(ids)} jobs of {job.spec['script']} in {job.spec['cwd']}",
             f"{tally}.", ""]
    for i, state, last in bad:
        end = read_json(os.path.join(cfg.job_dir(last), "end.json"), {}, {}) or {}
        lines.append(f"{i} {state}" + (f" (as {last})" if last != i else "") +
                     (f": {end.get('reason')}" if end.get("reason") else ""))
    return send_mail(cfg, to, subject, "\n".join(lines) + "\n")


def send_end_mail(cfg, job):
    """The job's DQ_MAIL, or its sweep's summary when this is the sweep's
    last job to end.  None when there is nothing to send."""
    env = job.spec.get("env", {})
    try:
        to = mail_address(cfg, env, job.owner)
        only_fail = mail_on(env) == "fail"
    except Failure as e:
        return {"error": str(e)}
    if not to:
        return None
    if env.get("DQ_SWEEP"):
        return send_sweep_mail(cfg, job, to, only_fail)
    d = job.to_dict()
    if d["requeued_as"] or (only_fail and d["state"] == "done"):
        return None         # its next run mails; or all went well
    runtime = fmt_duration(d["ended"] - d["started"]) if d["started"] and d["ended"] else "-"
    code = d["signal"] or ("-" if d["exit_code"] is None else d["exit_code"])
    where = f"{d['host']}/{fmt_gpus(d['gpus'])}" if d["host"] else "no host"
    subject = f"dq: {job.id} {d['state']}, exit {code}, {runtime}, {where}"
    try:        # its last 20 lines, from its last 64 KiB at most
        with open(job_log(job), "rb") as f:
            f.seek(last_lines_offset(f, 20, most=64 * 1024))
            tail = "\n".join(f.read().decode("utf-8", "replace").splitlines()[-20:]) + "\n"
    except OSError:
        tail = "(no log)\n"
    body = (f"Job {job.id} ended {d['state']}" + (f": {d['reason']}" if d["reason"] else "") +
            f"\n\nScript:    {d['script']}\nDirectory: {d['cwd']}\n" +
            "".join(f"{k}={v}\n" for k, v in sorted(env.items())) +
            "\nLast lines of its log:\n\n" + tail)
    return send_mail(cfg, to, subject, body)


def run_hook(cfg, job, hook):
    """~/.config/dq/on-end with the job's JSON on stdin, in a process group
    of its own, with DQ_JOB_ID set: what is left of it after it exits or
    after cfg.timeout is killed."""
    import subprocess
    env = dict(clean_env(), DQ_JOB_ID=job.id)
    data = json.dumps(job.to_dict(), indent=1).encode()
    try:
        p = subprocess.Popen([hook], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True, env=env,
                             cwd=job.spec.get("cwd") if os.path.isdir(job.spec.get("cwd", ""))
                             else "/")
    except OSError as e:
        return {"error": f"cannot run {hook}: {e.strerror}"}
    try:
        _, err = p.communicate(data, timeout=cfg.timeout)
        why = None if p.returncode == 0 else \
            f"{hook} exited with status {p.returncode}: " + \
            (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
    except subprocess.TimeoutExpired:
        why = f"{hook} did not finish within {fmt_duration(cfg.timeout)}; killed"
    except OSError as e:
        why = f"{hook}: {e.strerror}"
    stop_processes(job.id, p.pid, cfg.kill_grace)
    p.wait()
    return {"error": why} if why else {"ran": time.time()}


def record_notify(job, record):
    """Add to the job's notify.json (its end's mail and hook; the idle mail
    of GpuWatch, written while it runs)."""
    path = os.path.join(job.dir, "notify.json")
    try:
        old = read_json(path, {}, {})
        write_json(path, dict(old if isinstance(old, dict) else {}, **record))
    except OSError as e:
        warn(f"cannot write {path}: {e.strerror}")


def notify_end(cfg, job):
    """Mail and hook for an ended job, each within cfg.timeout; failures go
    to the job's notify.json (and a warning)."""
    job._end = None
    record = {}
    try:
        record["mail"] = send_end_mail(cfg, job)
    except Exception as e:      # whatever smtplib or the network says
        record["mail"] = {"error": f"{type(e).__name__}: {e}".strip()}
    hook = hook_path(job.owner)
    if hook:
        record["hook"] = run_hook(cfg, job, hook)
    record = {k: v for k, v in record.items() if v}
    if record:
        record_notify(job, record)
    for what, r in record.items():
        if r.get("error"):
            warn(f"{job.id}: {what} failed: {r['error']}")


def cmd__notify(cfg, argv):
    """Internal: the notifications of an ended job (see notify_end)."""
    internal_args(argv, "_notify JOB_ID", "run by dq when a job ends",
                  (full_job_id,))
    job = resolve_job(cfg, argv[0])
    if job.owner != me():
        raise Failure(f"refusing to notify of {job.id}: not a job of {me()}")
    if not job.end:
        raise Failure(f"job {job.id} has not ended")
    notify_end(cfg, job)
    return 0


# Slurm bookkeeping ###########################################################

# With backend = slurm, what dq keeps up to date itself: jobs Slurm dropped
# (slurm_reconcile: its owner's dq-jobs, dq-wait, dq-schedule), dependents of
# a job run again, the views' hosts and placements, and the batch step on the
# node (cmd__slurm), which runs dq's wrapper.

def slurm_reconcile(cfg):
    """The caller's jobs that Slurm no longer has, but whose end dq has not
    recorded: a job that never ran ends `cancelled` (its DQ_AFTER job
    failed, or Slurm or an admin cancelled it), one that ran ends `lost`
    (its node or its wrapper died; DQ_REQUEUE runs it again).  Returns how
    many of the caller's jobs are still queued or running."""
    user = me()
    mine = active_ids(cfg, user)
    if not mine:
        return 0
    # Each job's Slurm ID before squeue, its end and run after: a job whose
    # sbatch answers while squeue runs has no ID here yet (not judged, not
    # "dropped"), and one that ends meanwhile has its end.json by the time
    # Slurm forgets it.
    sids = [(job_id, slurm_id(cfg, job_id)) for job_id in mine]
    seen = squeue_jobs(cfg, user)
    left = 0
    for job_id, sid in sids:
        job = load_job(cfg, job_id, quiet=True)
        if job is None:
            continue
        if job.end:
            drop_from_index(cfg, job_id)
            continue
        if sid is None or sid in seen:
            left += 1
            continue
        job._run = None         # it may have started since we looked
        if job.run:
            again = requeue(cfg, job)
            reason = (f"its Slurm job {sid} ended without dq's wrapper recording an end "
                      f"(its node died, or Slurm killed it)")
            if record_end(cfg, job, "lost", reason + (f"; requeued as {again}" if again else
                                                      ""), requeued_as=again):
                notify_later(cfg, job)
        else:
            why = slurm_out_tail(job)
            dep = next((d for d in job.spec.get("after", [])
                        if final_state(cfg, d)[0] not in (None, "done")), None)
            reason = (f"dependency {dep} ended {final_state(cfg, dep)[0]}" if dep else
                      f"Slurm dropped its job {sid} before it ran" +
                      (f": {why}" if why else " (scancel?)"))
            if record_end(cfg, job, "cancelled", reason):
                notify_later(cfg, job)
        drop_from_index(cfg, job_id)
    return left


def slurm_cancel(cfg, job):
    """scancel a dq job's Slurm job (after dq-kill recorded its end); its
    Result.  (dq-kill --grace asks the job's wrapper, as with ssh.)"""
    sid = slurm_id(cfg, job.id)
    if sid is None:
        return Result(SLURM_HOST, 0, "", "", 0.0)
    return slurm_call(cfg, ["scancel", sid])


def need_hosts(cfg):
    """Commands that ssh to every host (dq-users, dq-on-all, dq-web): on
    Slurm without a hosts line in dq.conf, the hosts are Slurm's nodes."""
    if is_slurm(cfg) and cfg.slurm_nodes_as_hosts:
        cfg.hosts = sorted(slurm_nodes(cfg), key=lambda n: [
            int(t) if t.isdigit() else t for t in re.split(r"([0-9]+)", n)])
        cfg.slurm_nodes_as_hosts = False


def slurm_places(cfg):
    """dq's running jobs on Slurm as placements ({job_id: {host, gpus,
    user, state}}), from their run.json, for the views that show who holds
    which GPU (there is no placements.json on Slurm)."""
    places = {}
    for job_id in active_ids(cfg):
        job = load_job(cfg, job_id, quiet=True)
        if job is not None and job.run and not job.end and job.run.get("host"):
            places[job_id] = {"host": job.run["host"], "gpus": job.run.get("gpus", []),
                              "user": job.owner, "state": Placements.RUNNING}
    return places


def slurm_move_dependents(cfg, job_id, again):
    """A job run again (DQ_RETRY, DQ_RESUME) as `again`: its owner's
    Slurm jobs that wait on its Slurm job (DQ_AFTER) wait on the new one's
    instead, before its batch step ends (and Slurm would count them as
    never satisfied).  Other users' jobs cannot be changed by us: Slurm
    cancels those, and the README says so."""
    old, new = slurm_id(cfg, job_id), slurm_id(cfg, again)
    if not old or not new:
        return
    res = slurm_call(cfg, ["squeue", "-h", "-u", me(), "-t", "PD", "-o", "%i|%E"])
    for line in res.out.splitlines() if res.ok else []:
        sid, _, deps = line.strip().partition("|")
        conds = [re.sub(r"\(.*?\)", "", d) for d in deps.split(",") if d and d != "(null)"]
        if not any(re.search(rf"[:]{re.escape(old)}(?=$|:)", d) for d in conds):
            continue
        moved = ",".join(re.sub(rf"(?<=:){re.escape(old)}(?=$|:)", new, d) for d in conds)
        res2 = slurm_call(cfg, ["scontrol", "update", f"jobid={sid}", f"dependency={moved}"])
        if not res2.ok:
            warn(f"cannot make Slurm job {sid} wait on {again} instead of {job_id}: "
                 f"{res2.why()}")


# How long dq-shell --now gives Slurm to start its job (a scheduler's tick
# or two) before it counts as "no GPU now"
SLURM_NOW_WAIT = 3


def cmd__slurm(cfg, argv):
    """Internal: the batch step of a dq job on Slurm's node.  Runs dq's
    wrapper in a screen session (screen -D -m: it stays in the foreground,
    so Slurm's job lasts as long as the session) with the GPUs Slurm gave."""
    array = argv[:1] == ["--array"]
    internal_args(argv[1:] if array else argv, "_slurm [--array] JOB_ID",
                  "the batch script of a dq job on Slurm", (full_job_id,))
    job_id = argv[-1]
    if array:
        listing = read_json(os.path.join(cfg.job_dir(job_id), SLURM_ARRAY), {}, {})
        index = whole_number(os.environ.get("SLURM_ARRAY_TASK_ID", ""))
        jobs = listing.get("jobs") if isinstance(listing, dict) else None
        if index is None or not isinstance(jobs, list) or index >= len(jobs):
            raise Failure(f"{job_id}: no job for array task "
                          f"{os.environ.get('SLURM_ARRAY_TASK_ID')!r} in its {SLURM_ARRAY}")
        job_id = jobs[index]
    host = os.environ.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0]
    # The GPUs' indexes as nvidia-smi counts them (SLURM_JOB_GPUS; with
    # ConstrainDevices, CUDA_VISIBLE_DEVICES counts from 0 in the job's
    # cgroup, and the wrapper passes that on to the script as it is).
    # (a job of shards, DQ_MEM, has no SLURM_JOB_GPUS: its GPU is CUDA's)
    gpus = os.environ.get("SLURM_JOB_GPUS") or os.environ.get("SLURM_STEP_GPUS") or (
        os.environ.get("CUDA_VISIBLE_DEVICES", "") if os.environ.get("SLURM_SHARDS_ON_NODE")
        else "")
    if not re.fullmatch(r"([0-9]+(,[0-9]+)*)?", gpus):
        gpus = ""
    env = clean_env()
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    argv = ["screen", "-DmS", session_name(job_id)] + \
        dq_argv(cfg.python, "_run", job_id, host, gpus, "-")
    debug(shlex.join(argv))
    # scancel's TERM is for the job (its wrapper records the end), not us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        pid = os.posix_spawnp("screen", argv, env, setsigdef=(signal.SIGTERM,))
    except OSError as e:
        raise Failure(f"cannot start screen on {host}: {e.strerror}") from None
    os.waitpid(pid, 0)
    # Slurm's view of how it ended, for its dependencies (afterok): done or not
    end = read_json(os.path.join(cfg.job_dir(job_id), "end.json"), {}, {}) or {}
    return 0 if end.get("state") == "done" else 1


# Scheduling ##################################################################

class PassResult:
    def __init__(self):
        self.launched = []      # (job_id, host, gpus)
        self.failed = []        # (job_id, host, why)
        self.polls = {}
        self.my_waiting = False     # does any job of the caller wait for GPUs?
        self.my_running = 0
        self.outside_busy = True    # GPUs busy that only a poll can see freed
        self.deps_waiting = 0       # jobs of the caller waiting on others' ends


def recent_usage(cfg, now, users):
    """{user: decayed GPU-seconds} for fair share's tie-break, from each
    user's counter file (read only where fair share may need it)."""
    if cfg.order != "fairshare" or len(users) < 2:
        return {}
    out = {}
    for user in users:
        counters = stored_counters(cfg, user)
        out[user] = decayed(counters, now, cfg.fairshare_halflife) if counters else 0.0
    return out


def plan_pass(cfg, places, polls, now, drained):
    """A pass's decision (a Plan), under the lock: plan() on the queue as
    its names say, then each placed job's entry read to check that it is
    still queued; one that is not is left out, and the plan made again."""
    left_out, usage = set(), None
    reserved = reserved_by_host(places)
    gpu_free = any(st.free(reserved.get(h, ())) for h, st in polls.items()) or \
        any("mem" in p for p in places.values())    # room on a shared GPU, maybe
    while True:
        queues, cpu = read_queues(cfg, set(places) | left_out)
        if usage is None:       # fair share's tie-break: only when a GPU is free
            usage = recent_usage(cfg, now, list(queues)) if gpu_free else {}
        decided = plan(queues, cpu, polls, places, now, cfg, drained, places.silent, usage)
        gone = {job_id for job_id, _, _ in decided.placed
                if queued_entry(cfg, places, job_id) is None}
        if not gone:
            return decided
        left_out |= gone


def busy_outside_dq(polls, places):
    """Is any GPU busy that dq did not hand out, or any host unknown?  If
    not, only the end of a dq job can free a GPU, and that end hands it over
    itself: a loop need not poll for it."""
    reserved = reserved_by_host(places)
    for h, st in polls.items():
        if st.error or any(g.busy() and g.index not in reserved.get(h, ()) for g in st.gpus):
            return True
    return False


def surely_stopped(cfg, job, polls):
    """May a lost job's end be recorded (and a copy of it queued)?  Only
    once nothing of it can run: a kill on its host went through, or its
    lease stopped lost_after ago (its wrapper fenced it well before; see
    Placements), or it never started."""
    host = job.run.get("host")
    if not host:
        return True
    reachable = host in polls and polls[host].reachable
    if reachable and kill_on_host(cfg, job, host).ok:
        return True
    age = lease_age(cfg, job.id, time.time())
    if age is None:         # a wrapper of an older dq, without a lease
        return not reachable
    return age >= lease_times(cfg).lost


def tidy_own_jobs(cfg, job_ids, polls):
    """The owner's part of a job's end that others could not do: record a
    lost job's end (and requeue it if DQ_REQUEUE asks), kill what is left of
    it where its host answers, drop index entries."""
    for job_id in job_ids:
        job = load_job(cfg, job_id, quiet=True)
        if job is None:
            continue
        lost = job.lost_marker()
        if lost and not job.end:
            if not surely_stopped(cfg, job, polls):
                continue        # a later pass of ours, once it is
            again = requeue(cfg, job)
            reason = lost.get("reason", "lost") + (f"; requeued as {again}" if again else "")
            if record_end(cfg, job, "lost", reason, requeued_as=again):
                notify_later(cfg, job)
                if again:
                    print(f"{job.id} was lost ({lost.get('reason')}); requeued as {again}",
                          file=sys.stderr)
            elif again:         # its real end came in meanwhile: no second run
                copy = load_job(cfg, again, quiet=True)
                if copy is not None:
                    record_end(cfg, copy, "cancelled", f"{job.id} ended after all")
                drop_from_index(cfg, again)
        drop_from_index(cfg, job_id)


def dependencies_verdict(cfg, entry):
    """For a job waiting on DQ_AFTER / DQ_AFTER_ANY (its jobs/active entry):
    ('wait', the job it waits on), ('go', None), or ('cancel', why)."""
    for dep in entry.get("after", []):
        state, last = final_state(cfg, dep)
        if state is None:
            return "wait", dep
        if state != "done":
            return "cancel", f"dependency {dep} ended {state}" + (
                f" (as {last})" if last != dep else "")
    for dep in entry.get("after_any", []):
        if final_state(cfg, dep)[0] is None:
            return "wait", dep
    return "go", None


def release_dependents(cfg):
    """The owner's passes: each of their jobs that waits on others either
    joins the queue (its dependencies ended as it asked) or ends
    `cancelled` without running (one ended otherwise), and so do, in turn,
    the jobs waiting on it.  Returns how many still wait."""
    user = me()
    for _ in range(100):        # a cancel may release or cancel others: go on
        waiting, changed = 0, False
        names = user_queue_names(cfg, user) or []
        candidates = [n.split("_", 1)[0] + "-" + user for n in names
                      if n.endswith("w") and QUEUE_NAME_RE.match(n)]
        for job_id in candidates:
            path = cfg.p("jobs", "active", job_id)
            info = read_json(path, None, False, skip_newer=True)
            if not info or bad_field(info, INDEX_FIELDS) or not info.get("waiting") or \
                    not owns_entry(path, job_id):
                continue
            verdict, what = dependencies_verdict(cfg, info)
            if verdict == "wait":
                waiting += 1
                continue
            changed = True
            if verdict == "go":
                rewrite_entry(cfg, job_id, {k: v for k, v in info.items() if k != "waiting"})
            else:
                job = load_job(cfg, job_id, quiet=True)
                if job is not None and record_end(cfg, job, "cancelled", what):
                    notify_later(cfg, job)
                drop_from_index(cfg, job_id)
                print(f"{job_id} cancelled: {what}", file=sys.stderr)
        if not changed:
            return waiting
    return waiting


def launch_line(cfg, job_id, host, gpus, share):
    """The shell command that starts a job in a detached screen session on
    its host, or '# why not' for a job that cannot run.  share: a sharing
    job's (MiB booked, share of a GPU), or None."""
    job = load_job(cfg, job_id)
    if job is None or job.end:
        # Never runnable (a forged or broken job.json) or over: out of the
        # queue for good, or every pass would place it again.
        drop_from_index(cfg, job_id)
        return "# " + ("its job.json is missing or not yours" if job is None
                       else "it already ended")
    # The wrapper writes the log itself (see run_in_pty), so screen needs
    # no log settings and its version does not matter.
    return (f"screen -dmS {q(session_name(job_id))} "
            f"{dq_command(cfg, '_run', job_id, host, ','.join(map(str, gpus)), share_arg(share))}")


def launch_all(cfg, jobs, res):
    """Start [(job_id, host, gpus, share)] claimed for us, one remote
    command per host, and record what started; the others go back to the
    queue."""
    crash_point("launch-claimed")
    why = {}
    per_host = {}
    for job_id, host, gpus, share in jobs:
        line = launch_line(cfg, job_id, host, gpus, share)
        if line.startswith("#"):
            why[job_id] = line[2:] + "; it leaves the queue"
        else:
            per_host.setdefault(host, []).append((job_id, line))
    hosts = list(per_host)
    scripts = ["cd / || exit 1\n" + "".join(f'{line}; echo "@@{job_id} $?"\n'
                                            for job_id, line in per_host[h]) for h in hosts]
    for h, r in zip(hosts, run_scripts(cfg, list(zip(hosts, scripts)))):
        started = dict(re.findall(r"^@@(\S+) (\d+)$", r.out, re.M))
        for job_id, _ in per_host[h]:
            if started.get(job_id) == "0":
                why[job_id] = None
            elif not r.ok or job_id not in started:
                why[job_id] = r.why() if not r.ok else "no answer from screen"
            else:
                why[job_id] = r.why() if r.err.strip() else \
                    f"screen failed (exit status {started[job_id]})"
    crash_point("launch-started")
    for job_id, host, gpus, _ in jobs:
        if why[job_id] is None:
            res.launched.append((job_id, host, gpus))
        else:
            res.failed.append((job_id, host, why[job_id]))
    # A started job's placement stays 'launching' until a pass sees its
    # session ('running'): no second hold of the lock per launch.
    if res.failed:
        with Placements.locked(cfg) as places:
            for job_id, host, why_not in list(res.failed):
                if os.path.exists(os.path.join(cfg.job_dir(job_id), "run.json")):
                    # it started after all (its ssh answered late): a pass
                    # confirms it, or judges it by its lease
                    res.failed.remove((job_id, host, why_not))
                    continue
                places.drop(job_id, unstarted=True)     # back to the queue
    for job_id, host, reason in res.failed:
        warn(f"could not start {job_id} on {host}: {reason}"
             + ("" if reason.endswith("queue") else "; it stays queued"))
    if res.failed:
        touch_wake(cfg, me())


def schedule_pass(cfg, polls=None, launch_only=False, retiring=None, decided=None):
    """One scheduling pass: poll all hosts (no lock held), decide under the
    lock (in memory, a few small files), then start the caller's own jobs
    that got GPUs.  Other users' placed jobs are started by their own
    dq-schedule loop, woken through state/wake-<user>.  `launch_only`: no
    poll, no decision, just start what others placed for us.  retiring: an
    ended job whose GPUs to free first (in the same hold of the lock);
    decided(): called once the decision is saved, before the launches."""
    ensure_layout(cfg)
    user = me()
    res = PassResult()
    if not launch_only:
        res.deps_waiting = release_dependents(cfg)
    res.polls = {} if launch_only else polls if polls is not None else poll_hosts(cfg)
    drained = () if launch_only else read_drains(cfg, quiet=polls is not None)
    now = time.time()
    with Placements.locked(cfg) as places:
        if retiring:
            places.drop(retiring)
        if not launch_only:
            reconcile(cfg, places, res.polls, now)
            # No job goes to a drained host, nor to one whose last poll
            # (anyone's, over ssh) failed, whatever this pass's poll said.
            chosen = plan_pass(cfg, places, res.polls, now, drained)
            for job_id, host, gpus in chosen.placed:
                places.assign(job_id, host, gpus, now, chosen.shares.get(job_id),
                              res.polls[host].started)
        mine = places.claim(user, now)
        others = places.unclaimed_users()
    if decided:
        decided()
    if not launch_only:
        res.outside_busy = busy_outside_dq(res.polls, places)
    for other in others:
        touch_wake(cfg, other)
    if mine:
        launch_all(cfg, mine, res)
    places = Placements.read(cfg)
    stale = []
    assigned, res.my_running = places.counts(user)
    # Whether any of ours still waits; the first one found answers it.
    res.my_waiting = bool(assigned) or \
        next(read_queue(cfg, places, stale, user=user), None) is not None
    tidy_own_jobs(cfg, [j for j in stale if j.endswith("-" + user)], res.polls)
    if not launch_only:
        sync_own_queue(cfg)     # for the next pass
    kill_leftovers(cfg, res.polls, user)
    return res


def loop_lock(cfg):
    """Held by this user's dq-schedule loop: one loop per user."""
    return Lock(cfg.p("sched", me() + ".lock"), mode=0o644)


def scheduler_running(cfg):
    lock = loop_lock(cfg)
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def spawn_scheduler(cfg):
    """Make sure this user's dq-schedule loop runs (in the background)."""
    spawn_detached("start dq-schedule", "schedule", "--quiet")


def schedule_loop(cfg, forever=False, quiet=False):
    """Keep placing queued jobs while this user has jobs queued or running
    (or for ever).  Between passes it sleeps until state/wake-<user> changes
    (a job of ours was placed) or poll_interval passes (GPUs freed by
    processes outside dq; watch_interval when none of ours waits, to notice
    dead hosts).  One loop per user: sched/<user>.lock."""
    ensure_layout(cfg)
    lock = loop_lock(cfg)
    if not lock.acquire(blocking=False):
        touch_wake(cfg, me())   # the running loop takes it from here
        return 0
    wake = wake_file(cfg, me())
    woken, last_full, outside_busy, interval = False, 0.0, True, cfg.poll_interval
    deps_waiting = 0
    try:
        while True:
            seen = _mtime(wake)
            try:
                # Woken: another pass placed jobs of ours, so start them;
                # polling every host again would only find what it found
                # (but a full pass at least every interval, see below).
                quick = woken and time.monotonic() - last_full < interval
                if not quick:
                    last_full = time.monotonic()
                res = schedule_pass(cfg, launch_only=quick)
            except Failure as e:        # e.g. a stuck lock: retry, do not die
                warn(str(e))
                time.sleep(cfg.poll_interval)
                continue
            except OSError as e:        # e.g. a full data root: the same
                warn(data_root_error(cfg.root, e))
                time.sleep(cfg.poll_interval)
                continue
            if not quiet:
                say_executing(res.launched)
            if not res.my_waiting and not res.my_running and not forever:
                break
            # Waiting jobs: poll often for GPUs freed outside dq (when some
            # are held outside dq).  Else poll now and then, to notice a
            # host that died.
            if not quick:
                outside_busy = res.outside_busy
                deps_waiting = res.deps_waiting
            # (a job waiting on another's end learns of it at our next pass)
            interval = cfg.poll_interval if res.my_waiting and (outside_busy or deps_waiting) \
                else cfg.watch_interval
            started, queue_seen = time.monotonic(), _mtime(cfg.p("jobs", "active"))
            deadline = started + interval
            while time.monotonic() < deadline and _mtime(wake) == seen:
                time.sleep(0.01)        # two opens: cheap, even on NFS
                if _mtime(cfg.p("jobs", "active")) != queue_seen:
                    # A job was queued (dq-submit found nothing free and ran
                    # no pass): back to polling every poll_interval.
                    deadline = min(deadline, started + cfg.poll_interval)
            woken = _mtime(wake) != seen
    finally:
        lock.release()
    if _mtime(wake) != seen:    # something arrived while we decided to stop
        spawn_scheduler(cfg)
    return 0


def slurm_loop(cfg, quiet=False):
    """dq-schedule with backend = slurm: no placing (Slurm's), only the
    owner's bookkeeping (slurm_reconcile) every watch_interval while they
    have jobs queued or running."""
    ensure_layout(cfg)
    lock = loop_lock(cfg)
    if not lock.acquire(blocking=False):
        return 0
    try:
        while True:
            try:
                if not slurm_reconcile(cfg):
                    return 0
            except (Failure, OSError) as e:
                if not quiet:
                    warn(str(e))
            time.sleep(cfg.watch_interval)
    finally:
        lock.release()


def cmd_schedule(cfg, argv):
    p = parser("schedule", "Place queued jobs on free GPUs until none of yours is left "
               "waiting.\ndq-submit starts it in the background for you when a job has to "
               "wait;\nonly one runs per user.  Admins may run it as a service with "
               "--forever.")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--forever", action="store_true", help="never exit (service mode)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = parse(p, argv)
    if is_slurm(cfg):           # Slurm places; dq only keeps its books
        return slurm_loop(cfg, quiet=args.quiet) if not args.once else \
            (slurm_reconcile(cfg) and 0)
    if args.once:
        res = schedule_pass(cfg)
        if not args.quiet:
            say_executing(res.launched)
        return 0
    return schedule_loop(cfg, forever=args.forever, quiet=args.quiet)


# GPU use (sampled by each job's wrapper) #####################################

# Every sample_interval seconds (dq.conf; 0: never) the wrapper of a job
# with GPUs asks nvidia-smi, on its own host (no ssh), what the job's
# processes use of its GPUs and how busy those are, and keeps it in the
# job's gpu.json: the last samples, the peaks and the sums for means
# (GPU_USE_FIELDS).  A sharing job (DQ_MEM) over its booking (see
# over_booking) is flagged there and in its log, and with mem_overuse =
# kill stopped: TERM, KILL after kill_grace, ended failed with the reason.
# It counts idle GPU-seconds too (idle_gpu_s): each of its GPUs that a
# sample finds at 0% utilisation counts idle for the time since the last
# sample.  0% whether or not a process of the job holds the GPU: a job
# that loaded CUDA and waits (a context open, no kernel running) wastes
# the GPU as much as one that never touched it.
#
# A job is flagged idle (gpu.json's `idle`, from `idle_since`, the sample
# that began the stretch) once all its GPUs have been at 0% utilisation
# with no process of the job on them for idle_after (dq-shell's:
# shell_idle_after) -- stricter than idle_gpu_s: a job holding a CUDA
# context may be between phases (loading data, writing a checkpoint, a
# breakpoint), and idle_kill must not stop it for that.  Flagged, it gets
# a line in its log and one mail (DQ_MAIL; once per job, a failure goes to
# notify.json); with idle_kill it is stopped that much later (TERM, KILL
# after kill_grace) and ends `killed` with the reason.  A sample with any
# use, or a GPU whose utilisation nvidia-smi does not say, ends the stretch.
SMI_UTIL_QUERY = ("nvidia-smi --query-gpu=index,uuid,utilization.gpu "
                  "--format=csv,noheader,nounits")
GPU_USE_KEEP = 6        # samples kept in gpu.json

class GpuWatch:
    """The sampling thread of a job's wrapper (see the section's comment)."""

    def __init__(self, cfg, job, gpus, booked, log, host=None):
        self.cfg, self.job_id, self.gpus, self.booked, self.log = cfg, job.id, gpus, booked, log
        self.job, self.host = job, host
        self.path = os.path.join(job.dir, "gpu.json")
        self.pgid = None
        self.stopped = False
        self.killed = None      # the reason, once dq stopped the job (mem_overuse, idle_kill)
        self.kill_state = "failed"      # how it then ends
        # idle_after, or shell_idle_after for a dq-shell (the key, seconds; 0: never)
        self.idle_key = "shell_idle_after" if job.spec.get("interactive") else "idle_after"
        self.idle_after = getattr(cfg, self.idle_key)
        self.mailed = False     # the idle mail, once per job
        self.use = {"at": time.time(), "samples": 0, "booked_mib": booked, "mem_mib": None,
                    "peak_mem_mib": 0, "mem_sum": 0, "util": None, "util_sum": 0,
                    "util_peak": 0, "last": [], "over": None, "idle_gpu_s": 0,
                    "idle": False, "idle_since": None}
        self._ours = {}         # pid -> is it one of the job's processes?

    def start(self, pgid):
        self.pgid = pgid
        if self.gpus and self.cfg.sample_interval > 0:
            # Imported here, once the job runs (no start-up cost), and not in
            # the thread: the first import of threading (subprocess's) makes
            # its importer Python's "main thread", whose end the wrapper's
            # exit would then wait for, up to sample_interval
            # (bpo-1596321).
            import subprocess
            _thread.start_new_thread(self._loop, (subprocess,))

    def stop(self):
        self.stopped = True

    def _loop(self, subprocess):
        while not self.stopped:
            time.sleep(self.cfg.sample_interval)
            if self.stopped:
                break
            try:
                got = self.sample(subprocess)
            except (OSError, ValueError, subprocess.SubprocessError):
                got = None      # nvidia-smi failed this time: the next sample
            if got and not self.stopped:
                self.record(*got)

    def mine(self, pid):
        """Is pid the job's (job_owns)?  Asked once per PID."""
        if pid not in self._ours:
            try:
                self._ours[pid] = job_owns(self.job_id, self.pgid, pid)
            except OSError:
                self._ours[pid] = False
        return self._ours[pid]

    def sample(self, subprocess):
        """(MiB the job uses on the one of its GPUs where it uses most, or
        None if nvidia-smi does not say; the mean utilisation of its GPUs;
        how many of them are at 0%; whether a process of the job is on one
        of them)."""
        t = smi_timeout(self.cfg)

        def smi(cmd):
            return subprocess.run(cmd.split(), capture_output=True, text=True, timeout=t,
                                  check=True).stdout
        util, uuids = {}, {}
        for line in smi(SMI_UTIL_QUERY).splitlines():
            f = [x.strip() for x in line.split(",")]
            if len(f) == 3 and whole_number(f[0]) in self.gpus:
                uuids[f[1]] = int(f[0])
                util[int(f[0])] = whole_number(f[2])
        mem, held = dict.fromkeys(self.gpus, 0), False
        for uuid, pid, used in parse_smi_apps(smi(SMI_APPS)):
            if uuid in uuids and pid is not None and self.mine(pid):
                held = True
                if used is None:
                    mem = None
                elif mem is not None:
                    mem[uuids[uuid]] += used
        known = [u for u in util.values() if u is not None]
        return (max(mem.values()) if mem else None,
                round(sum(known) / len(known)) if known else None,
                sum(1 for u in known if u == 0), held)

    def idle_check(self, unused, now):
        """Bring gpu.json's idle flag up to date with a sample (unused: all
        the job's GPUs at 0%, no process of the job on them).  'flag' when
        the job has just become idle, 'kill' once idle_kill is due, else
        None."""
        use = self.use
        if not self.idle_after or not unused:
            use["idle"], use["idle_since"] = False, None
            return None
        if use.get("idle_since") is None:
            use["idle_since"] = now
        idle_for = now - use["idle_since"]
        if idle_for < self.idle_after:
            return None
        if not use["idle"]:
            use["idle"] = True
            return "flag"
        if self.cfg.idle_kill and idle_for >= self.idle_after + self.cfg.idle_kill:
            return "kill"
        return None

    def mail_idle(self):
        """The owner's mail (DQ_MAIL) that the job went idle; what went
        wrong goes to notify.json as `idle_mail` (see notify_end)."""
        try:
            to = mail_address(self.cfg, self.job.spec.get("env", {}), self.job.owner)
            if not to:
                return
            kill = f" dq stops it in {fmt_duration(self.cfg.idle_kill)} if it stays idle " \
                f"(idle_kill).\n" if self.cfg.idle_kill else ""
            where = f"{self.host or '?'}/{fmt_gpus(self.gpus)}"
            result = send_mail(
                self.cfg, to, f"dq: {self.job_id} idle on {where}",
                f"Job {self.job_id} ({self.job.spec.get('script')}) has held GPU {where} "
                f"for {fmt_duration(self.idle_after)} without using it: 0% utilisation and "
                f"no process of the job on it ({self.idle_key} in {self.cfg.path}).\n"
                f"Others may be waiting for it: dq-kill {self.job_id} if it is of no "
                f"use.\n" + kill)
        except Exception as e:      # whatever smtplib or the network says
            result = {"error": f"{type(e).__name__}: {e}".strip()}
        record_notify(self.job, {"idle_mail": result})
        if result.get("error"):
            warn(f"{self.job_id}: idle mail failed: {result['error']}")

    def record(self, mem, util, idle=0, held=False, now=None):
        use, now = self.use, time.time() if now is None else now
        # idle since the last sample (at most a few intervals: a host that
        # slept or a stalled nvidia-smi is no evidence of idling)
        since = min(max(0.0, now - use["at"]), 3 * max(1, self.cfg.sample_interval))
        use["idle_gpu_s"] = round(use.get("idle_gpu_s", 0) + idle * since, 1)
        use["at"], use["samples"] = now, use["samples"] + 1
        use["mem_mib"], use["util"] = mem, util
        if mem is not None:
            use["peak_mem_mib"] = max(use["peak_mem_mib"], mem)
            use["mem_sum"] += mem
        if util is not None:
            use["util_peak"] = max(use["util_peak"], util)
            use["util_sum"] += util
        use["last"] = (use["last"] + [[round(now), mem, util]])[-GPU_USE_KEEP:]
        over = self.booked and mem is not None and over_booking(mem, self.booked)
        if over and not use["over"]:
            use["over"] = {"at": now, "mem_mib": mem}
            msg = (f"\ndq: {self.job_id} uses {fmt_mib(mem)} of GPU memory, over its "
                   f"DQ_MEM={fmt_mib(self.booked)}" +
                   ("; stopping it (mem_overuse = kill)\n" if self.cfg.mem_overuse == "kill"
                    else "; its neighbours on the GPU may run out of memory\n")).encode()
            self.log.write(msg)
            _write_all(2, msg)
        elif over:
            use["over"]["mem_mib"] = max(use["over"]["mem_mib"], mem)
        idle_now = self.idle_check(idle == len(self.gpus) and not held, now)
        if idle_now == "flag":
            msg = (f"\ndq: {self.job_id}: idle: its GPUs have been at 0% with no process of "
                   f"it on them for {fmt_duration(now - use['idle_since'])} "
                   f"({self.idle_key} {fmt_duration(self.idle_after)})" +
                   (f"; stopping it in {fmt_duration(self.cfg.idle_kill)} (idle_kill)"
                    if self.cfg.idle_kill else "") + "\n").encode()
            self.log.write(msg)
            _write_all(2, msg)
        try:
            write_json(self.path, use, durable=False, compact=True)
        except OSError:
            pass        # a full data root: the next sample tries again
        if idle_now == "flag" and not self.mailed and self.job.spec.get("env", {}).get("DQ_MAIL"):
            self.mailed = True      # in a thread of its own: the samples go on
            _thread.start_new_thread(self.mail_idle, ())
        if idle_now == "kill" and self.killed is None:
            self.end_job("killed", f"idle: no GPU use for {fmt_duration(now - use['idle_since'])} "
                                f"({self.idle_key} {fmt_duration(self.idle_after)} + idle_kill "
                                f"{fmt_duration(self.cfg.idle_kill)})")
        if over and self.cfg.mem_overuse == "kill" and self.killed is None:
            self.end_job("failed", f"used {fmt_mib(mem)} of GPU memory, "
                                f"DQ_MEM={fmt_mib(self.booked)}; stopped by dq (mem_overuse = kill)")

    def end_job(self, state, reason):
        """End the job for what the samples showed: it ends `state`, with
        `reason` (see cmd__run)."""
        self.kill_state, self.killed = state, reason
        stop_processes(self.job_id, self.pgid, self.cfg.kill_grace)


# What a failed job's last lines say when CUDA ran out of memory: one entry
# per framework (its name, a pattern of its message), tried in order.
OOM_PATTERNS = [
    ("PyTorch", r"(?:torch\.(?:cuda\.)?OutOfMemoryError|RuntimeError): CUDA (?:error: )?out of "
                r"memory"),
    ("TensorFlow", r"ResourceExhaustedError\b.*\bOOM\b"),
    ("JAX", r"RESOURCE_EXHAUSTED: Out of memory"),
]
OOM_TAIL = 65536        # bytes of the log's end searched


def cuda_oom(log_path):
    """The framework whose CUDA out-of-memory error ends the log, or None."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - OOM_TAIL))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return next((name for name, pattern in OOM_PATTERNS if re.search(pattern, tail)), None)


# Job wrapper (runs inside the screen session) ################################

def job_env(job, gpus, deadline=None):
    """What the job runs with: ours without dq's variables, then its DQ_*
    variables, its GPUs, DQ_JOB_ID and DQ_DEADLINE (the epoch second of its
    time limit, rounded down; empty without one).  On Slurm the GPUs are
    CUDA_VISIBLE_DEVICES as Slurm set it (it may count from 0 in the job's
    cgroup)."""
    env = clean_env()
    for k in list(env):
        if k.startswith("DQ_"):
            del env[k]
    slurm_cuda = env.get("CUDA_VISIBLE_DEVICES") if is_slurm(job.cfg) and gpus else None
    env.update(job.spec.get("env", {}))
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"   # else CUDA counts fastest first
    env["CUDA_VISIBLE_DEVICES"] = slurm_cuda or ",".join(map(str, gpus))
    env["DQ_JOB_ID"] = job.id
    env["DQ_DEADLINE"] = str(int(deadline)) if deadline else ""
    if job.spec.get("snapshot"):    # it runs in its copy: where results may go instead
        env["DQ_SUBMIT_DIR"] = job.spec["cwd"]
    return env


class JobLog:
    """The job's log file: what cannot be written (a full data root) is
    counted, and said in one line once there is room again."""

    def __init__(self, fd):
        self.fd, self.lost, self.why = fd, 0, None

    def write(self, data):
        if self.lost and not self.flush_lost(raise_=False):
            self.lost += len(data)
            return
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            if e.errno in SPACE_ERRORS:
                self.lost += len(data)
                self.why = "no space on device" if e.errno == errno.ENOSPC \
                    else "disk quota exceeded"
            # else: the log is gone (removed by hand): nothing to keep

    def flush_lost(self, raise_=True):
        """Write the line about lost output, if any; False if it could not."""
        if not self.lost:
            return True
        line = f"\ndq: {self.lost:,} bytes of output lost: {self.why}\n".encode()
        try:
            written = os.write(self.fd, line)
        except OSError:
            if raise_:
                raise
            return False
        if written < len(line):     # a torn line: say it whole next time
            if raise_:
                raise OSError(errno.ENOSPC, "no space left on device")
            return False
        self.lost = 0
        return True

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def hand_over(cfg, host, gpus, job_id, shared=False):
    """At a job's end, on its host: place the next jobs on the GPUs it freed
    at once, polling this host alone, locally, and start ours here without
    ssh; other users' loops are woken for theirs.  Free GPUs elsewhere are
    the loops' business.  Our loop is started if we still have jobs.
    (shared: the job shared its GPUs, which others still holding them says
    nothing of the room it freed: always a pass.)

    Jobs that end together on a host take turns, and one whose GPUs the
    pass of another already gave out again polls nothing (it only starts
    what was placed for its user): a wave of ends costs a poll or two of
    the host, not one per job.  A turn ends once the pass has decided,
    before its launches.  The ended job's GPUs are freed by the same pass
    (job_id: its placement goes)."""
    global LOCAL_HOST
    LOCAL_HOST = host
    turn = Lock(cfg.p("state", f"handover-{host}.lock"), timeout=cfg.timeout)
    try:
        turn.acquire()
        others = {k: p for k, p in Placements.read(cfg).items() if k != job_id}
        if gpus and not shared and set(gpus) <= reserved_by_host(others).get(host, set()):
            res = schedule_pass(cfg, launch_only=True, retiring=job_id, decided=turn.release)
        else:
            res = schedule_pass(cfg, poll_handover(cfg, host), retiring=job_id,
                                decided=turn.release)
    except Failure as e:
        warn(str(e))
        res = None
    except OSError as e:        # a full data root: the loops carry on later
        warn(data_root_error(cfg.root, e))
        res = None
    finally:
        turn.release()
    if (res is None or res.my_waiting or res.my_running) and not scheduler_running(cfg):
        spawn_scheduler(cfg)


def next_run(cfg, job, state, checkpointed):
    """At a job's end, the run after it, if any: (its ID, 'resume' or
    'retry') when DQ_RESUME (it exited 75: checkpointed) or DQ_RETRY (it
    failed) queued one, else (None, None).  An exit 75 with no resume left
    is a failure like any other, which DQ_RETRY may retry."""
    if checkpointed:
        again = run_again(cfg, job, "resume")
        if again:
            return again, "resume"
    if state == "failed":
        again = run_again(cfg, job, "retry")
        if again:
            return again, "retry"
    return None, None


def until_room(attempt, saying, give_up=lambda: False, errors=(OSError,)):
    """attempt() again and again, backing off to every 10 s, while it
    raises one of `errors` (a full data root): the wrapper's writes that
    must not fail, its session living on meanwhile, so that no pass finds
    it gone.  The first failure is said once on stderr (the screen window):
    saying(error) -> the line.  Returns attempt()'s result, or None once
    give_up() says so after a failure."""
    delay, said = 0.5, False
    while True:
        try:
            return attempt()
        except errors as e:
            if give_up():
                return None
            if not said:
                said = True
                _write_all(2, f"dq: {saying(e)}\n".encode())
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def record_end_until_done(cfg, job, lease, log, state, reason, code, sig, host,
                          checkpointed=False):
    """record_end (and the new job of DQ_RESUME or DQ_RETRY, see next_run)
    as the job ended, trying again, backing off, while the data root is
    full: the session stays, the lease is renewed (a utime needs no space),
    so no pass counts it lost.  A job resumed ends `resumed`.  True if this
    wrote the end, False if it had one (dq-kill's), None if the lease
    failed meanwhile (the data root is gone from this host)."""
    again, kind, asked = None, None, False
    ended = time.time()     # recorded as it happened, however late

    def attempt():
        nonlocal again, kind, asked, state
        log.flush_lost()
        # (not after a dq-kill: it writes end.json before it kills)
        if not asked and not os.path.exists(os.path.join(job.dir, "end.json")):
            again, kind = next_run(cfg, job, state, checkpointed)
        asked = True
        why = reason
        if kind == "resume":
            state, why = "resumed", f"{reason}; resumed as {again}"
        elif kind == "retry":
            why = f"{reason}; retried as {again}"
        # The next job first; the fsync and the count can wait until it runs.
        return record_end(cfg, job, state, why, code, sig, host, durable=False,
                          requeued_as=again, ended=ended)
    return until_room(attempt, lambda e: f"cannot record the end of {job.id} ({e.strerror}); "
                                         f"trying again until there is room in {cfg.root}",
                      lease.stopped_by_dq)


class Lease:
    """The wrapper's side of the job's lease (see Leases): a thread renews
    it, and a watchdog thread, which touches no shared file (a hung data
    root must not hang it), stops the job once the lease is `term`
    seconds old, or at once when dq counts the job lost or killed."""

    def __init__(self, cfg, job):
        self.cfg, self.job_id, self.times = cfg, job.id, lease_times(cfg)
        self.path = lease_path(cfg, job.id)
        self.lost_marker = cfg.p("jobs", "lost", job.id)
        self.end_path = os.path.join(job.dir, "end.json")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        os.utime(self.path)
        self.renewed = time.monotonic()     # start of the last renewal that worked
        self.error = None
        self.revoked = None     # why dq wants the job stopped now
        self.killed = False     # ... because a dq-kill recorded it killed
        self.fenced = None      # why the watchdog stopped it
        self.pgid = None
        self.pending = None     # (path, data): run.json with the job's pgid, not yet written
        self.stopped = False
        # dq-kill --grace: called once when the job's grace.json appears
        # (TimeLimit.notice), for a dq-kill that could not poke us over ssh
        self.on_request = None
        self.request_path = os.path.join(job.dir, GRACE_FILE)
        # _thread, not threading: importing threading would cost every job
        # ~3 ms before it starts
        _thread.start_new_thread(self._renew, ())

    def start(self, pgid):
        self.pgid = pgid
        _thread.start_new_thread(self._watch, ())

    def stop(self):
        """No more renewals or watching (the threads end at their next wake-up)."""
        self.stopped = True

    def stopped_by_dq(self):
        """Did the watchdog stop the job (lease, or dq counting it lost)?"""
        return self.fenced is not None and not self.killed

    def _renew(self):
        while not self.stopped:
            t0 = time.monotonic()
            try:
                os.utime(self.path)
                self.renewed, self.error = t0, None
                if self.pending:
                    try:
                        write_json(*self.pending)
                        self.pending = None
                    except OSError:
                        pass
                if os.path.exists(self.lost_marker):
                    self.revoked = "dq counts it as lost"
                elif os.path.exists(self.end_path) and \
                        (read_json(self.end_path, {}, {}) or {}).get("state") == "killed":
                    self.revoked, self.killed = "killed by dq-kill", True
                if self.on_request and os.path.exists(self.request_path):
                    on_request, self.on_request = self.on_request, None
                    on_request()
            except OSError as e:
                self.error = e.strerror
            time.sleep(self.times.renew)

    def _watch(self):
        kill_at = None
        while not self.stopped:
            time.sleep(WATCHDOG_PERIOD)
            now = time.monotonic()
            silent = now - self.renewed
            if kill_at is None and (self.revoked or silent >= self.times.term):
                self.fenced = self.revoked or (
                    f"its lease in {os.path.dirname(self.path)} could not be renewed for "
                    f"{silent:.0f}s ({self.error or 'no answer'})")
                signal_all(job_processes(self.job_id, self.pgid), signal.SIGTERM)
                kill_at = now + (self.cfg.kill_grace if self.revoked
                                 else self.times.kill - silent)
            elif kill_at is not None and now >= kill_at:
                signal_all(job_processes(self.job_id, self.pgid), signal.SIGKILL)

    def give_up(self, log):
        """The watchdog stopped the job: it is lost, not ended.  Say so in
        the log and a lost marker if the data root takes them (then the
        owner's pass records the end and requeues it), and quit: the
        session goes, and a pass that sees it gone counts the job lost."""
        msg = f"dq: {self.job_id}: stopped by dq: {self.fenced}\n".encode()
        _write_all(2, msg)
        said = _thread.allocate_lock()
        said.acquire()

        def say():      # in a thread: on a hung data root it hangs, not us
            if self.revoked is None:
                log.write(msg)
                mark_lost(self.cfg, Job(self.cfg, self.job_id, {}, me()),
                          f"stopped on its host: {self.fenced}")
            log.close()
            said.release()
        _thread.start_new_thread(say, ())
        said.acquire(timeout=max(self.times.renew * 2, 2.0))
        self.stop()
        return 1


class TimeLimit:
    """The wrapper's clock for stopping a job: its time limit (job.json's
    time_limit, from DQ_TIME or time_limit), with DQ_SIGNAL's warning
    `lead` seconds before it, and a dq-kill --grace (the job's grace.json).
    Each stops the job the same way: the warning signal, TERM, then KILL
    kill_grace later, to every process of the job (job_processes).

    A dq-kill --grace sends the warning now (DQ_SIGNAL's signal; TERM for a
    job without one) and TERM once the grace runs out (KILL, if the warning
    was TERM), never later than the time limit would; the job then ends
    `killed`, however it ends.  The warning goes out once: after a grace's,
    the limit's is not sent again."""

    def __init__(self, job, grace, started):
        self.job_id, self.limit, self.grace = job.id, job.spec.get("time_limit"), grace
        self.request_path = os.path.join(job.dir, GRACE_FILE)
        self.warning = warning_signal(job.spec)
        # DQ_DEADLINE: the limit as the time of day, from run.json's start
        self.deadline = started + self.limit if self.limit else None
        self.pgid = None
        self.hit = False            # the limit's TERM went out: it ends `timeout`
        self.stopped_by = None      # a dq-kill --grace's reason: it ends `killed`
        self.asked = False          # grace.json may be there: read it
        self.warn_at = self.term_at = self.kill_at = None

    def start(self, pgid):
        self.pgid = pgid
        now = time.monotonic()
        if self.deadline is not None:
            self.term_at = now + max(0.0, self.deadline - time.time())
            if self.warning and self.warning[1]:
                self.warn_at = max(now, self.term_at - self.warning[1])

    def notice(self):
        """dq-kill --grace asked (the poke's handler, or the lease thread):
        the next check reads grace.json.  Sets a flag, nothing more."""
        self.asked = True

    def _send(self, sig):
        signal_all(job_processes(self.job_id, self.pgid), sig)

    def _take_request(self, now):
        """Act on grace.json once: the warning now, TERM (or KILL) later."""
        if self.stopped_by or self.hit or self.pgid is None:
            return      # already being stopped (then it ends as that says)
        request = read_job_file(self.request_path, GRACE_FIELDS, None,
                                "dq ignores it; dq-kill the job again")
        if not request:
            return
        self.stopped_by = request["reason"]
        sig = self.warning[0] if self.warning else signal.SIGTERM
        self.warn_at = None         # the warning goes out once
        self._send(sig)
        end = now + request["grace"]
        if sig == signal.SIGTERM:   # TERM was the warning: KILL ends the grace
            limit_kill = None if self.term_at is None else self.term_at + self.grace
            self.term_at, self.kill_at = None, min(end, limit_kill or end)
        else:
            self.term_at = min(end, self.term_at or end)

    def check(self):
        """Called now and then by run_in_pty while the job runs."""
        now = time.monotonic()
        if self.asked:
            self.asked = False
            self._take_request(now)
        if self.warn_at is not None and now >= self.warn_at:
            self.warn_at = None
            self._send(self.warning[0])
        if self.term_at is not None and now >= self.term_at:
            self.hit = self.stopped_by is None
            self.term_at, self.kill_at = None, now + self.grace
            self._send(signal.SIGTERM)
        elif self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self._send(signal.SIGKILL)

    def finish(self):
        """After the script's exit: what it left (setsid children that
        ignore TERM) gets the rest of the grace period, then KILL.  A job
        stopped by dq-kill --grace that exited before its TERM leaves
        nothing either: what is left gets TERM now, KILL kill_grace later
        (not at the end of a long grace: its GPUs wait for this)."""
        if self.stopped_by:
            if self.kill_at is None:
                self._send(signal.SIGTERM)
            self.kill_at = min(self.kill_at or math.inf, time.monotonic() + self.grace)
        if self.kill_at is not None:
            kill_stragglers(self.job_id, self.pgid, self.kill_at)
            self.kill_at = None


def _spawn_on_tty(argv, cwd, env, tty):
    """fork and exec argv in cwd as the leader of a new session whose
    controlling terminal is `tty`, as its stdin, stdout and stderr.  (Not
    subprocess: importing it would cost the job ~5 ms before it starts.)
    An exec that fails raises OSError here, through a close-on-exec pipe."""
    import termios
    rd, wr = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rd)
            os.setsid()
            fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(tty, fd)
            # What Python ignores, the job gets back (as subprocess does)
            for name in ("SIGPIPE", "SIGXFSZ"):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        except OSError as e:
            os.write(wr, str(e.errno).encode())
        finally:
            os._exit(127)
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        err = f.read()
    if err:
        os.waitpid(pid, 0)
        raise OSError(int(err), os.strerror(int(err)), argv[0])
    return pid


def _copy_winsize(src, dst):
    import termios
    try:
        fcntl.ioctl(dst, termios.TIOCSWINSZ, fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        pass


def run_in_pty(argv, cwd, env, log, started, timer=None):
    """Run the job on a pty of its own and copy what it writes, byte for
    byte, to the log file (unbuffered: current to the byte for dq-tail) and
    to our terminal, the screen window.  The job sees a terminal (line
    buffered output, stdout and stderr interleaved in order); its pty does
    not turn \n into \r\n, so the log holds exactly what the job wrote.
    Keys typed in dq-attach are passed through, Ctrl-C included.  Returns
    the exit status as Popen does (negative: killed by that signal)."""
    import pty
    import select
    import termios
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    interactive = os.isatty(0)
    saved = None
    if interactive:
        _copy_winsize(0, master)
        saved = termios.tcgetattr(0)
        raw = termios.tcgetattr(0)
        raw[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
        raw[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        termios.tcsetattr(0, termios.TCSANOW, raw)   # output processing stays on
        signal.signal(signal.SIGWINCH, lambda *a: _copy_winsize(0, master))

    try:
        pid = _spawn_on_tty(argv, cwd, env, slave)
    finally:
        os.close(slave)
    started(pid)        # the job's process group, for dq-kill
    if timer:
        timer.start(pid)
    inputs = [master] + ([0] if interactive else [])
    drain_until = status = None
    try:
        # Readable once the job has exited: a job that closes its terminal
        # and runs on (`exec >file 2>&1`) is waited for here, its time
        # limit and dq-kill --grace still checked.
        exited = os.pidfd_open(pid)
    except (AttributeError, OSError):       # Python < 3.9, Linux < 5.3
        exited = None
    try:
        while True:
            if timer and drain_until is None:
                timer.check()
            if drain_until is None:
                ended, status = os.waitpid(pid, os.WNOHANG)
                if ended:
                    # The job is over; what it left in the pty is copied,
                    # but a leftover child that keeps writing does not hold us.
                    drain_until = time.monotonic() + 1
            done = drain_until is not None
            try:
                ready, _, _ = select.select(inputs, [], [], 0.01 if done else 0.5)
            except InterruptedError:
                continue
            if done and (not ready or time.monotonic() > drain_until or master not in inputs):
                break
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:     # EIO: every writer closed the pty
                    data = b""
                if not data:
                    # All copied: what is left is to wait for the exit
                    # (no fixed drain time between the job and the next).
                    if exited is None:
                        break
                    inputs = [exited]
                    continue
                log.write(data)
                _write_all(1, data)
            if 0 in ready:
                try:
                    keys = os.read(0, 4096)
                except OSError:
                    keys = b""
                if keys:
                    _write_all(master, keys)
                else:
                    inputs.remove(0)
        if drain_until is None:
            status = os.waitpid(pid, 0)[1]
        return os.waitstatus_to_exitcode(status)
    finally:
        if saved is not None:
            try:
                termios.tcsetattr(0, termios.TCSANOW, saved)
            except termios.error:
                pass
        os.close(master)
        if exited is not None:
            os.close(exited)


# A launch this long after the poll that found its GPUs free (an owner's loop
# slow to come round, a slow ssh, a pass waiting on a hung host) may find a
# GPU taken by hand since: the wrapper looks again before an exclusive job
# starts.
LATE_LAUNCH = 1.0


def held_by_others(cfg, host, gpus):
    """On the job's host, before it starts: {gpu: [pid, ...]} of those of
    its GPUs a process holds (none of them is the job's yet).  A host whose
    nvidia-smi fails says nothing new: {} (the pass's poll said free)."""
    global LOCAL_HOST
    LOCAL_HOST = host
    try:
        st = poll_handover(cfg, host)[host]
    except (Failure, OSError) as e:     # (a run.json is written: the job must not die here)
        warn(f"cannot look at the GPUs of {host}: {e}")
        return {}
    return {} if st.error else {g.index: g.pids for g in st.gpus if g.index in gpus and g.apps}


def held_by_others_words(taken):
    """{2: [812]} -> '2 (PID 812)'."""
    return ", ".join(f"{g} (PID {', '.join(map(str, pids))})" for g, pids in sorted(taken.items()))


def back_to_queue(cfg, job_id, host, gpus):
    """A wrapper that did not start its job gives its placement up (the job
    is queued again), trying until the data root takes it: its session
    lives on meanwhile, so no pass finds it gone and counts the job lost."""
    def give_back():
        with Placements.locked(cfg) as places:
            p = places.get(job_id) or {}
            if (p.get("host"), p.get("gpus")) == (host, gpus):
                places.drop(job_id, unstarted=True)
    until_room(give_back, lambda e: f"cannot give the GPUs of {job_id} back yet ({e}); "
                                    f"trying again", errors=(Failure, OSError))


def cmd__run(cfg, argv):
    """Internal: the process screen runs for a job.  It runs the script as a
    child, renews the job's lease meanwhile (stopping the job if it cannot),
    records how it ended (trying again until the data root takes it), frees
    the GPUs and wakes the scheduler."""
    if len(argv) == 3:      # launched by a dq of before GPU sharing: exclusive
        argv = argv + ["-"]
    internal_args(argv, "_run JOB_ID HOST GPUS [SHARE]", "started by dq-schedule in the "
                  "job's screen session", (full_job_id, HOST_RE.fullmatch,
                                           re.compile(r"([0-9]+(,[0-9]+)*)?").fullmatch,
                                           SHARE_ARG_RE.fullmatch))
    job_id, host, gpu_csv, share = argv[0], argv[1], argv[2], parse_share_arg(argv[3])
    job = resolve_job(cfg, job_id)      # a broken job.json: its warning is the error
    if job.owner != me():
        raise Failure(f"refusing to run {job_id}: not a job of {me()}")
    if job.end:     # killed while it was being launched
        return 0
    gpus = [int(g) for g in gpu_csv.split(",") if g != ""]
    run = {"host": host, "gpus": gpus, "pid": os.getpid(), "pgid": os.getpgrp(),
           "started": time.time(), "grace": True}
    if share:
        run.update(mem=share[0], share=share[1])
    gpu_type = seen_gpu_type(cfg, host, gpus)
    if gpu_type:
        run["gpu_type"] = gpu_type
    run_json = os.path.join(job.dir, "run.json")
    lease = None

    def begin():
        nonlocal lease
        lease = lease or Lease(cfg, job)    # before run.json: a job that runs has a lease
        write_json(run_json, run, durable=False)     # durable once the job runs, below
    # A full data root: the job waits for room (its output would be lost),
    # its session living on -- a wrapper that died here would leave a
    # session a pass may have seen vanish with neither run.json nor
    # end.json: a job counted lost that never ran.
    until_room(begin, lambda e: f"cannot start {job_id} yet ({data_root_error(cfg.root, e)}); "
                                f"trying again until there is room")
    # Then the placement must still be this one: a launch whose ssh hung
    # may come through long after it timed out and the job went back to
    # the queue (and maybe elsewhere).  run.json first, then this read:
    # see Placements._restore_started.
    p = Placements.read(cfg).get(job_id) if not is_slurm(cfg) else {
        "host": host, "gpus": gpus, "state": Placements.RUNNING}   # Slurm's placing

    def withdraw():
        for path in (run_json, lease.path):
            try:
                os.unlink(path)
            except OSError:
                pass
        lease.stop()
    if not p or (p["host"], p["gpus"], p["state"]) not in (
            (host, gpus, Placements.LAUNCHING), (host, gpus, Placements.RUNNING)):
        withdraw()
        warn(f"not starting {job_id} on {host}: it is no longer placed here (its launch "
             f"came through after dq gave up on it)")
        return 0
    taken = not share and gpus and time.time() - p.get("polled", time.time()) > LATE_LAUNCH \
        and held_by_others(cfg, host, gpus)
    if taken:
        withdraw()
        back_to_queue(cfg, job_id, host, gpus)
        said = f"dq: {job_id}: not started on {host}: GPU {held_by_others_words(taken)}, " \
               f"taken since dq placed it; back to the queue\n"
        try:
            with open(job_log(job), "ab") as f:
                f.write(said.encode())
        except OSError:     # a full data root: the screen window still says it
            _write_all(2, said.encode())
        if scheduler_running(cfg):
            touch_wake(cfg, me())
        else:
            spawn_scheduler(cfg)
        return 0

    def on_start(pgid):
        lease.start(pgid)
        watch.start(pgid)
        try:
            write_json(run_json, dict(run, pgid=pgid))
        except OSError:         # a full data root: the job runs all the same,
            lease.pending = (run_json, dict(run, pgid=pgid))    # written once there is room
    # Signals for the job (dq-kill's TERM, screen's HUP) must not kill the
    # wrapper before it records the end; handlers reset on exec.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, lambda *a: None)
    # dq-kill --grace: its poke, or the lease thread seeing grace.json
    timer = TimeLimit(job, cfg.kill_grace, run["started"])
    signal.signal(POKE, lambda *a: timer.notice())
    lease.on_request = timer.notice
    script, cwd = run_paths(cfg, job)     # (DQ_SNAPSHOT: in its snapshot)
    log = JobLog(os.open(job_log(job), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    watch = GpuWatch(cfg, job, gpus, share and share[0], log, host)
    state, code, sig, reason, checkpointed = "failed", None, None, None, False
    if not os.path.isdir(cwd):
        reason = f"working directory {cwd} does not exist on {host}"
    elif not os.access(script, os.X_OK):
        reason = f"{script} is not executable on {host}"
    else:
        try:
            rc = run_in_pty([script] + job.spec.get("args", []), cwd,
                            job_env(job, gpus, timer.deadline), log, on_start, timer)
            # Exit 75 asks DQ_RESUME for another run (also in answer to the
            # time limit's TERM: it saved a checkpoint in kill_grace), not
            # when dq stopped it for going over its DQ_MEM.
            checkpointed = rc == RESUME_EXIT
            if rc < 0:
                sig = signal.Signals(-rc).name
                code, reason = 128 - rc, f"killed by {sig}"
            else:
                code = rc
                state = "done" if rc == 0 else "failed"
                reason = None if rc == 0 else f"exit status {rc}"
            watch.stop()
            if timer.stopped_by:
                timer.finish()
                state, reason = "killed", f"{timer.stopped_by} " \
                    f"({reason or 'it exited with status 0'})"
            elif timer.hit:
                timer.finish()
                state, reason = "timeout", f"time limit {fmt_duration(timer.limit)} " \
                    f"reached ({reason or 'it exited with status 0'})"
            elif watch.killed:
                state, reason, checkpointed = watch.kill_state, watch.killed, False
            elif state == "failed" and gpus:
                oom = cuda_oom(job_log(job))
                if oom:
                    reason = f"CUDA out of memory ({oom}), {reason}" + (
                        f"; a larger DQ_MEM may help (it booked {fmt_mib(share[0])})"
                        if share else "")
        except OSError as e:
            reason = f"cannot execute {script}: {e.strerror}"
    if lease.stopped_by_dq():
        return lease.give_up(log)
    if reason:
        msg = f"dq: {job_id}: {reason}\n".encode()
        log.write(msg)
        _write_all(2, msg)
    ours = record_end_until_done(cfg, job, lease, log, state, reason, code, sig, host,
                                 checkpointed)
    if ours is None:
        return lease.give_up(log)
    if not ours and timer.pgid:
        # dq-kill's TERM ended the script: what it left, dq-kill is stopping
        # on this host too, and the GPUs wait for that (see dying)
        stop_processes(job.id, timer.pgid, cfg.kill_grace)
    again = job.end.get("requeued_as") if ours and is_slurm(cfg) else None
    if again:       # its dependents follow the new run (see slurm_move_dependents)
        slurm_move_dependents(cfg, job.id, again)
    log.close()
    drop_from_index(cfg, job.id)
    if not is_slurm(cfg):       # (on Slurm, Slurm hands the GPUs over)
        hand_over(cfg, host, gpus, job.id, bool(share))
    lease.stop()
    if ours:
        finish_end(cfg, job)
    if wants_notice(cfg, job):
        notify_end(cfg, job)    # after the hand-over: it never delays the next job
    return 0


# Submitting ##################################################################

def gpu_inventory(hosts):
    """'4 x NVIDIA A100-SXM4-80GB (80 GB) on node1; ...': what the cluster
    has, for a refusal to name."""
    kinds = {}
    for h, (gpus, _) in sorted(hosts.items()):
        for name, total in gpus:
            kinds.setdefault((name or "an unknown GPU", total), []).append(h)
    return "; ".join(
        f"{len(hs)} x {name}" + (f" ({round(total / 1024)} GB)" if total else "")
        + f" on {','.join(sorted(set(hs)))}" for (name, total), hs in kinds.items()) \
        or "no GPU"


def check_fits(cfg, hosts, want, need):
    """A job that no host can ever run (too many GPUs, or constraints that
    match no host or GPU of the cluster) is refused, not left waiting: the
    first constraint (in CONSTRAINTS' order) that leaves it nothing says
    so in its own words.  hosts: {host: ([(GPU name, MiB)], reachable)};
    need: job_needs()."""
    def refuse(text):
        raise Failure(text.format(words=describe_need(need),
                                  host_words=describe_need(need, hosts=True),
                                  hosts=" ".join(sorted(hosts)), want=want,
                                  inventory=gpu_inventory(hosts)))
    allowed = dict(hosts)
    for c in set_constraints(need):
        if c.host:
            allowed = {h: v for h, v in allowed.items() if c.host(need[c.key], h)}
            if not allowed:
                refuse(c.refusal)
    if want == 0:
        return
    def room(total):       # what a sharing job may book on a GPU
        return total - margin_mib(cfg, total) if total else 0
    ok = {h: [total for name, total in gpus if gpu_allowed(need, name, total)]
          for h, (gpus, reachable) in allowed.items() if reachable}
    down = sorted(h for h, (_, reachable) in allowed.items() if not reachable)
    best = max(map(len, ok.values()), default=0)
    if best >= want and "mem" in need and not any(
            sum(room(t) >= need["mem"] for t in totals) >= want for totals in ok.values()):
        most = max(sorted(map(room, totals))[-want] for totals in ok.values()
                   if len(totals) >= want)
        raise Failure(f"DQ_MEM={fmt_mib(need['mem'])} is more than a job may book on any GPU "
                      f"of the cluster: share_margin keeps part of each free, and the most "
                      f"is {fmt_mib(most)}; ask for less with DQ_MEM")
    if best >= want:
        return
    if down:
        warn(f"no host that answered has {want} GPU(s) for this job; queued in case "
             f"{', '.join(down)} come(s) back")
        return
    where = "this machine" if cfg.local else "any host of the cluster"
    if not any(gpus for gpus, _ in hosts.values()):
        raise Failure(f"nvidia-smi finds no GPU on {where}; to run a CPU-only job "
                      f"submit it with DQ_GPUS=0")
    if need:
        pool = [g for gpus, _ in allowed.values() for g in gpus]
        for c in set_constraints(need):
            if c.gpu:
                pool = [(name, total) for name, total in pool if c.gpu(need[c.key], name, total)]
                if not pool:
                    refuse(c.refusal)
        refuse(NO_GPU)
    raise Failure(f"no host has {want} GPUs (the most on one host is {best}); "
                  f"ask for fewer with DQ_GPUS")


def may_place_now(cfg, seen, want, need=None):
    """From the last polls (seen: hosts.json) and the reservations: could a
    pass place a job wanting `want` GPUs (0: CPU only; need: its
    constraints, of which a booking counts here) right now?"""
    if want == 0:
        return True
    places = Placements.read(cfg)
    if need and "mem" in need:
        polls = {h: seen_host(h, s) for h, s in seen.items() if s["ok"]}
        return any(pack(r, need["mem"], want, r) is not None
                   for r in share_rooms(polls, places, cfg, polls).values())
    reserved = reserved_by_host(places)
    return any(s["ok"] and s["gpus"] - len(set(s["busy"]) | reserved.get(h, set())) >= want
               for h, s in seen.items())


# Polls of the cluster this recent tell dq-submit whether to poll at all:
# GPUs that dq jobs free are handed over at once, and the loops poll for
# the others every poll_interval.
SUBMIT_POLL_MAX_AGE = 30


def plan_snapshots(cfg, script, cwd, jobs, snapshot):
    """Each job's `snapshot`: the one given (dq-restart's: the run restarted
    runs from its own again), or one SnapshotPlan of cwd for those with
    DQ_SNAPSHOT (listed and sized now, copied once by create_jobs)."""
    if snapshot is not None:
        for j in jobs:
            j["snapshot"] = snapshot
    elif any(j["snapshot"] for j in jobs):
        plan = SnapshotPlan(cfg, cwd, script)
        for j in jobs:
            j["snapshot"] = plan if j["snapshot"] else None


def submit_on_slurm(cfg, script, cwd, jobs, restart_of, sweep, snapshot):
    """submit_and_place with backend = slurm: write the jobs and sbatch
    them (create_jobs does both); Slurm starts them."""
    plan_snapshots(cfg, script, cwd, jobs, snapshot)
    ids = create_jobs(cfg, script, cwd, jobs, restart_of, sweep=sweep)
    for job_id in ids:
        print(f"Job ID: '{job_id}'", flush=True)
    sids = [slurm_id(cfg, job_id) for job_id in ids]
    arrays = sorted({s.split("_")[0] for s in sids if s})
    deps = len(ids) == 1 and (jobs[0]["after"] or jobs[0]["after_any"])
    print(f"{ids[0] if len(ids) == 1 else f'{len(ids)} jobs'} queued in Slurm as "
          f"{'job' if len(arrays) == 1 else 'jobs'} {', '.join(arrays)}" +
          ("; it starts when its dependencies have ended" if deps else "") +
          " (see dq-jobs queue)", file=sys.stderr)
    if not scheduler_running(cfg):      # its bookkeeping loop (slurm_loop)
        spawn_scheduler(cfg)
    return ids


def submit_and_place(cfg, script, cwd, envs, restart_of=None, sweep=False, snapshot=None):
    """Queue jobs (one per env; `sweep`: as one sweep) and start them at once
    where GPUs are free.  When the last polls (under 30 s old) show nothing
    free for them, submitting polls no host and runs no pass: the jobs just
    join the queue, and their owner's dq-schedule loop (or the end of a
    running job) places them.  Every job is checked before any is written.
    Those with DQ_SNAPSHOT share one snapshot of cwd, or `snapshot` (job.json's,
    dq-restart's: the run restarted runs from its own again)."""
    jobs = [prepare_job(cfg, env) for env in envs]
    ensure_layout(cfg)      # who may not use the data root learns it first
    if is_slurm(cfg):
        return submit_on_slurm(cfg, script, cwd, jobs, restart_of, sweep, snapshot)
    shapes = {(j["gpus"], need_shape(j["need"])): j for j in jobs}
    seen = cached_hosts(cfg, max(SUBMIT_POLL_MAX_AGE, 3 * cfg.poll_interval))
    queue_only = seen is not None and not any(
        may_place_now(cfg, seen, j["gpus"], j["need"]) for j in shapes.values())
    if queue_only:
        try:
            for j in shapes.values():
                check_fits(cfg, {h: (seen_models(s), s["reachable"]) for h, s in seen.items()},
                           j["gpus"], j["need"])
        except Failure:     # refused on old news (nvidia-smi failed then?): ask the hosts
            queue_only = False
    polls = None
    if not queue_only:
        polls = poll_hosts(cfg)
        for h, s in sorted(polls.items()):
            if s.error and (any(j["gpus"] for j in jobs) or not s.reachable):
                warn(f"{h}: {s.error}")
        for j in shapes.values():
            check_fits(cfg, {h: ([(g.name, g.total) for g in s.gpus], s.reachable)
                             for h, s in polls.items()}, j["gpus"], j["need"])
    plan_snapshots(cfg, script, cwd, jobs, snapshot)
    ids = create_jobs(cfg, script, cwd, jobs, restart_of, sweep=sweep)
    for job_id in ids:
        print(f"Job ID: '{job_id}'", flush=True)
    crash_point("submit-created")
    try:
        res = schedule_pass(cfg, polls) if polls is not None else None
    except OSError as e:        # the jobs are queued: the loop places them later
        if e.errno not in SPACE_ERRORS:
            raise
        warn(data_root_error(cfg.root, e))
        res = None
    started = {j: (h, g) for j, h, g in res.launched if j in ids} if res else {}
    places = Placements.read(cfg)   # another pass (our loop's) may have placed some
    for job_id in ids:
        if job_id not in started and job_id in places:
            started[job_id] = (places[job_id]["host"], places[job_id]["gpus"])
    say_executing([(job_id, *started[job_id]) for job_id in ids if job_id in started])
    waiting = [job_id for job_id in ids if job_id not in started]
    if len(waiting) == 1:
        job = jobs[ids.index(waiting[0])]
        print(f"{waiting[0]} is queued; it starts when " +
              ("its dependencies have ended" if job["after"] or job["after_any"]
               else "a GPU frees up") + " (see dq-jobs queue)", file=sys.stderr)
    elif waiting:
        print(f"{len(waiting)} jobs are queued; they start as GPUs free up (see dq-jobs "
              f"queue)", file=sys.stderr)
    if not scheduler_running(cfg):
        spawn_scheduler(cfg)
    return ids


MAX_SWEEP = 100_000
SWEEP_VARS = ("DQ_SWEEP", "DQ_SWEEP_INDEX")     # set by dq for a sweep's jobs


def check_sweep_var(name, where, example):
    if not re.fullmatch(r"DQ_[A-Za-z0-9_]+", name) or name in OWN_VARS + SWEEP_VARS:
        raise Failure(f"{where}: {name!r} is not a DQ_* variable a job may be given "
                      f"(not {', '.join(OWN_VARS[:4] + SWEEP_VARS)}); e.g. {example}")


def each_lines(path):
    """--each FILE: one {DQ_NAME: value} per line that is not blank or a #
    comment."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise Failure(f"--each {path}: " + (e.strerror if isinstance(e, OSError) else
                                            "not UTF-8 text")) from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise Failure(f"{where}: {e} in {line.strip()!r}") from None
        assigns = {}
        for word in words:
            name, eq, value = word.partition("=")
            if not eq:
                raise Failure(f"{where}: {word!r} is not a DQ_NAME=VALUE assignment; e.g. "
                              f"DQ_LR=0.1 DQ_DESC='run a'")
            check_sweep_var(name, where, "DQ_LR=0.1 DQ_DESC='run a'")
            assigns[name] = value
        if assigns:
            out.append(assigns)
    return out


def sweep_envs(base, grids, each):
    """The environments of a sweep's jobs: every line of the --each file
    (or none) with every combination of the --grid values, in that order;
    later ones win (--grid over the line over your environment)."""
    import itertools
    axes = []
    for grid in grids:
        name, eq, values = grid.partition("=")
        check_sweep_var(name, f"--grid {grid!r}", f"--grid {name or 'DQ_LR'}=0.1,0.01")
        if not eq or not values:
            raise Failure(f"--grid {grid!r}: give the values after '=', comma-separated, "
                          f"e.g. --grid {name}=0.1,0.01")
        axes.append([(name, v) for v in values.split(",")])
    lines = [{}] if each is None else each_lines(each)
    envs = [dict(base, **line, **dict(combo))
            for line in lines for combo in itertools.product(*axes)]
    if not envs:
        raise Failure(f"{each}: no job in it (each job is a line of DQ_NAME=VALUE "
                      f"assignments)")
    if len(envs) > MAX_SWEEP:
        raise Failure(f"that sweep is {len(envs)} jobs; at most {MAX_SWEEP} at once")
    return envs


def cmd_submit(cfg, argv):
    grids, each = [], None
    if len(argv) == 1 and not argv[0].startswith("-"):
        # The usual call, parsed without argparse, which would take a
        # quarter of a queued submit's time (import, gettext look-ups).
        path = argv[0]
    else:
        p = parser("submit", "Queue SCRIPT to run on a free GPU of the cluster, from the "
                   "current directory,\nwith CUDA_VISIBLE_DEVICES set and every DQ_* "
                   "variable of yours.\n\nDQ_GPUS=N asks for N GPUs on one host (0: a "
                   "CPU-only job); DQ_DESC=text is shown by dq-jobs.\nWith --grid or "
                   "--each, a sweep: one job per combination.")
        p.add_argument("--grid", action="append", default=[], metavar="DQ_NAME=V1,V2,...",
                       help="one job per value; several --grid multiply")
        p.add_argument("--each", metavar="FILE",
                       help="one job per line of FILE: DQ_NAME=VALUE assignments, shell "
                       "quoting; blank lines and # comments skipped")
        p.add_argument("script", help="the program to run (executable, e.g. a #! script)")
        args = parse(p, argv)
        path, grids, each = args.script, args.grid, args.each
    cwd = submit_cwd()
    script = check_script(path)
    env = {k: v for k, v in os.environ.items()
           if k.startswith("DQ_") and k not in OWN_VARS + SWEEP_VARS}
    if not grids and each is None:
        submit_and_place(cfg, script, cwd, [env])
    else:
        submit_and_place(cfg, script, cwd, sweep_envs(env, grids, each), sweep=True)
    return 0


# Steering jobs: kill, restart, hold, release, top, wait ######################

def retire(cfg, job):
    """Take an ended job out of the active index and free its GPUs."""
    drop_from_index(cfg, job.id)
    with Placements.locked(cfg) as places:
        places.drop(job.id)


def grace_seconds(text):
    """dq-kill --grace DUR: '5m', '90s', '300' -> seconds."""
    try:
        return duration("--grace", text, "--grace")
    except Failure:
        raise Failure(f"--grace {text!r} is not a duration above 0; e.g. --grace 5m, "
                      f"--grace 90s or --grace 300") from None


def stop_with_grace(cfg, job, grace):
    """dq-kill --grace on a running job: ask its wrapper (grace.json, then a
    poke over ssh, so that it acts at once) to send the job's warning now
    and stop it when the grace runs out (TimeLimit).  The wrapper records
    the end (`killed`) and hands the GPUs over, as at any end: nothing here
    writes end.json or the placements, so the job still ends once, by one
    writer.  A host that does not answer: the wrapper finds grace.json at
    its next lease renewal."""
    if not job.run.get("grace"):
        print(f"{PROG}: error: {job.id} was started by a dq from before --grace, which "
              f"cannot warn it; dq-kill it without --grace", file=sys.stderr)
        return 1
    warning = (warning_signal(job.spec) or (signal.SIGTERM,))[0]
    then = "SIGKILL" if warning == signal.SIGTERM else "SIGTERM"
    path = os.path.join(job.dir, GRACE_FILE)
    try:
        write_json(path, {"grace": grace, "requested": time.time(),
                          "reason": f"dq-kill --grace {fmt_duration(grace)} by {me()}"},
                   exclusive=True)
    except FileExistsError:
        earlier = read_job_file(path, GRACE_FIELDS, {}, "dq-kill it without --grace")
        print(f"{PROG}: error: {job.id} is being stopped already "
              f"({earlier.get('reason') or 'dq-kill --grace'}); dq-kill it without --grace "
              f"to stop it now", file=sys.stderr)
        return 1
    host = job.run["host"]
    print(f"Stopping {job.id} on {host}: {warning.name} now, {then} in {fmt_duration(grace)}")
    r = poke_on_host(cfg, job, host) if job.run.get("pid") else None
    if r is None or not r.ok:
        warn(f"could not reach {host} to warn {job.id} now ({r.why() if r else 'no PID'}); "
             f"its wrapper sends {warning.name} within "
             f"{fmt_duration(lease_times(cfg).renew + 1)} if it can still read {cfg.root}")
        return 1
    if r.out.strip() != "ok":
        job._end = None
        print(f"{PROG}: error: {job.id} " + (
            f"ended meanwhile ({job.state()})" if job.end else
            f"has no wrapper on {host} any more; dq counts it lost once its lease runs out")
            + "; nothing was sent", file=sys.stderr)
        return 1
    return 0


def kill_job(cfg, job, grace=None, state="killed", reason="killed by dq-kill", say=print):
    """dq-kill: remove a queued job, or kill a running one (`grace`:
    seconds between its warning and its TERM, see stop_with_grace; a job
    not started yet has nothing to warn and goes at once).  state,
    reason: how it is recorded; say: where its progress lines go."""
    if grace is not None and job.state() == "running":
        return stop_with_grace(cfg, job, grace)

    def not_active():
        job._end = job._lost = None
        print(f"{PROG}: error: {job.id} is not active ({job.state()}); nothing to kill",
              file=sys.stderr)
        return 1
    if job.state() not in ("queued", "running"):
        return not_active()
    if is_slurm(cfg):
        if not record_end(cfg, job, state, reason, host=job.run.get("host")):
            return not_active()
        say(f"Removing {job.id} from the queue" if not job.run else
            f"Killing {job.id} on {job.run.get('host')} ...")
        r = slurm_cancel(cfg, job)
        drop_from_index(cfg, job.id)
        if not r.ok:
            warn(f"scancel of {job.id} (Slurm job {slurm_id(cfg, job.id)}) failed: "
                 f"{r.why()}; it is recorded killed, and its wrapper stops it")
        return 0 if r.ok else 1
    with Placements.locked(cfg) as places:
        place = places.get(job.id)
        # Recorded first: the wrapper then knows the end was a kill, and a
        # launch under way does not start the script.
        killed = record_end(cfg, job, state, reason,
                            host=(place or {}).get("host") or job.run.get("host"))
        placed_as = places.state(job.id)
    if not killed:          # it ended on its own meanwhile
        return not_active()
    crash_point("kill-recorded")
    if not job.run and placed_as in (None, Placements.ASSIGNED):
        say(f"Removing {job.id} from the queue")
        retire(cfg, job)
        return 0
    if not job.run and placed_as == Placements.LAUNCHING:
        # The launch's ssh may take `timeout`: wait that long at most for
        # the wrapper's run.json, so we know where its processes are.
        deadline = time.monotonic() + cfg.timeout
        while not job.run and time.monotonic() < deadline:
            time.sleep(0.1)
            job._run = None
    host = job.run.get("host") or place["host"]
    say(f"Killing {job.id} on {host} ...")
    r = kill_on_host(cfg, job, host)
    if not r.ok:
        warn(f"could not reach {host} to kill {job.id} ({r.why()}); it is recorded killed, "
             f"and its wrapper stops it within {fmt_duration(lease_times(cfg).renew + 1)} "
             f"if it can still read {cfg.root}")
    retire(cfg, job)
    return 0 if r.ok else 1


RESTART_FAILED = ("failed", "timeout", "lost", "cancelled")


def cmd_restart(cfg, argv):
    p = parser("restart", "Queue finished jobs again: same script, working directory "
               "and DQ_* variables, new job IDs.")
    id_arguments(p)
    p.add_argument("--failed", action="store_true",
                   help="only those that did not end done or killed (failed, timeout, "
                   "lost, cancelled)")
    args = parse(p, argv)
    jobs = resolve_jobs(cfg, args)
    for job in jobs:
        require_owner(job, "restart")
    if args.failed:
        jobs = [job for job in jobs if job.state() in RESTART_FAILED]
        if not jobs:
            print("No failed job among them")
            return 0
    for job in jobs:
        state = job.state()
        if state in ("queued", "running"):
            raise Failure(f"job {job.id} is {state}; only a finished job can be restarted "
                          f"(dq-kill it first)")
        if job.spec.get("interactive"):
            raise Failure(f"job {job.id} was a dq-shell; start a new one with dq-shell")
        snap = job.spec.get("snapshot")
        if snap and not os.path.isdir(snapshot_dir(cfg, snap)):
            raise Failure(f"job {job.id} ran from a snapshot that is gone "
                          f"({snapshot_dir(cfg, snap)}); dq-submit it again to take a new one")
    # Dependencies on jobs restarted here go to their new runs.
    again = {}
    for job in sorted(jobs, key=lambda j: j.n):
        # (not DQ_SWEEP: the new run is a job of its own, and mails as one)
        env = {k: v for k, v in job.spec.get("env", {}).items() if k not in SWEEP_VARS}
        for var in ("DQ_AFTER", "DQ_AFTER_ANY"):
            if env.get(var):
                env[var] = ",".join(again.get(full_id(cfg, i), i)
                                    for i in env[var].split(",") if i.strip())
        # (the same snapshot, if it had one: the code it ran, not today's)
        again[job.id] = submit_and_place(cfg, job.spec["script"], job.spec["cwd"], [env],
                                         restart_of=job.id,
                                         snapshot=job.spec.get("snapshot"))[0]
    return 0


def cmd_kill(cfg, argv):
    p = parser("kill", "Remove a queued job from the queue, or kill a running one: every "
               "process it\nstarted, its screen session; its GPUs are freed.\n\n"
               "With --grace DUR a running job is warned first: its DQ_SIGNAL's signal\n"
               "goes to it now and SIGTERM DUR later (without DQ_SIGNAL: SIGTERM now,\n"
               "SIGKILL DUR later), so it can save a checkpoint and exit.  It ends killed.")
    id_arguments(p)
    p.add_argument("--grace", metavar="DUR",
                   help="warn running jobs now and stop them DUR later (5m, 90s, 300)")
    args = parse(p, argv)
    grace = grace_seconds(args.grace) if args.grace is not None else None
    jobs = resolve_jobs(cfg, args)
    for job in jobs:
        require_owner(job, "kill")
    status = 0
    for job in jobs:
        status |= kill_job(cfg, job, grace)
    spawn_scheduler(cfg)
    return status


def set_held(cfg, jobs, held):
    """dq-hold / dq-release: the job's jobs/active entry (its owner's file)
    says `held`, rewritten under the global lock, so that no pass decides
    on the old entry after it."""
    verb = "hold" if held else "release"
    for job in jobs:
        require_owner(job, verb)
    status = 0
    for job in jobs:
        path = cfg.p("jobs", "active", job.id)
        with Placements.locked(cfg) as places:
            info = read_json(path, None, False) if job.state() == "queued" else None
            if not info or job.id in places:
                why = "already starting" if job.id in places else job.state()
                print(f"{PROG}: error: {job.id} is {why}; only a queued job can be "
                      f"{'held' if held else 'released'}", file=sys.stderr)
                status = 1
                continue
            if bool(info.get("held")) == held:
                print(f"{job.id} is {'already held' if held else 'not held'}")
                continue
            rewrite_entry(cfg, job.id, dict(info, held=True) if held else
                          {k: v for k, v in info.items() if k != "held"})
        if is_slurm(cfg) and slurm_id(cfg, job.id):
            res = slurm_call(cfg, ["scontrol", verb, slurm_id(cfg, job.id)])
            if not res.ok:
                rewrite_entry(cfg, job.id, info)
                print(f"{PROG}: error: scontrol {verb} {job.id}: {res.why()}", file=sys.stderr)
                status = 1
                continue
        print(f"{'Holding' if held else 'Releasing'} {job.id}")
    return status


def cmd_hold(cfg, argv):
    p = parser("hold", "Keep queued jobs of yours from starting until dq-release lets "
               "them go.")
    id_arguments(p)
    return set_held(cfg, resolve_jobs(cfg, parse(p, argv)), True)


def cmd_release(cfg, argv):
    p = parser("release", "Let held jobs of yours start again (see dq-hold); they keep "
               "their place in the queue.")
    id_arguments(p)
    status = set_held(cfg, resolve_jobs(cfg, parse(p, argv)), False)
    if not scheduler_running(cfg):
        spawn_scheduler(cfg)
    return status


def _entry_top(cfg, job_id):
    info = read_json(cfg.p("jobs", "active", job_id), {}, {})
    top = info.get("top", 0) if isinstance(info, dict) else 0
    return top if is_int(top, 0, 10 ** 15) else 0


def cmd_top(cfg, argv):
    p = parser("top", "Move queued jobs of yours to the front of your own jobs, in the "
               "order given\n(other users' jobs keep their turns; DQ_PRIORITY still "
               "comes first).")
    id_arguments(p)
    jobs = resolve_jobs(cfg, parse(p, argv))
    for job in jobs:
        require_owner(job, "move")
    status, moved = 0, []
    with Placements.locked(cfg) as places:
        # Above every mark so far: the last dq-top goes first.
        mark = 1 + max([_entry_top(cfg, j) for j in index_names(cfg, user=me())] + [0])
        for i, job in enumerate(reversed(jobs)):
            path = cfg.p("jobs", "active", job.id)
            info = read_json(path, None, False) if job.state() == "queued" else None
            if not info or job.id in places or bad_field(info, INDEX_FIELDS):
                why = "already starting" if job.id in places else job.state()
                print(f"{PROG}: error: {job.id} is {why}; only a queued job can be moved",
                      file=sys.stderr)
                status = 1
                continue
            if is_slurm(cfg) and slurm_id(cfg, job.id):
                res = slurm_call(cfg, ["scontrol", "top", slurm_id(cfg, job.id)])
                if not res.ok:
                    print(f"{PROG}: error: scontrol top {job.id}: {res.why()} (Slurm allows "
                          f"it with SchedulerParameters=enable_user_top)", file=sys.stderr)
                    status = 1
                    continue
            rewrite_entry(cfg, job.id, dict(info, top=mark + i))
            moved.insert(0, job.id)
    for job_id in moved:
        print(f"Moved {job_id} to the front of your jobs")
    return status


def cmd_wait(cfg, argv):
    p = parser("wait", "Wait until jobs have ended, printing a line for each as it ends "
               "(a job run\nagain by DQ_RETRY, DQ_RESUME or DQ_REQUEUE counts when its last "
               "run ends).\nExit status: 0 all ended done, 1 some did not, 2 the timeout "
               "passed first.")
    id_arguments(p)
    p.add_argument("-t", "--timeout", type=seconds_type, metavar="SECONDS",
                   help="give up after SECONDS (exit status 2)")
    args = parse(p, argv)
    pending = [job.id for job in resolve_jobs(cfg, args)]
    total, status = len(pending), 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    tty, pause = sys.stderr.isatty(), 0.05
    checked = time.monotonic()
    while True:
        if is_slurm(cfg) and time.monotonic() - checked > 2:
            checked = time.monotonic()
            try:            # jobs Slurm dropped end (slurm_reconcile)
                slurm_reconcile(cfg)
            except Failure as e:
                warn(str(e))
        for job_id in list(pending):
            state, last = final_state(cfg, job_id)
            if state is None:
                continue
            pending.remove(job_id)
            status = status if state == "done" else 1
            job = load_job(cfg, last, quiet=True)
            d = job.to_dict() if job else {}
            runtime = d["ended"] - d["started"] if d.get("started") and d.get("ended") else 0
            code = d.get("signal") or ("-" if d.get("exit_code") is None else d["exit_code"])
            if tty:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            print(f"{job_id} {state}" + (f" (as {last})" if last != job_id else "") +
                  f" exit {code} runtime {fmt_duration(runtime)}", flush=True)
        if not pending:
            break
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left <= 0:
            if tty:
                print("\r\033[K", end="", file=sys.stderr)
            print(f"{PROG}: timed out: {len(pending)} of {total} jobs have not ended "
                  f"({' '.join(pending[:5])}{' ...' if len(pending) > 5 else ''})",
                  file=sys.stderr)
            return 2
        if tty:
            print(f"\r{total - len(pending)} of {total} jobs ended", end="", file=sys.stderr,
                  flush=True)
        # A stat of each end.json now and then: no CPU to speak of.
        time.sleep(min(pause, left) if left is not None else pause)
        pause = min(pause * 1.5, 1.0)
    return status


# Job listings ################################################################

def idle_for(use, now):
    """Seconds a running job has been flagged idle for (its GPUs unused
    since idle_since, see GpuWatch), or None if it is not."""
    if not use or not use.get("idle") or not use.get("idle_since"):
        return None
    return max(0.0, now - use["idle_since"])


def idle_kill_in(cfg, j, now):
    """Seconds until idle_kill stops a job flagged idle (if it stays so)."""
    after = cfg.shell_idle_after if j.get("interactive") else cfg.idle_after
    return max(0.0, j["gpu_use"]["idle_since"] + after + cfg.idle_kill - now)


def gpu_use_text(use, booked, now=None):
    """'3.1G/8G' (used now / booked), '3.1G', 'OVER 30.1G/8G', or '-/8G';
    'IDLE 35m -' for a job flagged idle (35m: since its GPUs were last used)."""
    used = use.get("mem_mib") if use else None
    text = ("-" if used is None else fmt_mib(used)) + (f"/{fmt_mib(booked)}" if booked else "")
    idle = idle_for(use, now) if now is not None else None
    return ("OVER " if use and use.get("over") else "") + \
        (f"IDLE {fmt_duration(idle)} " if idle is not None else "") + text


def gpu_use_short(use):
    """An ended job's GPU use in dq-jobs complete: '45% 3.1G' (mean
    utilisation, peak memory), '-' without samples."""
    summary = gpu_use_summary(use)
    if not summary:
        return "-"
    return f"{summary['util_mean']:.0f}% {fmt_mib(summary['mem_peak_mib'])}"


def script_text(j):
    """What a job runs, as the listings show it: a dq-shell's is marked
    [shell], with its command (else the login shell it runs)."""
    if not j.get("interactive"):
        return j["script"]
    args = j.get("args") or []
    return "[shell] " + (shlex.join(args[3:]) if args[:2] == ["-c", 'exec "$@"'] else j["script"])


def with_snapshot_column(headers, rows, listed):
    """A Snapshot column before Script (DQ_SNAPSHOT: the files and bytes of
    the copy each job runs from), when a job listed has one."""
    if not any(j["snapshot"] for j in listed):
        return headers, rows
    at = headers.index("Script")
    words = [f"{j['snapshot']['files']} files {fmt_bytes(j['snapshot']['bytes'])}"
             if j["snapshot"] else "-" for j in listed]
    return (headers[:at] + ["Snapshot"] + headers[at:],
            [row[:at] + (w,) + row[at:] for row, w in zip(rows, words)])


def active_jobs(cfg, who, places=None, ids=None):
    """Queued and running jobs of `who` (None: everybody's) as dicts; ids:
    only these."""
    places = Placements.read(cfg) if places is None else places
    out = []
    for job_id in active_ids(cfg, who) if ids is None else ids:
        job = load_job(cfg, job_id)
        if job is None:
            continue
        d = job.to_dict(places.get(job_id))
        if d["state"] in ("queued", "running"):
            out.append(d)
    return out


def queue_reasons(cfg, queued, places):
    """Set each queued job's `reason`: the planner's own (plan, in explain
    mode, on the whole queue) from what the last polls saw; on Slurm,
    squeue's."""
    if is_slurm(cfg):
        return slurm_queue_reasons(cfg, queued)
    now = time.time()
    waits_on = {}
    for j in queued:
        entry = read_entry(cfg, j["id"]) if j["after"] or j["after_any"] else None
        if entry and entry.get("waiting"):
            verdict, what = dependencies_verdict(cfg, entry)
            waits_on[j["id"]] = what if verdict == "wait" else None
    polls, silent = seen_polls(cfg)
    queues, cpu = read_queues(cfg, places, everything=True, waits_on=waits_on)
    decided = plan(queues, cpu, polls, places, now, cfg, read_drains(cfg, quiet=True), silent,
                   recent_usage(cfg, now, list(queues)), explain=True)
    placed = {job_id for job_id, _, _ in decided.placed}
    for j in queued:
        j["reason"] = NEXT_PASS if j["id"] in placed else decided.reasons.get(j["id"])


def running_notes(cfg, running, now):
    """Set the `reason` of running jobs whose host's last poll failed: the
    job runs on as long as its lease is renewed (see Leases)."""
    down = load_hosts(cfg)["down"] if running else {}
    for j in running:
        since = down.get(j["host"])
        if since is None:
            continue
        age = lease_age(cfg, j["id"], now)
        j["reason"] = f"host not answering for {fmt_duration(now - since)}" + (
            f"; its lease was renewed {fmt_duration(age)} ago" if age is not None else "")


def completed_jobs(cfg, who, last=0):
    """Finished jobs, oldest first; with `last`, only the newest `last`
    (read newest first, so the rest of the history is not loaded)."""
    out = []
    active = set(active_ids(cfg))
    for job_id in reversed(all_job_ids(cfg)):
        if last and len(out) >= last:
            break
        if who and not job_id.endswith("-" + who):
            continue
        job = load_job(cfg, job_id)
        if job is None:
            continue
        if job_id in active and job.state() in ("queued", "running"):
            continue
        d = job.to_dict()
        if d["state"] not in ("queued", "running"):
            out.append(d)
    return out[::-1]


def cmd_jobs(cfg, argv):
    p = parser("jobs", "List your dq jobs: active ones (default), a summary of counts, "
               "the queue, or\ncompleted ones.")
    p.add_argument("view", nargs="?", default="active",
                   choices=["active", "summary", "queue", "complete"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-a", "--all", action="store_true", help="every user's jobs")
    p.add_argument("-u", "--user", help="jobs of USER")
    p.add_argument("-n", "--last", type=count_type("jobs"), default=0,
                   help="complete: only the last N jobs")
    args = parse(p, argv)
    if args.user is not None and not is_user_name(args.user):
        raise Failure(f"-u {args.user!r} is not a user name (e.g. -u {me()})")
    who = None if args.all else (args.user or me())
    ensure_layout(cfg)
    now = time.time()
    if is_slurm(cfg):
        slurm_reconcile(cfg)    # our jobs that Slurm dropped: ended now
    places = Placements.read(cfg)
    ids = active_ids(cfg, who)
    if any(i.endswith("-" + me()) for i in ids) and not scheduler_running(cfg):
        spawn_scheduler(cfg)    # e.g. a dq-submit was killed before it started one
    if (args.view == "summary" or args.view == "active" and not args.json) \
            and not is_slurm(cfg):      # (on Slurm, no placements: read every job)
        # Counts need no job read: an entry not placed is queued (a deep
        # queue costs a listing, not a read per job); running jobs are read.
        active = active_jobs(cfg, who, places, [i for i in ids if i in places])
        running = [j for j in active if j["state"] == "running"]
        queued = [i for i in ids if i not in places] + \
            [j["id"] for j in active if j["state"] == "queued"]
    else:
        active = active_jobs(cfg, who, places, ids)
        running = [j for j in active if j["state"] == "running"]
        queued = [j for j in active if j["state"] == "queued"]
    if args.view == "summary":
        if who:
            done = done_count(cfg, who)
        else:
            users = {i.split("-", 1)[1] for i in all_job_ids(cfg)}
            done = sum(done_count(cfg, u) for u in users)
        counts = {"active": len(running), "queued": len(queued), "completed": done}
        if args.json:
            print(json.dumps(counts))
        else:
            print(f"Active jobs: {counts['active']}\nJobs in queue: {counts['queued']}\n"
                  f"Completed jobs: {counts['completed']}")
        return 0
    if args.view == "queue":
        queue_reasons(cfg, queued, places)
        if args.json:
            print(json.dumps(queued, indent=1))
            return 0
        print(f"Jobs in queue: {len(queued)}")
        rows = [(j["id"], fmt_duration(now - j["submitted"]), j["reason"] or "-", script_text(j),
                 env_text(j["env"])) for j in queued]
        print_table(*with_snapshot_column(["JobID", "Wait", "Reason", "Script", "Env"], rows,
                                          queued))
        return 0
    if args.view == "complete":
        done = completed_jobs(cfg, who, max(0, args.last))
        if args.json:
            print(json.dumps(done, indent=1))
            return 0
        print(f"Completed jobs: {len(done)}")
        rows = []
        for j in done:
            runtime = (j["ended"] - j["started"]) if j["started"] and j["ended"] else 0
            exit_text = j["signal"] or ("-" if j["exit_code"] is None else j["exit_code"])
            state = j["state"] + (f" -> {j['requeued_as']}" if j["requeued_as"] else "")
            rows.append((j["id"], j["host"] or "-", fmt_gpus(j["gpus"]), state,
                         exit_text, fmt_duration(runtime), script_text(j), env_text(j["env"])))
        headers = ["JobID", "Host", "GPU", "State", "Exit", "Runtime", "Script", "Env"]
        if any(j["gpu_use"] for j in done):     # mean utilisation, peak memory
            headers.insert(6, "GPU%")
            rows = [row[:6] + (gpu_use_short(j["gpu_use"]),) + row[6:]
                    for row, j in zip(rows, done)]
        print_table(*with_snapshot_column(headers, rows, done))
        for j in done:
            for what, error in sorted(j["notify"].items()):
                print(f"{j['id']}: {what} failed: {error}")
        return 0
    running_notes(cfg, running, now)
    if args.json:
        # One job object in every view: queued ones with their reason
        queue_reasons(cfg, queued, places)
        print(json.dumps(active, indent=1))
        return 0
    print(f"Active jobs: {len(running)}")
    rows = [(j["id"], j["host"], fmt_gpus(j["gpus"]), fmt_duration(now - j["started"]),
             script_text(j), env_text(j["env"])) for j in running]
    headers = ["JobID", "Host", "GPU", "Runtime", "Script", "Env"]
    if any(j["time_limit"] for j in running):     # time left, for jobs with a limit
        headers.insert(4, "Left")
        rows = [row[:4] + (fmt_duration(max(0, j["started"] + j["time_limit"] - now))
                           if j["time_limit"] else "-",) + row[4:]
                for row, j in zip(rows, running)]
    if any(j["mem_mib"] or j["gpu_use"] for j in running):    # GPU memory: used/booked
        headers.insert(3, "Mem")
        rows = [row[:3] + (gpu_use_text(j["gpu_use"], j["mem_mib"], now) if j["gpus"]
                           else "-",)
                + row[3:] for row, j in zip(rows, running)]
    print_table(*with_snapshot_column(headers, rows, running))
    for j in running:
        if j.get("reason"):
            print(f"{j['id']} on {j['host']}: {j['reason']}")
        over = (j["gpu_use"] or {}).get("over")
        if over and j["mem_mib"]:
            print(f"{j['id']} on {j['host']}: used {fmt_mib(over['mem_mib'])} of GPU memory, "
                  f"over its DQ_MEM={fmt_mib(j['mem_mib'])}")
        idle = idle_for(j["gpu_use"], now)
        if idle is not None:
            print(f"{j['id']} on {j['host']}: idle: GPU {fmt_gpus(j['gpus'])} unused (0%, no "
                  f"process of the job) for {fmt_duration(idle)}" +
                  (f"; dq stops it in {fmt_duration(idle_kill_in(cfg, j, now))} (idle_kill)"
                   if cfg.idle_kill else ""))
    print(f"Jobs in queue: {len(queued)} (run 'dq-jobs queue' to inspect)")
    return 0


# Usage reports (dq-report) ###################################################

# dq-report answers "who used how many GPU-hours, and how many of them did
# nothing?" from the users' histories (see HISTORY), never from the job
# directories.  A job counts (jobs, end states, waits) in the window its
# end time falls in; its GPU-hours (GPUs x share x runtime) and idle
# GPU-hours are clipped to the window, and with --by day or week split by
# the hours it ran on each local day or week.  Running jobs are not in it.
REPORT_BY = {"user": "user", "host": "host", "gpu-type": "gpu_type", "day": "day",
             "week": "week"}
REPORT_COLUMNS = ("jobs",) + REPORT_STATES + ("gpu_hours", "idle_gpu_hours", "wait_median_s",
                                              "wait_p95_s")
REPORT_DATE_FORMS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M")


def report_time(option, text, now):
    """--since/--until: a time back from now (7d, 12h, 1h30m) or a local
    date (YYYY-MM-DD) or date and time (YYYY-MM-DDTHH:MM)."""
    for form in REPORT_DATE_FORMS:
        try:
            return time.mktime(time.strptime(text.strip(), form))
        except (ValueError, OverflowError):
            pass
    try:
        return now - duration(option, text, option)
    except Failure:
        raise Failure(f"{option} {text!r} is neither a time back from now nor a date; e.g. "
                      f"{option} 7d, {option} 12h, {option} 2026-11-01 or {option} "
                      f"2026-11-01T09:30 (local time)")


def period_key(t, by):
    """'2026-11-24' (by day) or '2026-W48' (by ISO week) of local time t."""
    return time.strftime("%G-W%V" if by == "week" else "%Y-%m-%d", time.localtime(t))


def split_by_period(start, end, by):
    """[(key, seconds)]: the time from start to end on each local day (or
    week) it spans."""
    out, t = [], start
    while t < end:
        stop = min(end, next_period(period_start(t, by), by))
        out.append((period_key(t, by), stop - t))
        t = stop
    return out


def percentile(values, p):
    """The p-th percentile (0-100) of values, linearly between the two
    nearest ranks (the median of 1, 2, 3, 4 is 2.5); None for none."""
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    i = int(k)
    j = min(i + 1, len(values) - 1)
    return values[i] + (values[j] - values[i]) * (k - i)


def counted_percentiles(pairs, *ps):
    """percentile() of values given as (value, how many times), sorted,
    for each p of ps: linearly between the two nearest ranks."""
    from bisect import bisect_right
    from itertools import accumulate
    if not pairs:
        return [None for p in ps]
    values, counts = zip(*pairs)
    ranks = list(accumulate(counts))        # ranks[m]: how many up to values[m]
    out = []
    for p in ps:
        k = (ranks[-1] - 1) * p / 100
        i = int(k)
        j = min(i + 1, ranks[-1] - 1)
        vi, vj = values[bisect_right(ranks, i)], values[bisect_right(ranks, j)]
        out.append(vi + (vj - vi) * (k - i))
    return out


class Tally:
    """dq-report's sums, one group per row (REPORT_BY[by]) and all of them:
    from records (add_record) or from day summaries (add_delta).  Waits are
    kept exact from records, and as buckets from summaries (counts and sums,
    by wait_bucket); a bucket stands for its mean, count times."""

    def __init__(self, by, since, until):
        self.by, self.field, self.since, self.until = by, REPORT_BY[by], since, until
        self.groups, self.everything = {}, self.new_group()

    @staticmethod
    def new_group():
        return dict(dict.fromkeys(REPORT_COLUMNS[:6], 0), gpu_s=0.0, idle_s=0.0, waits=[],
                    buckets=[])

    def group(self, key):
        if key not in self.groups:
            self.groups[key] = self.new_group()
        return self.groups[key]

    def add_record(self, r):
        """A history record: counted if it ended in the window, its
        GPU-seconds clipped to it (and split by day or week)."""
        field, by, since, until = self.field, self.by, self.since, self.until
        if field == "user":
            key = r["id"].split("-", 1)[1]
        elif field in ("host", "gpu_type"):
            key = r.get(field) or "unknown"
        else:
            key = period_key(r["ended"], by)
        if since <= r["ended"] < until:
            for g in (self.group(key), self.everything):
                g["jobs"] += 1
                if r["state"] in REPORT_STATES:
                    g[r["state"]] += 1
                if r.get("started") is not None and r.get("submitted") is not None:
                    g["waits"].append(max(0.0, r["started"] - r["submitted"]))
        started = r.get("started")
        if started is None or not r["gpus"]:
            return
        runtime = max(0.0, r["ended"] - started)
        lo, hi = max(started, since), min(r["ended"], until)
        if hi <= lo:
            return
        weight = r["gpus"] * r.get("share", 1)
        idle_rate = r.get("idle_gpu_s", 0) / runtime if runtime else 0.0
        pieces = split_by_period(lo, hi, by) if field in ("day", "week") else [(key, hi - lo)]
        for k, seconds in pieces:
            for g in (self.group(k), self.everything):
                g["gpu_s"] += weight * seconds
                g["idle_s"] += min(idle_rate, weight) * seconds

    def add_delta(self, key, delta):
        """A day summary's sums of a part of the window (DaySummary.span)."""
        n, gpu_s, idle_s, waits, counts, sums = delta
        for g in (self.group(key), self.everything):
            g["jobs"] += n[0]
            for state, c in zip(REPORT_STATES, n[1:]):
                g[state] += c
            g["gpu_s"] += gpu_s
            g["idle_s"] += idle_s
            g["waits"] += waits
            if counts:
                g["buckets"].append((counts, sums))     # summed in rows()

    def rows(self):
        """(rows, total) of dq-report: one dict per group, sorted by key."""
        def row(g):
            out = {c: g[c] for c in REPORT_COLUMNS[:6]}
            if g["buckets"]:
                from itertools import zip_longest
                counts, sums = g["buckets"][0] if len(g["buckets"]) == 1 else (
                    [sum(b) for b in zip_longest(*lists, fillvalue=0)]
                    for lists in zip(*g["buckets"]))
                pairs = sorted([(w, 1) for w in g["waits"]] +
                               [(total / c, c) for c, total in zip(counts, sums) if c > 0])
                median, p95 = counted_percentiles(pairs, 50, 95)
            else:
                median, p95 = percentile(g["waits"], 50), percentile(g["waits"], 95)
            out.update(gpu_hours=round(g["gpu_s"] / 3600, 4),
                       idle_gpu_hours=round(g["idle_s"] / 3600, 4),
                       wait_median_s=None if median is None else round(median, 1),
                       wait_p95_s=None if p95 is None else round(p95, 1))
            return out
        field = self.field
        rows = [dict({field: k}, **row(self.groups[k])) for k in sorted(self.groups)]
        return rows, dict({field: "total"}, **row(self.everything))


def report_rows(records, by, since, until):
    """(rows, total) of dq-report from history records: one dict per group,
    sorted by the group's key (REPORT_BY[by]), and the same for all of them
    (key 'total')."""
    tally = Tally(by, since, until)
    for r in records:
        tally.add_record(r)
    return tally.rows()


class DaySummary:
    """A user's day summary (see DAYS), open for one report: the lines it
    needs, read by seeking through the header's index.  Anything wrong in
    a line raises ValueError, TypeError, KeyError or IndexError: then the
    report reads that user's records instead."""

    def __init__(self, f, head):
        self.f, self.base = f, f.tell()
        self.days = [e[0] for e in head["index"]]
        self.index = head["index"]
        self.cache = {}

    def line(self, pos, which):
        """The totals (which=1) or detail (2) line of the pos-th day."""
        if (pos, which) not in self.cache:
            self.f.seek(self.base + self.index[pos][which])
            data = json.loads(self.f.readline())
            if data["day"] != self.days[pos]:
                raise ValueError("a line out of place")
            self.cache[pos, which] = data
        return self.cache[pos, which]

    def before(self, t):
        """The position of the last day before t (-1: none)."""
        import bisect
        return bisect.bisect_left(self.days, t) - 1

    def span(self, a, b):
        """The sums of [a, b): (counts, gpu_s, idle_s, exact waits, and the
        waits' buckets: counts, sums), or None when nothing of it falls
        there.  Whole days: the difference of two totals lines; the part of
        a day at either end from that day's detail line."""
        n, acc, waits, buckets = [0] * (1 + len(REPORT_STATES)), [0.0, 0.0], [], [[], []]
        seen = False
        first = period_start(a, "day")
        full_from = a if first == a else next_period(first, "day")
        full_to = period_start(b, "day")
        if full_from < full_to:
            seen |= self.whole(full_from, full_to, n, acc, buckets)
        if a < min(full_from, b):
            seen |= self.part(first, a, min(full_from, b), n, acc, waits)
        if full_from <= full_to < b:
            seen |= self.part(full_to, full_to, b, n, acc, waits)
        return (n, acc[0], acc[1], waits) + tuple(buckets) if seen else None

    def whole(self, lo, hi, n, acc, buckets):
        """Add the days from midnight lo to midnight hi."""
        pa, pb = self.before(lo), self.before(hi)
        if pa == pb:
            return False
        top = self.line(pb, 1)
        low = self.line(pa, 1) if pa >= 0 else {"n": [0] * len(n), "gpu_s": 0.0,
                                                 "idle_s": 0.0, "waits": [[], []]}
        if len(top["n"]) != len(n):
            raise ValueError("counts of another length")
        for i, (x, y) in enumerate(zip(top["n"], low["n"])):
            n[i] += x - y
        acc[0] += top["gpu_s"] - low["gpu_s"]
        acc[1] += top["idle_s"] - low["idle_s"]
        (counts, sums), (was, had) = top["waits"], low["waits"]
        if not len(counts) == len(sums) >= len(was) == len(had):
            raise ValueError("waits of other lengths")
        buckets[0] = [a - b for a, b in zip(counts, was)] + counts[len(was):]
        buckets[1] = [a - b for a, b in zip(sums, had)] + sums[len(had):]
        return True

    def part(self, day, lo, hi, n, acc, waits):
        """Add [lo, hi), a part of the day that starts at midnight `day`."""
        pos = self.before(day) + 1
        if pos >= len(self.days) or self.days[pos] != day:
            return False
        d = self.line(pos, 2)
        from bisect import bisect_left, bisect_right
        lo, hi = lo - day, hi - day     # exact, as the line's times
        seen = False
        ends = d["ends"]
        times = ends[0::3]
        i, j = bisect_left(times, lo), bisect_left(times, hi)
        if i < j:
            seen = True
            n[0] += j - i
            for state in ends[3 * i + 1:3 * j:3]:
                if state >= 0:
                    n[1 + state] += 1
            waits += [w for w in ends[3 * i + 2:3 * j:3] if w >= 0]
        ev = d["ev"]
        times = ev[0::4]
        k = bisect_right(times, lo)     # the state from lo on: after these
        running, w, idle = ev[4 * k - 3:4 * k] if k else d["r0"]
        t = lo
        for k in range(k, len(times) + 1):
            at = times[k] if k < len(times) and times[k] < hi else hi
            if running > 0 and at > t:
                seen = True
                acc[0] += w * (at - t)
                acc[1] += idle * (at - t)
            if at >= hi:
                break
            t = at
            running, w, idle = ev[4 * k + 1:4 * k + 4]
        return seen


def summary_report(cfg, user, tally):
    """Add user's part of the report from their day summary and the
    history's tail (the records it does not cover); False, having added
    nothing, if there is no summary to use (then the records are read)."""
    path = history_path(cfg, user)
    try:
        f = open(path, "rb")
    except OSError:
        return False
    with f:
        st = os.fstat(f.fileno())
        if user_of_uid(st.st_uid) != user:
            return False
        opened = open_days(cfg, user, st)
        if opened is None:
            return False
        days, head = opened
        with days:
            by, since, until = tally.by, tally.since, tally.until
            if by == "user":
                spans = [(user, since, until)]
            else:
                spans, t = [], period_start(since, by)
                while t < until:
                    after = next_period(t, by)
                    spans.append((period_key(t, by), max(since, t), min(until, after)))
                    t = after
            try:
                summary = DaySummary(days, head)
                deltas = [(key, summary.span(a, b)) for key, a, b in spans]
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                    RecursionError):
                return False
        try:
            f.seek(head["through"])
            tail = f.read()
        except OSError:
            return False
    for key, delta in deltas:
        if delta is not None:
            tally.add_delta(key, delta)
    for r in history_records(tail, path, since):
        tally.add_record(r)
    return True


def user_report(cfg, users, by, since, until):
    """dq-report's (rows, total) of users' jobs: from each user's day
    summary where there is one to use (by user, day or week), else from
    the records of the window.  The caller's own summary is made anew
    first if their history has outgrown it (refresh_days)."""
    tally = Tally(by, since, until)
    summaries = by in ("user", "day", "week")
    mine = me()
    for user in users:
        if summaries and user == mine:
            refresh_days(cfg, user)
        if summaries and summary_report(cfg, user, tally):
            continue
        for r in read_history(cfg, user, since):
            tally.add_record(r)
    return tally.rows()


def history_users(cfg):
    """Users with a history or a counter in jobs/done (one listing)."""
    try:
        names = os.listdir(cfg.p("jobs", "done"))
    except FileNotFoundError:
        return []
    users = set()
    for name in names:
        if name.startswith(".") or name.endswith((".lock", DAYS)):
            continue
        user = name[:-len(HISTORY)] if name.endswith(HISTORY) else name
        if is_user_name(user):
            users.add(user)
    return sorted(users)


def cmd_report(cfg, argv):
    p = parser("report", "GPU-hours, idle GPU-hours, job counts and waits of the jobs that "
               "ended,\nper user (default), host, GPU type, day or week.  Anyone may run it.\n\n"
               "A job counts in the window its end falls in; its GPU-hours (GPUs x runtime,\n"
               "a sharing job's booked share of its GPUs) are clipped to the window, and\n"
               "--by day/week splits them by the hours it ran on each day (local time).\n"
               "Idle GPU-hours: the part of them its GPUs were sampled at 0% utilisation.")
    p.add_argument("--since", default="7d", metavar="WHEN",
                   help="from: a time back (7d, 12h) or a local date, YYYY-MM-DD or "
                        "YYYY-MM-DDTHH:MM (default 7d)")
    p.add_argument("--until", metavar="WHEN", help="to (default now); same forms")
    p.add_argument("--by", default="user", choices=list(REPORT_BY),
                   help="one row per user (default), host, GPU type, local day or ISO week")
    p.add_argument("-u", "--user", help="only the jobs of USER")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a list of row objects")
    out.add_argument("--csv", action="store_true", help="print CSV with a header line")
    args = parse(p, argv)
    now = time.time()
    since = report_time("--since", args.since, now)
    until = now if args.until is None else report_time("--until", args.until, now)
    if until <= since:
        raise Failure(f"--until {args.until} is not after --since {args.since}; e.g. "
                      f"--since 2026-11-01 --until 2026-11-08")
    if args.user is not None and not is_user_name(args.user):
        raise Failure(f"--user {args.user!r} is not a user name (e.g. --user {me()})")
    users = [args.user] if args.user else history_users(cfg)
    rows, total = user_report(cfg, users, args.by, since, until)
    field = REPORT_BY[args.by]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if args.csv:
        import csv
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow((field,) + REPORT_COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in (field,) + REPORT_COLUMNS])
        return 0

    def when(t):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
    print(f"Jobs that ended from {when(since)} to {when(until)} (local time)"
          + (f", of {args.user}" if args.user else ""))
    print_table([{"gpu-type": "GPU type"}.get(args.by, args.by.capitalize()), "Jobs", "Done", "Failed", "Killed",
                 "Lost", "Timeout", "GPU-h", "Idle GPU-h", "Wait p50", "Wait p95"],
                [(r[field],) + tuple(r[c] for c in REPORT_COLUMNS[:6])
                 + (f"{r['gpu_hours']:.2f}", f"{r['idle_gpu_hours']:.2f}")
                 + tuple("-" if r[c] is None else fmt_duration(r[c])
                         for c in ("wait_median_s", "wait_p95_s"))
                 for r in rows + [total]])
    return 0


# Job output ##################################################################

def flush_log(cfg, job):
    """Make a running job's log current before reading it.  The job's
    wrapper writes it unbuffered (see run_in_pty), but on NFS the writing
    host's client may still sit on dirty pages: an fsync there pushes them
    to the server."""
    if job.state() != "running":
        return
    print(f"Flushing logs of {job.id}", file=sys.stderr, flush=True)
    host = job.run.get("host")
    if host:
        r = run_on(cfg, host, f"sync {q(job_log(job))} 2>/dev/null; true")
        if not r.ok:
            warn(f"could not reach {host} to flush the log: {r.why()}")


def open_log(cfg, job_arg):
    job = resolve_job(cfg, job_arg)
    path = job_log(job)
    if not os.path.exists(path):
        state = job.state()
        if state == "queued":
            raise Failure(f"job {job.id} is still queued; it has no output yet")
        raise Failure(f"job {job.id} ({state}) has no log file {path}")
    if not os.access(path, os.R_OK):
        raise Failure(f"you may not read the log of {job.id} ({path})")
    flush_log(cfg, job)
    return job, path


def copy_out(f):
    """Copy the rest of a binary file to stdout: the kernel does it where it
    can (sendfile), else 1 MiB at a time.  Constant memory either way."""
    out = sys.stdout.buffer
    out.flush()
    pos = f.tell()
    try:
        while True:
            sent = os.sendfile(out.fileno(), f.fileno(), pos, 1 << 24)
            if sent == 0:
                break
            pos += sent
        f.seek(pos)
        return
    except OSError as e:
        if e.errno == errno.EPIPE:
            raise BrokenPipeError() from None
        f.seek(pos)
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        out.write(chunk)
    out.flush()


# Seconds between two flushes of a followed log on its host (an ssh each,
# for NFS clients that sit on the job host's dirty pages).
TAIL_FLUSH_EVERY = 2


def cmd_tail(cfg, argv):
    num, argv = count_arg(argv)
    p = parser("tail", "Show the last lines of a job's output (stdout and stderr).\n\n"
               "  dq-tail ID [-NUM] [-f]")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new output until the job ends (or Ctrl-C)")
    args = parse(p, argv)
    job, path = open_log(cfg, args.job_id)
    with open(path, "rb") as f:
        f.seek(last_lines_offset(f, num))
        copy_out(f)
        if not args.follow:
            return 0
        last_flush = time.monotonic()
        while True:
            if os.fstat(f.fileno()).st_size > f.tell():
                copy_out(f)
                continue
            job._end = job._lost = None
            if job.end or job.lost_marker():
                return 0
            if time.monotonic() - last_flush > TAIL_FLUSH_EVERY and job.run.get("host") \
                    and not cfg.local:
                run_on(cfg, job.run["host"], f"sync {q(path)} 2>/dev/null; true")
                last_flush = time.monotonic()
            time.sleep(0.1)


def cmd_head(cfg, argv):
    num, argv = count_arg(argv)
    p = parser("head", "Show the first lines of a job's output.\n\n  dq-head ID [-NUM]")
    p.add_argument("job_id")
    args = parse(p, argv)
    _, path = open_log(cfg, args.job_id)
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i >= num:
                break
            out.write(line)
    out.flush()
    return 0


def cmd_logs(cfg, argv):
    p = parser("logs", "Print a job's whole output (it may be large: pipe it).")
    p.add_argument("job_id")
    args = parse(p, argv)
    _, path = open_log(cfg, args.job_id)
    with open(path, "rb") as f:
        copy_out(f)
    return 0


def cmd_grep(cfg, argv):
    if argv and argv[0] in ("-h", "--help", "--version"):
        p = parser("grep", "Search a job's output for a regular expression (grep -E);\n"
                   "options before PATTERN go to grep, e.g. dq-grep 12 -i -c loss.\n\n"
                   "  dq-grep ID [GREP-OPTIONS] PATTERN")
        p.parse_args(argv[:1])
    rest = [a for a in argv if a != "--debug"]
    global DEBUG
    DEBUG = DEBUG or len(rest) != len(argv)
    if len(rest) < 2:
        raise Failure("usage: dq-grep ID [GREP-OPTIONS] PATTERN (see dq-grep --help)")
    _, path = open_log(cfg, rest[0])
    colour = "--color=always" if use_colour() else "--color=never"
    # grep reads the log itself: as fast as grep, in constant memory.
    sys.stdout.flush()
    import subprocess
    # Its complaints (a bad option or pattern) become our one error line.
    g = subprocess.run(["grep", "-E", colour] + rest[1:-1] + ["-e", rest[-1], "--", path],
                       stderr=subprocess.PIPE)
    err = one_line(g.stderr.decode(errors="replace").strip())
    if g.returncode == 2:
        raise Failure(f"{err or 'grep failed'} (options before PATTERN go to grep -E)")
    if err:
        print(err, file=sys.stderr)
    return g.returncode


def attach_argv(cfg, job):
    """The command that attaches this terminal to a running job's screen."""
    name = session_name(job.id)     # letters, digits and -_. only: safe in any shell
    if cfg.local:
        return ["screen", "-r", name]
    argv = ssh_argv(cfg, job.run["host"])
    argv[1:1] = ["-t"]
    return argv + [f"exec screen -r {name}"]


def cmd_attach(cfg, argv):
    p = parser("attach", "Attach your terminal to a running job's screen session.\n"
               "Detach with Ctrl-a d; the job keeps running.")
    p.add_argument("job_id")
    args = parse(p, argv)
    job = resolve_job(cfg, args.job_id)
    require_owner(job, "attach to")
    if job.state() != "running":
        raise Failure(f"job {job.id} is {job.state()}, not running; nothing to attach to "
                      f"(see dq-tail {job.n})")
    argv = attach_argv(cfg, job)
    debug(shlex.join(argv))
    os.execvp(argv[0], argv)


# Interactive shells (dq-shell) ###############################################

# dq-shell is a job like any other (every DQ_* variable, listed, logged,
# time-limited by shell_time unless DQ_TIME says otherwise), whose program
# is the user's login shell or the command given, run for a terminal: once
# its owner's pass has started it in its screen session, dq-shell attaches
# the calling terminal there (as dq-attach does).  While it waits, one
# status line on stderr (a terminal only) says where it is in the queue and
# why; Ctrl-C withdraws it (cancelled), --now withdraws it at once if the
# first pass does not place it.  It is never retried or requeued (nobody
# would be at its terminal), nor restarted.

SHELL_STATUS_EVERY = 1.0        # seconds between looks at a waiting shell


def shell_program(command):
    """(script, args) of a dq-shell job: the login shell, or the command
    looked up on the job's host (sh -c 'exec "$@"', so its PATH counts)."""
    if not command:
        shell = os.environ.get("SHELL") or pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
        if not os.path.isabs(shell) or not os.access(shell, os.X_OK):
            raise Failure(f"your login shell {shell!r} is not an executable path; set SHELL "
                          f"or give the command to run, e.g. dq-shell bash")
        return shell, []
    return "/bin/sh", ["-c", 'exec "$@"', "dq-shell"] + command


def queue_place(cfg, job_id):
    """(place, of how many) of a queued job among every queued one, by age."""
    places = Placements.read(cfg)
    waiting = [i for i in active_ids(cfg) if i not in places]
    return (waiting.index(job_id) + 1 if job_id in waiting else 0), len(waiting)


def wait_reason_of(cfg, job):
    """The planner's reason why the queued job waits (see queue_reasons)."""
    d = job.to_dict()
    queue_reasons(cfg, [d], Placements.read(cfg))
    return d.get("reason") or NEXT_PASS


def wait_for_start(cfg, job, say):
    """Until the job runs (or ends): say where it is when that changes.
    Looks often at first (a job placed at once starts within a fraction of
    a second), then every SHELL_STATUS_EVERY seconds."""
    said, pause = None, 0.05
    while True:
        job = load_job(cfg, job.id, quiet=True) or job
        state = job.state()
        if state != "queued":
            return job
        place, total = queue_place(cfg, job.id)
        line = (f"{job.id} waits, {place} of {total} in the queue: {wait_reason_of(cfg, job)}"
                if place else f"{job.id} is placed; starting")
        if line != said:
            say(line)
            said = line
        time.sleep(pause)
        pause = min(pause * 2, SHELL_STATUS_EVERY)


def shell_ended(job, attached=False):
    """dq-shell's exit status once its job ended: the job's (1 if it had
    none); not attached: its log first, which the terminal never showed."""
    if not attached:
        try:
            with open(job_log(job), "rb") as f:
                _write_all(1, f.read())
        except OSError:
            pass
        if job.state() != "done":
            print(f"{PROG}: {job.id} ended {job.state()}: {job.end.get('reason') or '-'}",
                  file=sys.stderr)
    code = job.end.get("exit_code")
    return code if isinstance(code, int) and 0 <= code < 256 else 1


def cmd_shell(cfg, argv):
    import argparse
    p = parser("shell", "A shell on a GPU through the queue: queue a job that runs your "
               "login shell (or\nCMD), wait for a GPU, then attach this terminal to it on "
               "its host, in this\ndirectory, with CUDA_VISIBLE_DEVICES and your DQ_* "
               "variables (DQ_GPUS, DQ_MEM,\nDQ_HOSTS, DQ_TIME...; without DQ_TIME it "
               "ends after shell_time, default 4h).\nCtrl-C while it waits withdraws it; "
               "Ctrl-a d detaches (dq-attach ID returns);\nit ends when the shell exits.")
    p.add_argument("-n", "--now", action="store_true",
                   help="take a GPU now or fail at once, saying why")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD",
                   help="what to run instead of your login shell")
    args = parse(p, argv)
    tty = sys.stderr.isatty()

    def say(text, end=False):
        if tty:     # one status line, rewritten in place
            sys.stderr.write(f"\r\033[K{PROG}: {text}" + ("\n" if end else ""))
            sys.stderr.flush()
    cwd = submit_cwd()
    script, extra = shell_program(args.command)
    env = {k: v for k, v in os.environ.items()
           if k.startswith("DQ_") and k not in OWN_VARS + SWEEP_VARS}
    job = prepare_job(cfg, env)
    if not args.command and not sys.stdin.isatty():
        raise Failure("a shell needs a terminal, and stdin is not one; give the command to "
                      "run (dq-shell CMD...), or queue a script with dq-submit")
    if not env.get("DQ_TIME", "").strip():
        job["time_limit"] = cfg.shell_time
    job["spec"] = {"interactive": True, "args": extra}
    if job["snapshot"]:     # DQ_SNAPSHOT=1: a shell in a copy of this directory
        job["snapshot"] = SnapshotPlan(cfg, cwd, script)
    ensure_layout(cfg)
    polls = None
    if not is_slurm(cfg):       # (on Slurm, sbatch says what cannot fit)
        polls = poll_hosts(cfg)
        check_fits(cfg, {h: ([(g.name, g.total) for g in s.gpus], s.reachable)
                         for h, s in polls.items()}, job["gpus"], job["need"])
    job_id = create_job(cfg, script, cwd, job)
    running = None
    try:
        if polls is not None:
            schedule_pass(cfg, polls)
        else:       # Slurm starts it within its scheduler's tick, or not now
            deadline = time.monotonic() + (SLURM_NOW_WAIT if args.now else 0)
            while load_job(cfg, job_id).state() == "queued" and time.monotonic() < deadline:
                time.sleep(0.1)
        job = load_job(cfg, job_id)
        if args.now and job.state() == "queued" and job_id not in Placements.read(cfg):
            why = wait_reason_of(cfg, job)
            kill_job(cfg, job, state="cancelled", reason=f"dq-shell --now: no GPU now ({why})",
                     say=lambda text: None)
            raise Failure(f"no GPU for {job_id} now: {why}; without --now it waits for one")
        if not scheduler_running(cfg):
            spawn_scheduler(cfg)
        running = wait_for_start(cfg, job, say)
    except KeyboardInterrupt:
        job = load_job(cfg, job_id)
        if job and job.state() in ("queued", "running"):
            kill_job(cfg, job, state="cancelled" if job.state() == "queued" else "killed",
                     reason="withdrawn with Ctrl-C while it waited (dq-shell)",
                     say=lambda text: None)
        say(f"withdrew {job_id}", end=True)
        if not tty:
            print(f"{PROG}: withdrew {job_id}", file=sys.stderr)
        return 130
    if running.state() != "running":     # over before it could be attached: its output
        say(f"{job_id} ended {running.state()} before this terminal was attached", end=True)
        return shell_ended(running)
    if not sys.stdin.isatty():      # nothing to attach: its output once it ends
        pause = 0.05
        while running.state() == "running":
            time.sleep(pause)
            pause = min(pause * 2, SHELL_STATUS_EVERY)
            running = load_job(cfg, job_id, quiet=True) or running
            running._end = running._lost = None
        return shell_ended(running)
    say(f"{job_id} runs on {running.run['host']} (GPU "
        f"{fmt_gpus(running.run.get('gpus', []))}); Ctrl-a d detaches", end=True)
    import subprocess
    attach = attach_argv(cfg, running)
    debug(shlex.join(attach))
    subprocess.call(attach)
    job = load_job(cfg, job_id)
    if job.state() == "running":
        print(f"{PROG}: {job_id} runs on; dq-attach {job.n} returns to it", file=sys.stderr)
        return 0
    return shell_ended(job, attached=True)


# Cluster views ###############################################################

STATE_WORDS = {"R": "running", "S": "sleeping", "D": "disk sleep", "Z": "zombie",
               "T": "stopped", "t": "traced", "I": "idle", "X": "dead"}


def users_script(cfg):
    return (poll_script(cfg, with_ps=False) +
            "echo @@ps; ps -eo pid=,ppid=,user:32=,stat=,comm:32=,args= 2>/dev/null;"
            " echo '@@rc 0'\n")


def gpu_users(host, res, started):
    """[{host, gpu, mem, pid, user, process, stat, job}] for one host, from
    nvidia-smi (which PIDs use which GPU) and ps on the host (who, what)."""
    st = parse_poll(host, res, started)
    if st.error:
        return st, []
    procs = {}
    for line in st.ps.splitlines():
        f = line.split(None, 5)
        pid = whole_number(f[0]) if len(f) >= 5 else None
        if pid is not None:
            procs[pid] = {"ppid": whole_number(f[1]) or 0,
                          "user": f[2], "stat": f[3], "comm": f[4],
                          "args": f[5] if len(f) > 5 else ""}

    def job_of(pid):
        seen = set()
        while pid in procs and pid not in seen:
            seen.add(pid)
            m = SESSION_RE.search(procs[pid]["args"])
            if m:
                return m.group(1)
            pid = procs[pid]["ppid"]
        return None

    rows = []
    for g in st.gpus:
        for pid, mem in g.apps:
            pr = procs.get(pid, {})
            rows.append({"host": host, "gpu": g.index, "mem_mb": mem, "pid": pid,
                         "user": pr.get("user", "?"), "process": pr.get("comm", "?"),
                         "stat": pr.get("stat", "?")[:1] or "?",
                         "job": job_of(pid) if pid else None})
    return st, rows


def sharing_rows(host, rows, places):
    """dq-users' rows of a host with each process's booking (booked_mib: its
    job's DQ_MEM), and a row for each sharing job placed on a GPU where it
    runs no process (yet): every sharing job shows on its GPU."""
    seen = {(r["job"], r["gpu"]) for r in rows}
    for r in rows:
        p = places.get(r["job"]) if r["job"] else None
        r["booked_mib"] = p.get("mem") if p and r["gpu"] in p["gpus"] else None
    extra = [{"host": host, "gpu": g, "mem_mb": None, "pid": None, "user": p["user"],
              "process": "-", "stat": "-", "job": job_id, "booked_mib": p["mem"]}
             for job_id, p in sorted(places.items()) if p["host"] == host and "mem" in p
             for g in p["gpus"] if (job_id, g) not in seen]
    return sorted(rows + extra, key=lambda r: r["gpu"])


def idle_rows(cfg, host, rows, places, now):
    """dq-users' rows of a host with `idle_s` (how long the row's job has
    been flagged idle, see GpuWatch; else None), and a row for each GPU of
    an idle job: it runs no process there, yet holds the GPU."""
    idle = {}
    for job_id, p in places.items():
        if p["host"] == host and p["gpus"] and p["state"] == Placements.RUNNING:
            since = idle_for(read_gpu_use(cfg.job_dir(job_id)), now)
            if since is not None:
                idle[job_id] = since
    seen = {(r["job"], r["gpu"]) for r in rows}
    extra = [{"host": host, "gpu": g, "mem_mb": None, "pid": None, "user": places[job_id]["user"],
              "process": "-", "stat": "-", "job": job_id,
              "booked_mib": places[job_id].get("mem")}
             for job_id in sorted(idle) for g in places[job_id]["gpus"] if (job_id, g) not in seen]
    for r in rows + extra:
        r["idle_s"] = round(idle[r["job"]]) if r["job"] in idle else None
    return sorted(rows + extra, key=lambda r: r["gpu"])


def cmd_users(cfg, argv):
    p = parser("users", "List every process on every GPU of the cluster, started by dq or "
               "by hand.")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = parse(p, argv)
    started = time.time()
    need_hosts(cfg)
    progress = sys.stderr.isatty() and not args.json
    script = users_script(cfg)
    results = run_on_all(cfg, cfg.hosts, lambda h: script, on_done=lambda h: print(
        ".", end="", file=sys.stderr, flush=True) if progress else None)
    if progress:
        print(file=sys.stderr)
    places = Placements.read(cfg)
    rows = []
    for h in cfg.hosts:
        st, host_rows = gpu_users(h, results[h], started)
        if st.error:
            warn(f"{h}: {st.error}")
        rows += idle_rows(cfg, h, sharing_rows(h, host_rows, places), places, time.time())
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = [(f"{r['host']}:", r["gpu"], f"{r['mem_mb']}-MB" if r["mem_mb"] is not None
              else "?" if r["pid"] is not None else "-", fmt_mib(r["booked_mib"]) if r["booked_mib"] else "-", r["user"],
              r["process"], r["pid"] if r["pid"] is not None else "-", r["stat"],
              f"({STATE_WORDS.get(r['stat'], 'unknown')})" if r["pid"] else "",
              (r["job"] or "") + (f" IDLE {fmt_duration(r['idle_s'])}"
                                  if r["idle_s"] is not None else ""))
             for r in rows]
    print_table(["Host", "GPU", "Mem", "Booked", "User", "Process", "PID", "Status", "",
                 "Job"], table)
    return 0


def cmd_on_all(cfg, argv):
    p = parser("on-all", "Run a command on every host in parallel; each output line is "
               "prefixed with\nits host.  Several arguments are quoted one by one (dq-on-all "
               "date '+%F');\na single argument is a /bin/sh command line "
               "(dq-on-all 'nvidia-smi | head -3').")
    p.add_argument("-t", "--timeout", type=seconds_type, help="seconds per host "
                   "(default: the configured timeout)")
    import argparse
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = parse(p, argv)
    if not args.command:
        raise Failure("no command given (usage: dq-on-all COMMAND [ARG...])")
    line = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
    timeout = args.timeout or cfg.timeout
    need_hosts(cfg)
    colour = use_colour()

    def emit(stream, host, text):
        prefix = f"\033[1m{host}:\033[0m " if colour and stream is sys.stdout else f"{host}: "
        stream.write(prefix + text + ("" if text.endswith("\n") else "\n"))
        stream.flush()
    results = run_on_all(cfg, cfg.hosts, lambda h: line, timeout,
                         on_line=lambda h, text: emit(sys.stdout, h, text))
    failed = []
    for h in cfg.hosts:
        r = results[h]
        for ln in r.err.splitlines():
            emit(sys.stderr, h, ln)
        if r.rc == 124:
            failed.append(f"{h} (no answer within {timeout:g}s)")
        elif not r.ok:
            failed.append(f"{h} (exit {r.rc})")
    if failed:
        print(f"{PROG}: failed on {len(failed)} of {len(cfg.hosts)} hosts: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def ssh_free(cfg):
    """dq-free's rows: each host's GPUs no process uses and no dq job holds
    (polled now), and those shared ones with room left for a booking."""
    polls = poll_hosts(cfg, with_ps=False)
    places = Placements.read(cfg)
    reserved = reserved_by_host(places)
    drained = read_drains(cfg)
    rooms = share_rooms(polls, places, cfg, [h for h in cfg.hosts if not polls[h].error])
    out = []
    for h in cfg.hosts:
        s = polls[h]
        if s.error:
            warn(f"{h}: {s.error}")
        free = sorted(s.free(reserved.get(h, ())), reverse=True)
        info = {g.index: g for g in s.gpus}

        def gpu(i):
            return {"index": i, "name": info[i].name, "memory_total_mib": info[i].total,
                    "free_mem_mib": max(0, rooms[h][i][0]) if i in rooms.get(h, {}) else 0}
        out.append({"host": h, "free": free, "gpus": len(s.gpus), "error": s.error,
                    "drained": drained.get(h), "free_gpus": [gpu(i) for i in free],
                    # GPUs shared with (or by) others that have room left
                    "shared_gpus": [dict(gpu(i), jobs=r[1]) for i, r in
                                    sorted(rooms.get(h, {}).items())
                                    if i not in free and r[0] > 0]})
    return out


def cmd_free(cfg, argv):
    p = parser("free", "List the unused GPUs of each host: no process on them (nvidia-smi) "
               "and not\nreserved for a dq job; then the GPUs that still have room for "
               "sharing jobs\n(DQ_MEM), with how much each may book.")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = parse(p, argv)
    ensure_layout(cfg)
    out = slurm_free(cfg) if is_slurm(cfg) else ssh_free(cfg)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for o in out:
        if o["drained"]:
            why = o["drained"]["reason"]
            print(f"{o['host']}: drained" + (f" ({why})" if why else ""))
        elif o["free"] or o["shared_gpus"]:
            shared = ", ".join(f"{g['index']} ({fmt_mib(g['free_mem_mib'])} free)"
                               for g in o["shared_gpus"])
            print(f"{o['host']}: {' '.join(map(str, o['free']))}".rstrip() +
                  (("; " if o["free"] else " ") + f"shared: {shared}" if shared else ""))
    return 0


# Doctor ######################################################################

# dq-doctor: is this cluster set up as dq needs?  One remote script per host,
# all hosts at once, while this process holds an fcntl lock on the data root
# (which every host must then fail to take: locks shared across hosts are
# what keeps two hosts from handing out one GPU).  Each check is a line:
# level (ok, WARN, FAIL), host, check, what was found, and the fix.
SLOW_SHELL = 0.3        # seconds a remote command may take before it is slow
CLOCK_SKEW = 1.0        # seconds two clocks may differ

LOCK_PROBE = ("import fcntl,sys\n"
              "try:\n f=open(sys.argv[1],'a')\nexcept OSError as e:\n print('open',e.strerror);"
              "sys.exit()\n"
              "try:\n fcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\n print('taken')\n"
              "except OSError as e:\n print('refused',e.errno)\n")


class Check:
    def __init__(self, host, name, level, found, fix=""):
        self.host, self.name, self.level, self.found, self.fix = host, name, level, found, fix

    def to_dict(self):
        return {"host": self.host, "check": self.name, "level": self.level,
                "ok": self.level != "FAIL", "found": self.found, "fix": self.fix or None}


def doctor_script(cfg, token_path, lock_path):
    py = q(cfg.python)
    return (f"echo @@start\n"
            f"echo \"@@clock $(date +%s.%N)\"\n"
            f"echo \"@@token $(cat {q(token_path)} 2>/dev/null || echo missing)\"\n"
            f"echo \"@@screen $(command -v screen || echo missing)\"\n"
            f"echo \"@@python $({py} -c 'import sys; print(\"%d.%d.%d\" % "
            f"sys.version_info[:3])' 2>/dev/null || echo missing)\"\n"
            f"echo \"@@lock $({py} -c {q(LOCK_PROBE)} {q(lock_path)} 2>&1 | head -1)\"\n"
            f"echo @@smi; timeout {smi_timeout(cfg)} {SMI_GPUS} </dev/null 2>&1; "
            f"echo \"@@rc $?\"\n")


def doctor_host(cfg, host, r, t_sent, token, quick):
    """The checks of one host from its answer r (and quick: the seconds a
    command that does nothing took there)."""
    out = []

    def add(name, level, found, fix=""):
        out.append(Check(host, name, level, found, fix))
    if not r.ok and "@@start" not in r.out:
        add("ssh", "FAIL", r.why(),
            f"dq needs ssh to {host} without a password or prompt: set up keys "
            f"(ssh-copy-id {host}) and check '{' '.join(cfg.ssh)} {host} true' asks nothing")
        return out
    head, _, body = r.out.partition("@@start\n")
    if head.strip():
        add("shell output", "FAIL", f"the shell prints {head.strip().splitlines()[0][:60]!r} "
            f"before every remote command",
            "your shell start-up files (~/.bashrc, ~/.profile; ~/.zshenv for zsh) print "
            "even for commands over ssh: print only in interactive shells, e.g. start "
            "~/.bashrc with: case $- in *i*) ;; *) return ;; esac")
    else:
        add("ssh", "ok", f"a command takes {quick:.2f} s" if quick is not None
            else "answers")
    if quick is not None and quick > SLOW_SHELL:
        add("shell start-up", "WARN", f"every remote command takes {quick:.2f} s (a bare "
            f"shell takes ~0.02 s), and dq runs one per host at each pass",
            "your shell start-up on this host is slow (conda init, pyenv, nvm or module "
            "loads in ~/.bashrc, or ~/.zshenv for zsh): make it return early for "
            "non-interactive shells, e.g. start ~/.bashrc with: "
            "case $- in *i*) ;; *) return ;; esac")
    fields = dict(re.findall(r"^@@(\w+) ?(.*)$", body, re.M))
    got = fields.get("token", "missing")
    if got == token:
        add("data root", "ok", f"{cfg.root} is the same directory")
    else:
        add("data root", "FAIL", f"{cfg.root} on {host} is not the directory this host "
            f"sees there (a file written here is {'missing' if got == 'missing' else 'other'} "
            f"there)", f"mount the same shared directory at {cfg.root} on every host "
            f"(e.g. the same NFS export), or install dq where every host sees it")
    lock = fields.get("lock", "")
    if got != token:
        pass        # another directory: its locks say nothing
    elif lock.startswith("refused"):
        add("locks", "ok", "a lock held here holds there too")
    elif lock.startswith("taken"):
        add("locks", "FAIL", f"{host} took a lock on the data root that this host holds: "
            f"locks are not shared between hosts, so two could hand out one GPU",
            "mount the data root with working locks (NFS: not 'nolock' or "
            "'local_lock=all'; run the NFS lock service, rpc.statd)")
    else:
        add("locks", "FAIL", f"cannot test a lock there ({lock or 'no answer'})",
            f"check that {cfg.python} runs on {host} and can open files in {cfg.root}/state")
    screen = fields.get("screen", "missing")
    if screen == "missing" or not screen:
        add("screen", "FAIL", "GNU screen is not installed (or not on PATH)",
            f"install it on {host} (apt-get install screen, dnf install screen)")
    else:
        add("screen", "ok", screen)
    python = fields.get("python", "missing")
    version = tuple(int(x) for x in python.split(".")) if \
        re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", python) else None
    if version is None:
        add("python", "FAIL", f"{cfg.python} does not run there",
            f"install Python 3.9 or later on {host}, or name it in dq.conf "
            f"('python = /usr/bin/python3')")
    elif version < (3, 9):
        add("python", "FAIL", f"{cfg.python} is {python}", f"dq needs Python 3.9 or later "
            f"on {host}; name a newer one in dq.conf ('python = python3.11')")
    else:
        add("python", "ok", f"{cfg.python} {python}")
    smi = body.partition("@@smi\n")[2].rpartition("@@rc ")
    rc = smi[2].strip()
    try:
        gpus = parse_smi_gpus(smi[0]) if rc == "0" else None
    except ValueError:
        gpus = None
    if gpus is None:
        said = smi[0].strip().splitlines()
        add("nvidia-smi", "FAIL", ("timed out" if rc == "124" else "not found" if rc == "127"
                                   else said[0][:100] if said else f"exit status {rc}"),
            f"nvidia-smi must answer '{SMI_GPUS.split(' --format')[0]}' on {host}: "
            f"check the NVIDIA driver there (nvidia-smi alone says more)")
    elif not gpus:
        add("nvidia-smi", "WARN", "no GPUs", "a host without GPUs only runs DQ_GPUS=0 jobs")
    else:
        kinds = {}
        for g in gpus:
            kinds[(g.name, g.total)] = kinds.get((g.name, g.total), 0) + 1
        add("nvidia-smi", "ok", ", ".join(f"{n} x {name or '?'} ({fmt_mib(total)})"
                                          for (name, total), n in kinds.items()))
    clock = fields.get("clock", "")
    try:
        skew = float(clock) - (t_sent + r.seconds / 2)
    except ValueError:
        skew = None
    if skew is None:
        add("clock", "FAIL", "date gave no time", f"check 'date' on {host}")
    elif abs(skew) > CLOCK_SKEW + r.seconds / 2:
        add("clock", "FAIL", f"{abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} this "
            f"host", "run NTP on every host (chrony or systemd-timesyncd): runtimes, waits "
            "and time limits come from different hosts' clocks")
    else:
        add("clock", "ok", f"within {max(abs(skew), 0.001):.3f} s of this host")
    return out


def doctor_local(cfg):
    """The data root, from here: its directories, and who may change dq.conf."""
    out = []
    where = os.uname().nodename.split(".")[0]
    bad = []
    try:
        root_st = os.stat(cfg.root)
    except OSError as e:
        raise Failure(f"cannot read {cfg.root}: {e.strerror}") from None
    group_install = bool(root_st.st_mode & 0o2000)     # install.sh DIR GROUP
    for sub in LAYOUT:
        path = cfg.p(sub)
        if not os.path.isdir(path):
            bad.append(f"{path} is missing")
        elif not os.access(path, os.R_OK | os.X_OK | (os.W_OK if sub != "jobs" else 0)):
            bad.append(f"you cannot {'read' if sub == 'jobs' else 'write'} {path}")
        elif group_install and os.stat(path).st_gid != root_st.st_gid:
            bad.append(f"{path} is not in the data root's group (a lab install gives every "
                       f"directory the lab's group)")
    if bad:
        out.append(Check(where, "permissions", "FAIL", bad[0] + (f" (and {len(bad) - 1} more)"
                                                                 if len(bad) > 1 else ""),
                         f"ask the admin to run install.sh for {cfg.root} again" +
                         access_hint(cfg.root)))
    else:
        out.append(Check(where, "permissions", "ok", f"you can use every directory of "
                                                     f"{cfg.root}"))
    trusted, why = admins(cfg)
    if why:
        out.append(Check(where, "admins", "WARN", why.split("; ")[0],
                         why.split("; ", 1)[1] if "; " in why else ""))
    else:
        out.append(Check(where, "admins", "ok", ", ".join(sorted(trusted))))
    return out


# How long dq-doctor waits for its probe job on Slurm (queued, then run)
SLURM_PROBE_WAIT = 60


def doctor_slurm(cfg, token_path, token):
    """dq-doctor's checks of the Slurm back end: Slurm answers (sinfo),
    munge works here, and a tiny job on a compute node runs dq's Python and
    reads the data root (sbatch --wait, at most SLURM_PROBE_WAIT s)."""
    where = "slurm"
    checks = []
    res = slurm_call(cfg, ["sinfo", "-h", "-o", "%P|%a|%D|%T"])
    if not res.ok:
        return [Check(where, "slurm", "FAIL", f"sinfo: {res.why()}",
                      "check that slurmctld runs and that this host reaches it (SLURM_CONF, "
                      f"or slurm_conf in {cfg.path})")]
    parts = sorted({ln.split("|")[0] for ln in res.out.splitlines() if ln.strip()})
    checks.append(Check(where, "slurm", "ok", f"sinfo answers: partitions {', '.join(parts)}"))
    # munge through the socket Slurm uses (AuthInfo=socket=... when not the default)
    conf = slurm_call(cfg, ["scontrol", "show", "config"])
    sock = re.search(r"^AuthInfo\s*=.*\bsocket=([^,\s]+)", conf.out, re.M) if conf.ok else None
    opt = f" --socket={q(sock.group(1))}" if sock else ""
    mres = run_scripts(cfg, [(SLURM_HOST, f"munge{opt} -n | unmunge{opt} >/dev/null\n")])[0]
    checks.append(Check(where, "munge", "ok", f"munge -n | unmunge works{opt}") if mres.ok else
                  Check(where, "munge", "FAIL", f"munge -n | unmunge: {mres.why()}",
                        "start munged here, with the cluster's munge.key"))
    out = token_path + ".slurm"
    script = (f"#!/bin/sh\nhostname\ncat {q(token_path)}\n"
              f"{dq_command(cfg, '--version')}\n")
    name = "dq-doctor-" + token
    argv = ["sbatch", "--parsable", "--wait", f"--job-name={name}", f"--output={out}",
            "--no-requeue"] + slurm_site_args(cfg)
    res = slurm_call(cfg, argv, script, timeout=SLURM_PROBE_WAIT)
    try:
        with open(out, encoding="utf-8", errors="replace") as f:
            seen = f.read().split()
    except OSError:
        seen = []
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    if res.rc == 124:
        slurm_call(cfg, ["scancel", f"--name={name}"])
        checks.append(Check(where, "probe job", "WARN", f"a one-second job did not run within "
                            f"{SLURM_PROBE_WAIT}s (the cluster is full, or the partition "
                            f"down)", "run dq-doctor again when a node is free"))
    elif len(seen) >= 2 and seen[1] == token and "dq" in seen[2:3]:
        checks.append(Check(where, "probe job", "ok", f"a job on {seen[0]} read the data root "
                            f"and ran dq ({' '.join(seen[2:4])})"))
    else:
        what = res.why() if not res.ok else " ".join(seen[1:4]) or "no output"
        checks.append(Check(where, "probe job", "FAIL", f"a job on Slurm's node "
                            f"{seen[0] if seen else '?'} did not read the data root or run "
                            f"dq ({what})",
                            f"the nodes must mount {cfg.root} as here and have {cfg.python} "
                            f"and screen"))
    return checks


def cmd_doctor(cfg, argv):
    p = parser("doctor", "Check that the cluster is set up as dq needs: ssh, the shared data "
               "root and its\nlocks, screen, Python, nvidia-smi and clocks on every host, "
               "in parallel.\nOne line per check and host, with the fix; exit status 0 when "
               "nothing failed\n(warnings do not fail).")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = parse(p, argv)
    ensure_layout(cfg)
    import secrets
    token = secrets.token_hex(8)
    token_path = cfg.p("state", f"doctor-{me()}-{token}")
    lock_path = cfg.p("state", f"doctor-{me()}.lock")
    checks = doctor_local(cfg)
    need_hosts(cfg)
    if not cfg.local:
        try:
            with open(token_path, "w") as f:
                f.write(token + "\n")
            lock = open(lock_path, "a")
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise Failure(f"cannot write in {cfg.p('state')}: {e.strerror}"
                          f"{access_hint(cfg.root, e)}")
        try:
            if is_slurm(cfg):
                checks += doctor_slurm(cfg, token_path, token)
            t_sent = time.time()
            answers = run_on_all(cfg, cfg.hosts,
                                 lambda h: doctor_script(cfg, token_path, lock_path))
            # Once connections are open: what a command that does nothing costs
            quick = run_on_all(cfg, [h for h, r in answers.items() if r.ok],
                               lambda h: "true\n")
        finally:
            lock.close()
            for path in (token_path, lock_path):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        for h in cfg.hosts:
            q_r = quick.get(h)
            checks += doctor_host(cfg, h, answers[h], t_sent, token,
                                  q_r.seconds if q_r is not None and q_r.ok else None)
    else:
        checks.append(Check(cfg.hosts[0], "hosts", "WARN", "no hosts in dq.conf: this machine "
                            "alone, without ssh", f"list the GPU servers in {cfg.path} "
                            f"('hosts = deep1 deep2') to check them"))
    failed = any(c.level == "FAIL" for c in checks)
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=1))
    else:
        width = max(len(c.host) for c in checks)
        for c in checks:
            print(f"{c.level:<4}  {c.host:<{width}}  {c.name:<14}  {c.found}" +
                  (f"; fix: {c.fix}" if c.fix and c.level != "ok" else ""))
        print(f"{sum(c.level == 'FAIL' for c in checks)} failed, "
              f"{sum(c.level == 'WARN' for c in checks)} warnings, "
              f"{sum(c.level == 'ok' for c in checks)} ok")
    return 1 if failed else 0


# Shell completion ############################################################

def cmd__complete(cfg, argv):
    """Internal, for the shell completion (extras/dq.bash): `ids` prints the
    numbers of your queued and running jobs and of your last ended ones
    (kept in jobs/done/<user>: the history is never listed);
    `hosts` the hosts of dq.conf.  Never an error: completion stays quiet."""
    what = argv[0] if argv else ""
    if what == "hosts":
        print("\n".join(cfg.hosts))
    elif what == "ids":
        user = me()
        active = [n.split("-")[0] for n in index_names(cfg, user=user)]
        # the last ended ones from the completed-job counter: no listing of
        # the whole history
        counters = stored_counters(cfg, user) or user_counters(cfg, user)
        seen = dict.fromkeys(active + [i.split("-")[0] for i in counters["recent"]])
        print("\n".join(seen))
    return 0


# Web page (HTML, CSS, JS) ####################################################

WEB_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dq</title><link rel="stylesheet" href="style.css"></head>
<body><header><h1>dq</h1><span id="summary">loading...</span>
<span id="updated"></span></header>
<main>
<section id="hosts-section"><h2>GPUs</h2><div id="hosts"></div></section>
<section id="history-section"><h2>GPUs in use, by user</h2><div id="charts">loading...</div>
</section>
<section><h2>This week</h2><table id="week"></table></section>
<section><h2>Users</h2><table id="users"></table></section>
<section><h2>Running</h2><table id="running"></table></section>
<section><h2>Queue</h2><table id="queue"></table></section>
<section><h2>Recently ended</h2><table id="completed"></table></section>
</main><script src="app.js"></script></body></html>
"""


# Colours from the Okabe-Ito palette (they read for colour-blind users), and
# every state is also written as a word.
WEB_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
header{display:flex;flex-wrap:wrap;gap:1em;align-items:baseline;padding:.5em 1em;
 background:#0072B2;color:#fff}
header h1{margin:0;font-size:1.4em}#updated{opacity:.8;font-size:.9em}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,36em),1fr));
 gap:1em;padding:1em}
#hosts-section,#history-section{grid-column:1/-1}
#charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,30em),1fr));gap:1em}
.chart{margin:0;background:#fff;border:1px solid #ccc;border-radius:6px;padding:.5em .7em}
.chart figcaption{font-weight:bold}
.plot{display:grid;grid-template-columns:auto 1fr;gap:0 .4em}
.plot svg{width:100%;height:9em;display:block;background:#f4f4f4}
.axis{font-size:.8em;color:#444;display:flex;justify-content:space-between}
.ymax{font-size:.8em;color:#444;align-self:start}
.legend{list-style:none;padding:0;margin:.4em 0 0;display:flex;flex-wrap:wrap;gap:.2em 1em}
.legend li{display:flex;align-items:center;gap:.3em}
.swatch{width:.9em;height:.9em;border:1px solid #0003;flex:none}
.spark{width:100%;height:1.2em;display:block;background:#f4f4f4}
.spark polyline{fill:none;stroke:#D55E00;stroke-width:1.5;vector-effect:non-scaling-stroke}
#hosts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,22em),1fr));gap:.8em}
h2{font-size:1.1em;margin:.2em 0 .5em}
.host{background:#fff;border:1px solid #ccc;border-radius:6px;padding:.5em .7em}
.host h3{margin:0 0 .3em;font-size:1em;display:flex;justify-content:space-between}
.host.down{border:2px dashed #D55E00}.host.drained{border:2px dotted #E69F00}
.tag{font-size:.8em;padding:0 .4em;border-radius:3px;color:#fff;background:#D55E00}
.tag.drained{background:#E69F00;color:#000}
.gpu{display:grid;grid-template-columns:2em 1fr 4.5em;gap:.1em .4em;margin:.3em 0;
 align-items:end}
.idx{font-weight:bold;text-align:right}
.bar{height:.9em;background:#e5e5e5;border-radius:3px;overflow:hidden;display:flex}
.bar>div{height:100%;background:#0072B2}
.bar>.share.s1{background:#56B4E9}.bar>.share{border-right:1px solid #fff;box-sizing:border-box}
.bar>.hand{background:#999}
.gpu.free .bar>div{background:#009E73}
.who{grid-column:2/-1;font-size:.85em;color:#444;overflow-wrap:anywhere}
.free-word{color:#006e50;font-weight:bold}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9em}
th,td{text-align:left;padding:.2em .5em;border-bottom:1px solid #eee;vertical-align:top;
 white-space:nowrap}
td:last-child{white-space:normal;overflow-wrap:anywhere;width:100%}
section{overflow-x:auto}
th{background:#f0f0f0}
@media (min-width:2000px){body{font-size:18px}}
"""

WEB_JS = r"""
"use strict";
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function dur(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60);
  return d ? d + "d" + h + "h" : h ? h + "h" + m + "m" : m ? m + "m" + (s % 60) + "s" : s + "s";
}
function gb(mib) { return mib === null ? "?" : (mib / 1024).toFixed(mib < 10240 ? 1 : 0); }
function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const tr = el("tr");
  head.forEach(h => tr.appendChild(el("th", null, h)));
  t.appendChild(tr);
  if (!rows.length) {
    const r = el("tr"), c = el("td", null, "none");
    c.colSpan = head.length; r.appendChild(c); t.appendChild(r);
  }
  rows.forEach(row => {
    const r = el("tr");
    row.forEach(v => r.appendChild(el("td", null, v)));
    t.appendChild(r);
  });
}
function desc(j) {
  const what = j.interactive ? "[shell] " + (j.args.length > 3 ? j.args.slice(3).join(" ")
                                                               : j.script) : j.script;
  return j.desc ? what + " (" + j.desc + ")" : what;
}
function idleText(j, now) {   // a job flagged idle (idle_after): for how long
  const u = j.gpu_use;
  return u && u.idle && u.idle_since ? " IDLE " + dur(now - u.idle_since) : "";
}
function memText(j) {     // a sharing job's GPU memory: used now / booked, OVER past it
  if (!j.mem_mib) return "";
  const u = j.gpu_use, used = u && u.mem_mib !== null ? gb(u.mem_mib) + "G" : "-";
  return " " + (u && u.over ? "OVER " : "") + used + "/" + gb(j.mem_mib) + "G";
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
  return e;
}
const SPARK = 1800;     // seconds a sparkline spans (dq-web's WEB_SPARK)
function spark(points, now) {   // a GPU's utilisation over the last half hour
  const s = svg("svg", {"class": "spark", viewBox: "0 0 100 100",
                        preserveAspectRatio: "none", role: "img"});
  const known = points.filter(p => p[1] !== null);
  const t = svg("title");
  t.textContent = known.length ? "utilisation, last 30 min: now " +
    known[known.length - 1][1] + "%, peak " + Math.max(...known.map(p => p[1])) + "%"
    : "utilisation: not known yet";
  s.setAttribute("aria-label", t.textContent);
  s.appendChild(t);
  if (known.length) {
    const xy = p => (100 - 100 * Math.min(SPARK, now - p[0]) / SPARK).toFixed(1) + "," +
                    (98 - 0.96 * p[1]).toFixed(1);
    const pts = known.map(xy);
    if (pts.length === 1) pts.unshift("0," + pts[0].split(",")[1]);
    s.appendChild(svg("polyline", {points: pts.join(" ")}));
  }
  return s;
}
// Okabe-Ito: one colour per user, the same in both charts
const PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00",
                 "#CC79A7", "#000000"];
let totalGpus = 0;
function hours(h) { return h.toFixed(2); }
function chart(name, title, c, colour) {
  const fig = el("figure", "chart");
  fig.id = "chart-" + name;
  fig.appendChild(el("figcaption", null, title));
  const stack = c.steps ? c.users.reduce((acc, u) => acc.map((v, i) => v + u.gpus[i]),
                                         new Array(c.steps).fill(0)) : [];
  const top = Math.max(1, totalGpus, Math.ceil(Math.max(0, ...stack)));
  const plot = el("div", "plot");
  plot.appendChild(el("span", "ymax", top + " GPUs"));
  const box = el("div");
  const s = svg("svg", {viewBox: "0 0 " + c.steps + " 100", preserveAspectRatio: "none",
                        role: "img", "aria-label": title + ": GPUs in use, stacked by user"});
  const base = new Array(c.steps).fill(0);
  c.users.forEach(u => {
    let up = "", down = "";
    for (let i = 0; i < c.steps; i++) {
      const y0 = 100 - 100 * base[i] / top, y1 = 100 - 100 * (base[i] + u.gpus[i]) / top;
      up += (i ? " L" : "M") + i + " " + y1.toFixed(2) + " L" + (i + 1) + " " + y1.toFixed(2);
      down = " L" + (i + 1) + " " + y0.toFixed(2) + " L" + i + " " + y0.toFixed(2) + down;
      base[i] += u.gpus[i];
    }
    const path = svg("path", {d: up + down + " Z", fill: colour(u.user), "data-user": u.user});
    const t = svg("title");
    t.textContent = u.user + ": " + hours(u.gpu_hours) + " GPU-hours";
    path.appendChild(t);
    s.appendChild(path);
  });
  box.appendChild(s);
  const axis = el("div", "axis");
  axis.appendChild(el("span", null, new Date(c.start * 1000).toLocaleString([],
    {weekday: "short", hour: "2-digit", minute: "2-digit"})));
  axis.appendChild(el("span", null, "now"));
  box.appendChild(axis);
  plot.appendChild(box);
  fig.appendChild(plot);
  const legend = el("ul", "legend");
  if (!c.users.length) legend.appendChild(el("li", null, "no GPU in use"));
  c.users.forEach(u => {
    const li = el("li"), sw = el("span", "swatch");
    sw.style.background = colour(u.user);
    li.appendChild(sw);
    li.appendChild(el("span", null, u.user + " " + hours(u.gpu_hours) + " GPU-h"));
    if (u.others) li.title = u.others.join(", ");
    legend.appendChild(li);
  });
  fig.appendChild(legend);
  return fig;
}
function renderHistory(h) {
  const colours = {};
  let next = 0;
  [h.charts["7d"], h.charts["24h"]].forEach(c => c.users.forEach(u => {
    if (!(u.user in colours)) colours[u.user] = u.others ? "#999999" :
      PALETTE[next++ % (PALETTE.length - 1)];
  }));
  const charts = document.getElementById("charts");
  charts.replaceChildren(chart("24h", "Last 24 hours", h.charts["24h"], u => colours[u]),
                         chart("7d", "Last 7 days", h.charts["7d"], u => colours[u]));
  const rows = h.week.map(r => [r.user, r.jobs, hours(r.gpu_hours), hours(r.idle_gpu_hours)]);
  if (h.week.length) rows.push(["total", h.week_total.jobs, hours(h.week_total.gpu_hours),
                                hours(h.week_total.idle_gpu_hours)]);
  table("week", ["User", "Jobs", "GPU-h", "Idle GPU-h"], rows);
}
function render(s) {
  const now = s.at;
  totalGpus = s.total_gpus;
  document.title = "dq: " + s.free_gpus + " of " + s.total_gpus + " GPUs free";
  document.getElementById("summary").textContent =
    s.free_gpus + " of " + s.total_gpus + " GPUs free, " + s.running.length + " running, " +
    s.queued_total + " queued";
  document.getElementById("updated").textContent =
    "as of " + new Date(s.at * 1000).toLocaleTimeString();
  const hosts = document.getElementById("hosts");
  hosts.replaceChildren();
  s.hosts.forEach(h => {
    const box = el("div", "host" + (h.error ? " down" : "") + (h.drained ? " drained" : ""));
    const title = el("h3");
    title.appendChild(el("span", null, h.host));
    if (h.error)
      title.appendChild(el("span", "tag", h.reachable ? "nvidia-smi failing" : "unreachable"));
    if (h.drained) title.appendChild(el("span", "tag drained",
      "drained" + (h.drained.reason ? ": " + h.drained.reason : "")));
    box.appendChild(title);
    if (h.error) box.appendChild(el("div", "who", h.error));
    h.gpus.forEach(g => {
      const row = el("div", "gpu" + (g.free ? " free" : ""));
      row.appendChild(el("span", "idx", g.index));
      const info = el("div");
      info.appendChild(el("div", null, (g.name || "GPU") + " - " + gb(g.memory_used_mib) +
        " of " + gb(g.memory_total_mib) + " GB" +
        (g.utilization !== null ? ", " + g.utilization + "% busy" : "")));
      const bar = el("div", "bar"), total = g.memory_total_mib || 0;
      const part = (mib, cls, title) => {
        const d = el("div", cls);
        d.style.width = (total ? Math.min(100, 100 * mib / total) : 0).toFixed(1) + "%";
        d.title = title;
        bar.appendChild(d);
      };
      if (g.bookings.length) {      // a shared GPU: each job's booked part, then by hand
        g.bookings.forEach((b, i) => part(b.mem_mib, "share s" + (i % 2),
          "dq job " + b.job + " (" + b.user + "): " + gb(b.used_mib) + " of " +
          gb(b.mem_mib) + " GB booked"));
        if (g.foreign_mib) part(g.foreign_mib, "hand", "used by hand: " + gb(g.foreign_mib) + " GB");
      } else {
        part(g.memory_used_mib || 0, "used", "in use: " + gb(g.memory_used_mib) + " GB");
      }
      info.appendChild(bar);
      row.appendChild(info);
      row.appendChild(spark(g.util_recent || [], now));
      const who = el("div", "who");
      if (g.free) who.appendChild(el("span", "free-word", "free"));
      else if (!g.processes.length && g.job && !g.bookings.length)
        who.textContent = "reserved for " + g.job;
      g.bookings.forEach((b, i) => who.appendChild(el("span", null, (i ? "; " : "") +
        "dq job " + b.job + " (" + b.user + ") uses " + gb(b.used_mib) + " of " +
        gb(b.mem_mib) + " GB booked")));
      const booked = new Set(g.bookings.map(b => b.job));
      g.processes.filter(p => !booked.has(p.job)).forEach(p => {
        who.appendChild(el("span", null, (who.childNodes.length ? "; " : "") + p.user + " " +
          p.process + (p.job ? " (dq job " + p.job + ")" : " (by hand, pid " + p.pid + ")")));
      });
      row.appendChild(who);
      box.appendChild(row);
    });
    hosts.appendChild(box);
  });
  table("users", ["User", "GPUs", "Running", "Queued"],
        s.users.map(u => [u.user, u.gpus, u.running, u.queued]));
  table("running", ["Job", "User", "Host/GPU", "Runtime", "Left", "Script"],
        s.running.map(j => [j.id, j.user, j.host + "/" + j.gpus.join(",") + memText(j) +
          idleText(j, now) +
          (j.reason ? " (" + j.reason + ")" : ""), dur(now - j.started),
          j.time_limit ? dur(j.started + j.time_limit - now) : "-", desc(j)]));
  table("queue", ["Job", "User", "GPUs", "Wait", "Reason", "Script"],
        s.queue.map(j => [j.id, j.user, j.gpus_wanted, dur(now - j.submitted), j.reason,
          desc(j)]));
  if (s.queued_total > s.queue.length) {
    const t = document.getElementById("queue");
    t.insertBefore(el("caption", null, "the first " + s.queue.length + " of " +
      s.queued_total + " queued jobs"), t.firstChild);
  }
  table("completed", ["Job", "User", "State", "Exit", "Runtime", "Script"],
        s.completed.map(j => [j.id, j.user, j.state,
          j.signal || (j.exit_code === null ? "-" : j.exit_code),
          j.started && j.ended ? dur(j.ended - j.started) : "-", desc(j)]));
}
async function poll(path, draw, where, what) {   // on failure: say so in `where`
  try {
    const r = await fetch(path, {cache: "no-store"});
    if (!r.ok) throw new Error(r.status);
    draw(await r.json());
  } catch (e) {
    document.getElementById(where).textContent = "no " + what + " from dq-web (" + e + ")";
  }
}
const update = () => poll("api/state", render, "updated", "answer");
const updateHistory = () => poll("api/history", renderHistory, "charts", "history");
update().then(updateHistory);
setInterval(update, 5000);
setInterval(updateHistory, 60000);
"""


# Web view ####################################################################

# dq-web: one page of the whole cluster, updating itself from /api/state
# (the same data as the --json listings), served by the standard library.
# Read-only: GET only, no action changes anything.  One poll of the cluster
# serves every viewer: the state is kept WEB_CACHE seconds, and viewers who
# ask meanwhile (or while it is being made) get that one.
WEB_CACHE = 3.0
WEB_QUEUE = 200         # queued jobs the page lists (the rest are counted)
SMI_UTIL = "nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits"


def web_state(cfg, polls=0):
    """Everything the page shows: hosts and their GPUs (type, memory,
    utilisation, who and which job uses each), running jobs, the queue with
    reasons, users, the last completed jobs."""
    started = time.time()
    need_hosts(cfg)
    script = users_script(cfg) + (f"echo @@util; timeout {smi_timeout(cfg)} {SMI_UTIL} "
                                  f"</dev/null 2>&1; echo \"@@rc $?\"\n")
    results = run_on_all(cfg, cfg.hosts, lambda h: script)
    if is_slurm(cfg):   # Slurm's allocations and drains; dq's running jobs
        places, reserved, drains = slurm_places(cfg), slurm_gpus_in_use(cfg), slurm_drains(cfg)
    else:
        places = Placements.read(cfg)
        reserved, drains = reserved_by_host(places), read_drains(cfg, quiet=True)
    holders = {(p["host"], g): job_id for job_id, p in places.items() for g in p["gpus"]}
    hosts, free, total = [], 0, 0
    for h in cfg.hosts:
        st, rows = gpu_users(h, results[h], started)
        free_here = set(st.free(reserved.get(h, ()))) if h not in drains else set()
        util = dict(re.findall(r"^\s*([0-9]+),\s*([0-9]+)\s*$",
                               results[h].out.partition("@@util\n")[2], re.M))
        gpus = []
        for g in st.gpus:
            users = [r for r in rows if r["gpu"] == g.index]
            job = holders.get((h, g.index))
            is_free = g.index in free_here
            free += is_free
            total += 1
            gpus.append({"index": g.index, "name": g.name, "memory_total_mib": g.total,
                         "memory_used_mib": g.used,
                         "utilization": int(util[str(g.index)]) if str(g.index) in util
                         else None, "job": job, "free": is_free,
                         # sharing jobs' parts of its memory (booked, used now)
                         "bookings": [{"job": job_id, "user": p["user"], "mem_mib": p["mem"],
                                       "used_mib": sum(r["mem_mb"] or 0 for r in users
                                                       if r["job"] == job_id)}
                                      for job_id, p in sorted(places.items())
                                      if p["host"] == h and g.index in p["gpus"]
                                      and "mem" in p],
                         "foreign_mib": foreign_mib(g, h, places),
                         "processes": [{k: r[k] for k in ("pid", "user", "process", "job",
                                                          "mem_mb")} for r in users]})
        hosts.append({"host": h, "reachable": st.reachable, "error": st.error,
                      "drained": drains.get(h), "gpus": gpus})
    # A deep queue is counted from the index names; only its first
    # WEB_QUEUE jobs are read and sent (10,000 rows help nobody).
    ids = active_ids(cfg)
    waiting = [i for i in ids if i not in places]
    active = active_jobs(cfg, None, places, [i for i in ids if i in places] +
                         waiting[:WEB_QUEUE])
    running = [j for j in active if j["state"] == "running"]
    queued = [j for j in active if j["state"] == "queued"]
    queue_reasons(cfg, queued, places)
    running_notes(cfg, running, time.time())
    users = {}
    for job_id in ids:
        user = job_id.split("-", 1)[1]
        users.setdefault(user, {"user": user, "gpus": 0, "running": 0, "queued": 0})
    for j in running:
        users[j["user"]]["running"] += 1
        users[j["user"]]["gpus"] += len(j["gpus"])
    for job_id in waiting:
        users[job_id.split("-", 1)[1]]["queued"] += 1
    for j in active:
        if j["state"] == "queued" and j["id"] in places:    # placed, not started yet
            users[j["user"]]["queued"] += 1
    return {"format": FORMAT, "at": started, "polls": polls, "free_gpus": free,
            "total_gpus": total, "hosts": hosts, "running": running, "queue": queued,
            "queued_total": len(waiting) + sum(1 for j in queued if j["id"] in places),
            "users": sorted(users.values(), key=lambda u: (-u["gpus"], u["user"])),
            "completed": completed_jobs(cfg, None, last=15)[::-1]}


# Each GPU's utilisation over the last WEB_SPARK seconds, from dq-web's own
# polls (one point per WEB_SPARK_STEP at most), for the page's sparklines.
WEB_SPARK, WEB_SPARK_STEP = 1800, 15


class WebState:
    def __init__(self, cfg):
        import threading
        self.cfg, self.lock = cfg, threading.Lock()
        self.data, self.made, self.polls = None, 0.0, 0
        self.util = {}      # (host, GPU index) -> [[time, % or None], ...]

    def get(self):
        with self.lock:     # one poll at a time; those waiting get its answer
            if self.data is None or time.monotonic() - self.made >= WEB_CACHE:
                state = web_state(self.cfg, self.polls + 1)
                self.remember_util(state)
                self.data = json.dumps(state).encode()
                self.made, self.polls = time.monotonic(), self.polls + 1
            return self.data

    def remember_util(self, state):
        """Add this poll's utilisation to each GPU's recent points and give
        each GPU in `state` its points (util_recent: [[time, %], ...])."""
        at, keep = state["at"], set()
        for h in state["hosts"]:
            for g in h["gpus"]:
                key = (h["host"], g["index"])
                keep.add(key)
                points = self.util.setdefault(key, [])
                if not points or at - points[-1][0] >= WEB_SPARK_STEP:
                    points.append([round(at, 1), g["utilization"]])
                else:       # within a step: the newest value stands for it
                    points[-1][1] = g["utilization"]
                while points and points[0][0] < at - WEB_SPARK:
                    points.pop(0)
                g["util_recent"] = list(points)
        for key in set(self.util) - keep:      # a GPU that is gone
            del self.util[key]


# The page's history (/api/history): GPUs in use over the last day and week,
# stacked by user, and the week's table, from the users' histories (as
# dq-report reads them) plus the jobs running now.  Made at most once per
# WEB_HISTORY_CACHE seconds, for every viewer.
WEB_HISTORY_CACHE = 60.0
# (name, span, step): 96 quarter-hours, 84 two-hour steps
WEB_HISTORY_CHARTS = (("24h", 86400, 900), ("7d", 7 * 86400, 7200))
WEB_HISTORY_USERS = 7      # users drawn one by one (Okabe-Ito has 8 colours); the rest: others


def gpus_in_use(intervals, start, step, steps):
    """[{user: mean GPUs in use in each step}] from (user, start, end,
    weight) intervals, each spread over the steps it overlaps."""
    series = {}
    end_all = start + step * steps
    for user, lo, hi, weight in intervals:
        lo, hi = max(lo, start), min(hi, end_all)
        if hi <= lo:
            continue
        row = series.get(user)
        if row is None:
            row = series[user] = [0.0] * steps
        i = int((lo - start) // step)
        while lo < hi and i < steps:
            stop = min(hi, start + (i + 1) * step)
            row[i] += weight * (stop - lo) / step
            lo, i = stop, i + 1
    return series


def web_history(cfg, made=0):
    """/api/history: for each chart (WEB_HISTORY_CHARTS) its start, step
    and each user's mean GPUs in use per step (the top WEB_HISTORY_USERS
    users by GPU-hours in the chart, the rest summed as "others"), and the
    week's rows as `dq-report --since 7d --by user --json` gives them."""
    now = time.time()
    longest = max(span for _, span, _ in WEB_HISTORY_CHARTS)
    records = [r for user in history_users(cfg) for r in read_history(cfg, user, now - longest)]
    intervals = [(r["id"].split("-", 1)[1], r["started"], r["ended"],
                  r["gpus"] * r.get("share", 1))
                 for r in records if r.get("started") is not None and r["gpus"]]
    places = Placements.read(cfg)
    for j in active_jobs(cfg, None, places, sorted(places)):
        if j["state"] == "running" and j["started"] and j["gpus"]:
            intervals.append((j["user"], j["started"], now,
                              len(j["gpus"]) * places[j["id"]].get("share", 1)))
    charts = {}
    for name, span, step in WEB_HISTORY_CHARTS:
        steps = span // step
        start = now - steps * step
        series = gpus_in_use(intervals, start, step, steps)
        hours = {u: sum(v) * step / 3600 for u, v in series.items()}
        ranked = sorted(series, key=lambda u: (-hours[u], u))
        users = [{"user": u, "gpu_hours": round(hours[u], 4), "gpus": [round(x, 3) for x in
                                                                       series[u]]}
                 for u in ranked[:WEB_HISTORY_USERS]]
        rest = ranked[WEB_HISTORY_USERS:]
        if rest:
            users.append({"user": "others", "others": rest,
                          "gpu_hours": round(sum(hours[u] for u in rest), 4),
                          "gpus": [round(sum(series[u][i] for u in rest), 3)
                                   for i in range(steps)]})
        charts[name] = {"start": start, "step": step, "steps": steps, "users": users}
    week_since = now - 7 * 86400
    rows, total = report_rows([r for r in records if r["ended"] >= week_since], "user",
                              week_since, now)
    return {"format": FORMAT, "at": now, "made": made, "charts": charts, "week": rows,
            "week_total": total}


class WebHistory:
    """/api/history, made at most once per WEB_HISTORY_CACHE seconds."""

    def __init__(self, cfg):
        import threading
        self.cfg, self.lock = cfg, threading.Lock()
        self.data, self.at, self.made = None, 0.0, 0

    def get(self):
        with self.lock:
            if self.data is None or time.monotonic() - self.at >= WEB_HISTORY_CACHE:
                self.data = json.dumps(web_history(self.cfg, self.made + 1)).encode()
                self.at, self.made = time.monotonic(), self.made + 1
            return self.data


def make_web_handler(state, history):
    from http.server import BaseHTTPRequestHandler
    apis = {"/api/state": state, "/api/history": history}
    pages = {"/": ("text/html; charset=utf-8", WEB_PAGE.encode()),
             "/style.css": ("text/css; charset=utf-8", WEB_CSS.encode()),
             "/app.js": ("text/javascript; charset=utf-8", WEB_JS.encode())}

    class Handler(BaseHTTPRequestHandler):
        server_version = f"dq-web/{__version__}"

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path in apis:
                try:
                    body, kind = apis[path].get(), "application/json"
                except Exception as e:      # a poll that failed: say so, keep serving
                    return self.reply(500, "text/plain; charset=utf-8",
                                      f"dq-web: {type(e).__name__}: {e}\n".encode())
            elif path in pages:
                kind, body = pages[path]
            else:
                return self.reply(404, "text/plain; charset=utf-8", b"not found\n")
            self.reply(200, kind, body)

        def do_POST(self):
            self.reply(405, "text/plain; charset=utf-8", b"dq-web is read-only\n")
        do_PUT = do_DELETE = do_PATCH = do_POST

        def reply(self, code, kind, body):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' "
                             "'unsafe-inline'; frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass        # quiet: a page that polls would fill the terminal
    return Handler


def cmd_web(cfg, argv):
    p = parser("web", "Serve a live page of the whole cluster: GPUs, jobs, queue, users.\n"
               "Read-only; it binds 127.0.0.1 unless told otherwise (reach it from your\n"
               "machine with: ssh -L 8765:localhost:8765 HOST).  The page's data is\n"
               "/api/state (JSON), polled once per few seconds for every viewer.")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    args = parse(p, argv)
    if not 0 < args.port < 65536:
        raise Failure(f"--port {args.port}: a port is 1 to 65535 (e.g. --port 8765)")
    ensure_layout(cfg)
    from http.server import ThreadingHTTPServer
    try:
        server = ThreadingHTTPServer((args.bind, args.port), make_web_handler(
            WebState(cfg), WebHistory(cfg)))
    except OSError as e:
        raise Failure(f"cannot listen on {args.bind}:{args.port}: {e.strerror}; choose "
                      f"another with --port or --bind") from None
    server.daemon_threads = True
    print(f"dq-web: http://{args.bind}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


# Main ########################################################################

COMMANDS = {
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "kill": cmd_kill,
    "hold": cmd_hold,
    "release": cmd_release,
    "top": cmd_top,
    "drain": cmd_drain,
    "wait": cmd_wait,
    "doctor": cmd_doctor,
    "web": cmd_web,
    "restart": cmd_restart,
    "free": cmd_free,
    "schedule": cmd_schedule,
    "tail": cmd_tail,
    "head": cmd_head,
    "logs": cmd_logs,
    "grep": cmd_grep,
    "attach": cmd_attach,
    "shell": cmd_shell,
    "users": cmd_users,
    "on-all": cmd_on_all,
    "report": cmd_report,
}

INTERNAL = {"_run": cmd__run, "_slurm": cmd__slurm, "_kill": cmd__kill,
            "_grace": cmd__grace, "_notify": cmd__notify, "_complete": cmd__complete, "_layout": cmd__layout}


def overview():
    """`dq.py --help`: what dq is and its commands, from the docstring."""
    intro = __doc__.split("\n\n", 1)[0].replace("dq --", f"dq {__version__} --")
    commands = __doc__.split("\nCommands", 1)[1].split("\nFiles:", 1)[0]
    return (f"{intro}\n\nCommands{commands.rstrip()}\n\nEach takes --help, e.g. "
            f"dq-jobs --help.  This dq.py: {DQ_PY}")


def main(argv=None):
    global PROG
    argv = list(sys.argv if argv is None else argv)
    name = os.path.basename(argv[0])
    if name.startswith("dq-"):
        cmd, rest = name[3:], argv[1:]
    elif len(argv) > 1:
        cmd, rest = argv[1], argv[2:]
    else:
        cmd, rest = "", []
    if cmd in ("", "-h", "--help", "help"):
        # No command is a usage error: the overview goes to stderr.
        print(overview(), file=sys.stderr if cmd == "" else sys.stdout)
        return 2 if cmd == "" else 0
    if cmd in ("-V", "--version"):
        print(f"dq {__version__}")
        return 0
    func = COMMANDS.get(cmd) or INTERNAL.get(cmd)
    if func is None:
        names = " ".join(f"dq-{c}" for c in COMMANDS)
        print(f"dq: error: unknown command {cmd!r}; the commands are {names} (python3 "
              f"dq.py --help says what each does)", file=sys.stderr)
        return 2
    PROG = f"dq-{cmd}"
    root = None
    try:
        cfg = Config()
        root = cfg.root
        return func(cfg, rest) or 0
    except Failure as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1
    except OSError as e:
        # Not expected (a directory that is not ours to read, a full
        # disk): one line naming the file, not a traceback.
        print(f"{PROG}: error: {data_root_error(root, e)}", file=sys.stderr)
        return 1


def boot():
    """Entry from the first line (dq.py run as a command): sys.argv is
    ['-c', path it was called by, args...]."""
    try:
        status = main(sys.argv[1:])
    except SystemExit as e:     # argparse's --help and errors
        status = e.code
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    # Python's orderly shutdown (freeing every module) would cost ~4 ms, a
    # fifth of a queued dq-submit: flush what we printed and go.  (Every
    # file dq writes is closed by then; its threads are joined.)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        status = status or 1
    os._exit(status or 0)


if __name__ == "__main__":
    sys.exit(main())
