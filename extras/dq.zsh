# Zsh completion for dq's commands: the bash completion (dq.bash, next to
# this file) through zsh's bashcompinit.  In ~/.zshrc:
#   source /deep/group/dq/share/zsh/dq.zsh
autoload -U +X compinit && { whence -w _main_complete >/dev/null || compinit; }
autoload -U +X bashcompinit && bashcompinit
source "${${(%):-%x}:A:h}/../bash-completion/completions/dq.bash"
