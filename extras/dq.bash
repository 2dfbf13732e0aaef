# Bash completion for dq's commands (dq-submit, dq-jobs, dq-kill, ...):
# options (from each command's --help), dq-jobs views, job numbers of your
# own queued, running and last ended jobs, host names from dq.conf for
# dq-drain and DQ_HOSTS=/DQ_EXCLUDE= values, files for dq-submit.
# `make install` puts it where bash-completion finds it; or source it from
# ~/.bashrc:  . /deep/group/dq/share/bash-completion/completions/dq.bash

_dq_program() {
    # dq.py behind the command being completed (symlinks resolved)
    local cmd
    cmd=$(type -P -- "$1") || return 1
    readlink -f -- "$cmd"
}

_dq() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local cmd=${COMP_WORDS[0]##*/} dqpy words
    cmd=${cmd#dq-}
    COMPREPLY=()
    dqpy=$(_dq_program "${COMP_WORDS[0]}") || return 0
    if [[ $cur == -* ]]; then
        words=$("$dqpy" "$cmd" --help 2>/dev/null | grep -oE -- '(^|[ ,[])--?[a-zA-Z][-a-zA-Z]*' |
                tr -d ' ,[' | sort -u)
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
        return 0
    fi
    case $prev in
        --each) COMPREPLY=($(compgen -f -- "$cur")); return 0 ;;
        --sweep) COMPREPLY=($(compgen -W "$("$dqpy" _complete ids 2>/dev/null)" -- "$cur"))
                 return 0 ;;
        --port|--bind|-t|--timeout|-n|--last|-r|--reason|-u|--user|--grid|--grace|--since|--until)
            return 0 ;;
        --by) COMPREPLY=($(compgen -W "user host gpu-type day week" -- "$cur")); return 0 ;;
    esac
    case $cur in
        DQ_HOSTS=*|DQ_EXCLUDE=*)
            local var=${cur%%=*}= list=${cur#*=} head=
            [[ $list == *,* ]] && head=${list%,*},
            COMPREPLY=($(compgen -P "$var$head" -W "$("$dqpy" _complete hosts 2>/dev/null)" \
                         -- "${list##*,}"))
            return 0 ;;
    esac
    case $cmd in
        submit) COMPREPLY=($(compgen -f -- "$cur")) ;;
        jobs) COMPREPLY=($(compgen -W "active summary queue complete" -- "$cur")) ;;
        drain) COMPREPLY=($(compgen -W "$("$dqpy" _complete hosts 2>/dev/null)" -- "$cur")) ;;
        kill|wait|restart|hold|release|top|tail|head|logs|grep|attach)
            COMPREPLY=($(compgen -W "$("$dqpy" _complete ids 2>/dev/null)" -- "$cur")) ;;
        on-all|shell) COMPREPLY=($(compgen -c -- "$cur")) ;;
    esac
    return 0
}

complete -o default -o bashdefault -F _dq dq-submit dq-jobs dq-kill dq-restart dq-hold \
    dq-release dq-top dq-drain dq-wait dq-free dq-schedule dq-tail dq-head dq-logs dq-grep \
    dq-attach dq-shell dq-users dq-on-all dq-doctor dq-web dq-report
