#!/bin/sh
# install.sh DIR [GROUP]: install dq into DIR (e.g. the lab's /deep/group/dq).
#
# DIR/dq.py is the program and DIR holds its data; DIR/bin/dq-<cmd> are the
# commands (symlinks, one per file in links/).  With GROUP, the data root is
# group-owned and setgid so the whole lab shares it; without, anyone may use it.
# Re-running it upgrades dq.py in place and keeps every job.
#
# Everything that could stop the install half-way (no such group, a DIR that
# cannot be created or written, directories of an earlier install that belong
# to someone else) is checked first: on any of them it says so in one line on
# stderr, with the fix, and exits 1 having changed nothing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)

die() {
    echo "install.sh: $*" >&2
    exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] && [ -n "$1" ] ||
    die "usage: install.sh DIR [GROUP] (e.g. install.sh \$HOME/dq-local, or install.sh /deep/group/dq lab)"
dir=$1
group=${2:-}
case $dir in
    /*) ;;
    *) dir=$(pwd)/$dir ;;
esac
uid=$(id -u)
user=$(id -un 2>/dev/null || echo "uid $uid")

# The group: it must exist, and (unless root) the installer must be in it,
# or chgrp fails.
if [ -n "$group" ]; then
    entry=$(getent group "$group" 2>/dev/null) ||
        entry=$(grep "^$group:" /etc/group 2>/dev/null) ||
        die "there is no group '$group' on this machine: create it first (groupadd $group, as root), or leave GROUP out for a personal install"
    gid=$(echo "$entry" | cut -d: -f3)
    if [ "$uid" != 0 ]; then
        case " $(id -G) " in
            *" $gid "*) ;;
            *) die "you ($user) are not in group '$group', so cannot give it $dir: run the install as root, or log in again once you are in '$group' (id -Gn lists your groups)" ;;
        esac
    fi
fi

# DIR: an existing writable directory, or one we can create (the nearest
# existing parent is a directory we may write to).
if [ -e "$dir" ] || [ -L "$dir" ]; then
    [ -d "$dir" ] || die "$dir exists and is not a directory: choose another DIR (PREFIX=...)"
    [ -w "$dir" ] && [ -x "$dir" ] ||
        die "$dir is not writable by you ($user): choose another DIR (e.g. PREFIX=\$HOME/dq-local), or install as its owner or root"
else
    parent=$(dirname "$dir")
    while [ ! -e "$parent" ] && [ "$parent" != / ]; do
        parent=$(dirname "$parent")
    done
    [ -d "$parent" ] || die "cannot create $dir: $parent is not a directory; choose another DIR (PREFIX=...)"
    [ -w "$parent" ] && [ -x "$parent" ] ||
        die "cannot create $dir: $parent is not writable by you ($user); choose another DIR (e.g. PREFIX=\$HOME/dq-local), or install as root"
fi

# The data root's directories, as dq.py lists them (its LAYOUT): KIND PATH
# lines, KIND one of shared, traversed, sticky.
layout=$(python3 -S "$here/dq.py" _layout) ||
    die "cannot run $here/dq.py with python3 (see the message above): install Python 3 first"

# Directories of an earlier install get their modes (and group) set again,
# which only their owner (or root) may do.
if [ "$uid" != 0 ]; then
    for d in "$dir" $(echo "$layout" | while read -r kind sub; do echo "$dir/$sub"; done); do
        [ "$d" = "$dir" ] && [ -z "$group" ] && continue
        if [ -d "$d" ] && [ ! -O "$d" ]; then
            owner=$(ls -ld "$d" | awk '{print $3}')
            die "$d belongs to $owner: run install.sh as $owner (or as root) to upgrade this install"
        fi
    done
fi

mkdir -p "$dir/bin" || die "could not create $dir/bin (see the message above)"
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

# Shell completion (bash, and zsh through bashcompinit) and example systemd
# units, with this install's path in them.
mkdir -p "$dir/share/bash-completion/completions" "$dir/share/zsh" "$dir/share/systemd"
cp "$here/extras/dq.bash" "$dir/share/bash-completion/completions/dq.bash"
for link in "$here"/links/dq-*; do
    ln -sfn dq.bash "$dir/share/bash-completion/completions/$(basename "$link")"
done
cp "$here/extras/dq.zsh" "$dir/share/zsh/dq.zsh"
for unit in "$here"/extras/*.service; do
    sed "s|@PREFIX@|$dir|g" "$unit" > "$dir/share/systemd/$(basename "$unit")"
done

# Shared directories: 'state' holds small files every user rewrites; the
# others hold per-user entries and are sticky, so nobody can remove or
# replace another user's jobs.
if [ -n "$group" ]; then
    chgrp "$group" "$dir"
    # Not group-writable: nobody but the installer may replace dq.conf,
    # whose owner and 'admins' are dq's admins (dq-drain).
    chmod 2755 "$dir"
    shared=2770 sticky=3770 traversed=2775
else
    shared=777 sticky=1777 traversed=755
fi
echo "$layout" | while read -r kind sub; do
    mkdir -p "$dir/$sub"
    case $kind in
        shared) chmod "$shared" "$dir/$sub" ;;
        sticky) chmod "$sticky" "$dir/$sub" ;;
        traversed) chmod "$traversed" "$dir/$sub" ;;
        *) die "dq.py lists $sub as a directory of kind '$kind', which this install.sh does not know: use the install.sh that came with that dq.py" ;;
    esac
    [ -z "$group" ] || chgrp "$group" "$dir/$sub"
done
echo "dq installed in $dir; put $dir/bin on PATH, and list the hosts in $dir/dq.conf"
