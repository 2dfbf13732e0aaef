"""Shell completion (issue 13): dq's bash completion, loaded the way
bash-completion loads it (by command name, from the install's share/), in a
real bash, as a user on the cluster."""
import os

from dqtest import ALICE, configure, script, submit

COMPLETE = r'''
. /usr/share/bash-completion/bash_completion
__load_completion "$1" || { echo "no completion for $1" >&2; exit 1; }
func=$(complete -p "$1" | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
shift
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$func" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
'''


def complete(cluster, dq, *words):
    """What bash offers for the last of `words` (a command line)."""
    env = {"PATH": f"{os.path.join(dq.root, 'bin')}:/usr/local/bin:/usr/bin:/bin",
           "XDG_DATA_DIRS": f"{os.path.join(dq.root, 'share')}:/usr/share"}
    r = cluster.run("node1", ALICE, ["bash", "-c", COMPLETE, "bash", words[0]] + list(words),
                    env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_job_ids_views_hosts_and_options_complete(cluster, dq):
    configure(dq, ["node1", "node2", "node3"])
    _, path = script(cluster, ALICE, "s.sh", "sleep 30\n")
    running, _ = submit(dq, "node1", ALICE, path)
    n = running.split("-")[0]
    assert n in complete(cluster, dq, "dq-kill", "")
    assert complete(cluster, dq, "dq-tail", n[:1]) and \
        all(w.startswith(n[:1]) for w in complete(cluster, dq, "dq-tail", n[:1]))
    assert complete(cluster, dq, "dq-jobs", "q") == ["queue"]
    assert complete(cluster, dq, "dq-jobs", "") == ["active", "summary", "queue", "complete"]
    assert complete(cluster, dq, "dq-drain", "node") == ["node1", "node2", "node3"]
    assert complete(cluster, dq, "dq-submit", "--gr") == ["--grid"]
    assert "--sweep" in complete(cluster, dq, "dq-kill", "--")
    assert complete(cluster, dq, "dq-submit", "DQ_HOSTS=node1,no") == \
        ["DQ_HOSTS=node1,node1", "DQ_HOSTS=node1,node2", "DQ_HOSTS=node1,node3"]
    assert complete(cluster, dq, "dq-wait", "--sweep", "") == complete(cluster, dq, "dq-kill", "")
