#!/bin/sh
# install.sh DIR [GROUP]: install dq into DIR (e.g. the lab's /deep/group/dq).
#
# DIR/dq.py is the program and DIR holds its data; DIR/bin/dq-<cmd> are the
# commands (symlinks, one per file in links/).  With GROUP, the data root is
# group-owned and setgid so the whole lab shares it; without, anyone may use it.
# Re-running it upgrades dq.py in place and keeps every job.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: install.sh DIR [GROUP]}
group=${2:-}

mkdir -p "$dir/bin"
cp "$here/dq.py" "$dir/dq.py.new"
chmod 755 "$dir/dq.py.new"
mv -f "$dir/dq.py.new" "$dir/dq.py"
# The commands import dq.py as a module (see its first line), so Python can
# run this bytecode instead of compiling dq.py each time.  checked-hash: a
# pyc whose source was patched since is ignored, never run stale.  Users
# cannot write __pycache__/ (a pyc is code everyone would run).  Hosts with
# another Python version compile at each start (~20 ms), which is all.
python3 -c 'import py_compile as c, sys; c.compile(sys.argv[1], doraise=True,
    invalidation_mode=c.PycInvalidationMode.CHECKED_HASH)' "$dir/dq.py" ||
    echo "install.sh: could not write $dir/__pycache__ (dq works, but starts ~20 ms slower)" >&2
chmod 755 "$dir/__pycache__" 2>/dev/null || true
for link in "$here"/links/dq-*; do
    ln -sfn ../dq.py "$dir/bin/$(basename "$link")"
done

# Shared directories: 'state' holds small files every user rewrites; the
# others hold per-user entries and are sticky, so nobody can remove or
# replace another user's jobs.
if [ -n "$group" ]; then
    chgrp "$group" "$dir"
    chmod 2775 "$dir"
    shared=2770 sticky=3770 jobs=2775
else
    shared=777 sticky=1777 jobs=755
fi
mkdir -p "$dir/state" "$dir/jobs/backend" "$dir/jobs/active" "$dir/jobs/cpu" "$dir/jobs/done" "$dir/jobs/lost" \
    "$dir/sched"
chmod "$shared" "$dir/state"
chmod "$jobs" "$dir/jobs"
chmod "$sticky" "$dir/jobs/backend" "$dir/jobs/active" "$dir/jobs/cpu" "$dir/jobs/done" "$dir/jobs/lost" \
    "$dir/sched"
[ -z "$group" ] || chgrp "$group" "$dir/state" "$dir/jobs" "$dir/jobs/backend" \
    "$dir/jobs/active" "$dir/jobs/cpu" "$dir/jobs/done" "$dir/jobs/lost" "$dir/sched"
echo "dq installed in $dir; put $dir/bin on PATH, and list the hosts in $dir/dq.conf"
