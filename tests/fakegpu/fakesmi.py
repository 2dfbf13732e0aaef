#!/usr/bin/python3 -S
"""Fake nvidia-smi for the dq test cluster (run through the `nvidia-smi` stub).

Mimics the output format of the real tool for the queries a scheduler uses,
reading the node's fake GPU state from /run/fakegpu (a tmpfs private to each
test node):

  /run/fakegpu/gpus             number of GPUs on this node
  /run/fakegpu/model            the GPUs' model: its name (first line) and
                                memory.total in MiB (second line); default
                                an H100 80GB
  /run/fakegpu/mode             ok | fail | hang | nodevices | na
                                ("missing" is done by deleting this script)
  /run/fakegpu/holders/<k>.<pid>[.<tag>]
                                a process <pid> holds GPU <k>; the file holds
                                its used memory in MiB (first line),
                                optionally its process name (second line)
                                and how busy it keeps the GPU, in % (third
                                line; default 97: a training job).  A GPU's
                                utilization.gpu is the sum, at most 100.
                                The holder keeps an exclusive flock on it;
                                a file nobody has locked is a dead holder.

GPU UUIDs are stable per (hostname, index). Set FAKEGPU_IGNORE_MODE=1 to
report the true state regardless of the failure mode (the fixture uses it
to inspect nodes).
"""
import fcntl
import os
import sys
import time

NAMESPACE_DNS = bytes.fromhex("6ba7b8109dad11d180b400c04fd430c8")  # uuid.NAMESPACE_DNS

STATE = "/run/fakegpu"
GPU_NAME = "NVIDIA H100 80GB HBM3"
MEM_TOTAL = 81559
DRIVER_VERSION = "550.54.15"
CUDA_VERSION = "12.4"
BUS_IDS = ["18", "2A", "3A", "5D", "9A", "AB", "BA", "DB"]

FAIL_TEXT = ("NVIDIA-SMI has failed because it couldn't communicate with the "
             "NVIDIA driver. Make sure that the latest NVIDIA driver is "
             "installed and running.")
INVALID_ARGS = ("Invalid combination of input arguments. "
                "Please run 'nvidia-smi -h' for help.")


# ---------------------------------------------------------------- state

def read_state(name, default):
    try:
        with open(os.path.join(STATE, name)) as f:
            return f.read().strip() or default
    except OSError:
        return default


def gpu_model():
    """(name, memory.total MiB) of this node's GPUs (all alike, as in a
    real server)."""
    lines = read_state("model", "").splitlines()
    try:
        return lines[0].strip(), int(lines[1])
    except (IndexError, ValueError):
        return GPU_NAME, MEM_TOTAL


def gpu_count():
    try:
        return max(0, int(read_state("gpus", "0")))
    except ValueError:
        return 0


def gpu_uuid(index, host=None):
    """Stable per (node hostname, index), formatted like a real GPU UUID: the
    uuid5 of "<host>.gpu<index>.dq-test" (computed here without importing
    uuid and socket, which would double this script's start-up time; the
    test cluster runs it for every poll)."""
    try:
        from _sha1 import sha1
    except ImportError:
        from hashlib import sha1
    host = host or os.uname().nodename
    name = ("%s.gpu%d.dq-test" % (host, index)).encode()
    h = bytearray(sha1(NAMESPACE_DNS + name).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50         # version 5
    h[8] = (h[8] & 0x3F) | 0x80         # RFC 4122 variant
    x = h.hex()
    return "GPU-%s-%s-%s-%s-%s" % (x[:8], x[8:12], x[12:16], x[16:20], x[20:])


def bus_id(index):
    """PCI bus ids ascending with the index, as nvidia-smi orders them."""
    if index < len(BUS_IDS):
        bus = BUS_IDS[index]
    else:
        bus = "%02X" % (0xE0 + index - len(BUS_IDS))
    return "00000000:%s:00.0" % bus


def holder_alive(path):
    """A holder is alive while it keeps its exclusive lock on the file.

    We probe with a shared non-blocking lock: it fails while the holder's
    exclusive lock is in place, and succeeds (for any number of concurrent
    probers) once the holder is gone.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    try:
        os.unlink(path)  # dead holder: clean up if the sticky dir lets us
    except OSError:
        pass
    return False


def holders(ngpus):
    """[(gpu_index, pid, used_mib, process_name, util %)] of live holders, sorted."""
    found = []
    hdir = os.path.join(STATE, "holders")
    try:
        names = os.listdir(hdir)
    except OSError:
        return found
    for name in names:
        if name.startswith("."):
            continue  # being created (locked, then renamed into place)
        parts = name.split(".")
        try:
            gpu, pid = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            continue
        if gpu >= ngpus:
            continue
        path = os.path.join(hdir, name)
        if not holder_alive(path):
            continue
        mem, pname, util = 0, "", 97
        try:
            with open(path) as f:
                lines = f.read().splitlines()
            mem = int(lines[0]) if lines else 0
            pname = lines[1] if len(lines) > 1 else ""
            util = int(lines[2]) if len(lines) > 2 else 97
        except (OSError, ValueError):
            pass
        found.append((gpu, pid, mem, pname or process_name(pid), util))
    found.sort()
    return found


def process_name(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
        return argv[0].decode(errors="replace") or "[unknown]"
    except OSError:
        return "[Not Found]"


def gpus_info(mode):
    """[dict] describing each GPU, memory use summed over live holders."""
    n = gpu_count()
    procs = holders(n)
    used = [0] * n
    busy = [0] * n
    for gpu, _pid, mem, _name, util in procs:
        used[gpu] += mem
        busy[gpu] += util
    na = mode == "na"
    name, total = gpu_model()
    out = []
    for i in range(n):
        out.append({
            "index": i,
            "uuid": gpu_uuid(i),
            "name": name,
            "memory.used": None if na else used[i],
            "memory.total": total,
            "memory.free": None if na else total - used[i],
            "utilization.gpu": min(100, busy[i]),
            "pci.bus_id": bus_id(i),
            "temperature.gpu": 33 + 20 * min(1, busy[i]),
            "count": n,
            "driver_version": DRIVER_VERSION,
        })
    return out, procs


# ---------------------------------------------------------------- queries

# field -> (header unit or None, key in the gpu dict)
GPU_FIELDS = {
    "index": (None, "index"),
    "uuid": (None, "uuid"), "gpu_uuid": (None, "uuid"),
    "name": (None, "name"), "gpu_name": (None, "name"),
    "memory.used": ("MiB", "memory.used"),
    "memory.total": ("MiB", "memory.total"),
    "memory.free": ("MiB", "memory.free"),
    "utilization.gpu": ("%", "utilization.gpu"),
    "pci.bus_id": (None, "pci.bus_id"), "gpu_bus_id": (None, "pci.bus_id"),
    "temperature.gpu": (None, "temperature.gpu"),
    "count": (None, "count"),
    "driver_version": (None, "driver_version"),
}
# field -> (header name, unit or None, key)
APP_FIELDS = {
    "gpu_uuid": ("gpu_uuid", None, "gpu_uuid"),
    "pid": ("pid", None, "pid"),
    "used_memory": ("used_gpu_memory", "MiB", "used_memory"),
    "used_gpu_memory": ("used_gpu_memory", "MiB", "used_memory"),
    "process_name": ("process_name", None, "process_name"),
    "name": ("process_name", None, "process_name"),
    "gpu_bus_id": ("gpu_bus_id", None, "gpu_bus_id"),
    "gpu_name": ("gpu_name", None, "gpu_name"),
}


def fmt(value, unit, nounits):
    if value is None:
        return "[N/A]"
    if unit and not nounits:
        return "%s %s" % (value, unit)
    return str(value)


def check_fields(fields, known):
    for f in fields:
        if f not in known:
            print('Field "%s" is not a valid field to query.' % f)
            print()
            sys.exit(2)


def query_gpus(fields, fmtopts, gpus):
    check_fields(fields, GPU_FIELDS)
    nounits = "nounits" in fmtopts
    lines = []
    if "noheader" not in fmtopts:
        lines.append(", ".join(
            f + (" [%s]" % GPU_FIELDS[f][0] if GPU_FIELDS[f][0] else "")
            for f in fields))
    for g in gpus:
        lines.append(", ".join(
            fmt(g[GPU_FIELDS[f][1]], GPU_FIELDS[f][0], nounits) for f in fields))
    return lines


def query_apps(fields, fmtopts, gpus, procs, na):
    check_fields(fields, APP_FIELDS)
    nounits = "nounits" in fmtopts
    lines = []
    if "noheader" not in fmtopts:
        lines.append(", ".join(
            APP_FIELDS[f][0] + (" [%s]" % APP_FIELDS[f][1] if APP_FIELDS[f][1] else "")
            for f in fields))
    by_index = {g["index"]: g for g in gpus}
    for gpu, pid, mem, pname, _ in procs:
        if gpu not in by_index:
            continue
        row = {"gpu_uuid": by_index[gpu]["uuid"], "pid": pid,
               "used_memory": None if na else mem, "process_name": pname,
               "gpu_bus_id": by_index[gpu]["pci.bus_id"], "gpu_name": by_index[gpu]["name"]}
        lines.append(", ".join(
            fmt(row[APP_FIELDS[f][2]], APP_FIELDS[f][1], nounits) for f in fields))
    return lines


def list_gpus(gpus):
    return ["GPU %d: %s (UUID: %s)" % (g["index"], g["name"], g["uuid"]) for g in gpus]


def table(gpus, procs, na):
    """A rough imitation of the default nvidia-smi screen."""
    bar = "+" + "-" * 87 + "+"
    out = [time.strftime("%a %b %d %H:%M:%S %Y"), bar,
           "| NVIDIA-SMI %s             Driver Version: %s     CUDA Version: %s     |"
           % (DRIVER_VERSION, DRIVER_VERSION, CUDA_VERSION), bar]
    for g in gpus:
        used = "N/A" if na else "%5dMiB" % g["memory.used"]
        out.append("| %3d  %-28s | %s | %8s / %6dMiB | %3d%%  Default |"
                   % (g["index"], g["name"], g["pci.bus_id"], used,
                      g["memory.total"], g["utilization.gpu"]))
    out += [bar, "| Processes:" + " " * 76 + "|",
            "|  GPU   PID   Type   Process name                                      GPU Memory |",
            bar]
    if not procs:
        out.append("|  No running processes found" + " " * 59 + "|")
    for gpu, pid, mem, pname, _ in procs:
        out.append("| %4d %7d    C   %-50s %7s |"
                   % (gpu, pid, pname[:50], "N/A" if na else "%dMiB" % mem))
    out.append(bar)
    return out


# ---------------------------------------------------------------- cli

def parse_args(argv):
    """Accept both --opt=value and --opt value, like the real tool."""
    opts = {}
    takes_value = {"--query-gpu", "--query-compute-apps", "--format", "-i", "--id"}
    flags = {"-L", "--list-gpus"}
    i = 0
    while i < len(argv):
        a = argv[i]
        key, eq, val = a.partition("=")
        if key in takes_value:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise ValueError(a)
                val = argv[i]
            opts[key] = val
        elif a in flags:
            opts[a] = True
        elif a in ("-h", "--help"):
            opts["-h"] = True
        else:
            raise ValueError(a)
        i += 1
    return opts


def apply_mode(mode):
    if mode == "fail":
        print(FAIL_TEXT)
        sys.exit(9)
    if mode == "hang":
        while True:
            time.sleep(3600)
    if mode == "nodevices":
        print("No devices were found")
        sys.exit(6)


def main(argv):
    mode = read_state("mode", "ok")
    if os.environ.get("FAKEGPU_IGNORE_MODE") == "1" and mode != "na":
        mode = "ok"
    try:
        opts = parse_args(argv)
    except ValueError:
        print(INVALID_ARGS)
        return 2
    if opts.get("-h"):
        print("NVIDIA System Management Interface -- v%s (fake, dq tests)" % DRIVER_VERSION)
        return 0
    apply_mode(mode)
    gpus, procs = gpus_info(mode)
    if not gpus and os.environ.get("FAKEGPU_IGNORE_MODE") != "1":
        print("No devices were found")
        return 6
    ids = opts.get("-i", opts.get("--id"))
    if ids is not None:
        wanted = set()
        for tok in ids.split(","):
            tok = tok.strip()
            match = [g["index"] for g in gpus if tok in (str(g["index"]), g["uuid"], g["pci.bus_id"])]
            if not match:
                print("No devices were found")
                return 6
            wanted.update(match)
        gpus = [g for g in gpus if g["index"] in wanted]
        procs = [p for p in procs if p[0] in wanted]
    queries = [k for k in ("--query-gpu", "--query-compute-apps") if k in opts]
    if len(queries) > 1 or (queries and "-L" in opts) or (queries and "--format" not in opts):
        print(INVALID_ARGS)
        return 2
    fmtopts = set()
    if "--format" in opts:
        fmtopts = set(x.strip() for x in opts["--format"].split(","))
        if "csv" not in fmtopts or not fmtopts <= {"csv", "noheader", "nounits"}:
            print(INVALID_ARGS)
            return 2
    fields = lambda k: [f.strip() for f in opts[k].split(",") if f.strip()]
    if "--query-gpu" in opts:
        lines = query_gpus(fields("--query-gpu"), fmtopts, gpus)
    elif "--query-compute-apps" in opts:
        lines = query_apps(fields("--query-compute-apps"), fmtopts, gpus, procs, mode == "na")
    elif "-L" in opts or "--list-gpus" in opts:
        lines = list_gpus(gpus)
    else:
        lines = table(gpus, procs, mode == "na")
    if lines:
        print("\n".join(lines))
    return 0


def run():
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    run()
