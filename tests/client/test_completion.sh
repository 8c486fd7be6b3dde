#!/usr/bin/env bash
# `memfit completion bash`, sourced in a real bash: completing a verb prefix, a flag
# prefix, a flag's values and a verb after connection flags, as bash's programmable
# completion calls it (COMP_WORDS, COMP_CWORD, then the function `complete` names).
#   test_completion.sh MEMFIT
set -euo pipefail
memfit=${1:?usage: test_completion.sh MEMFIT}
script=$("$memfit" completion bash)
eval "$script"
spec=$(complete -p memfit)
[[ "$spec" == "complete -F _memfit memfit" ]] || { echo "complete -p memfit: $spec"; exit 1; }
fail=0
expect() {  # expect "WANT" WORD...: complete the last word of `memfit WORD...`
  local want=$1; shift
  COMP_WORDS=(memfit "$@")
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMPREPLY=()
  _memfit
  local got="${COMPREPLY[*]:-}"
  if [[ "$got" != "$want" ]]; then
    echo "memfit $*<TAB>: got '$got', want '$want'"
    fail=1
  fi
}
expect "submit"                            su
expect "cancel completion"                 c
expect "list logs"                         l
expect "--state"                           list --st
expect "--tail --token --tls-ca --tls"     logs j1 --t
expect "--file"                            submit --f
expect "--follow"                          logs j1 --fo
expect "json"                              list -o j
expect "table json yaml"                   get j1 --output ""
expect "running"                           list --state r
expect "bash"                              completion b
expect "watch"                             help wa
expect ""                                  get --server h ""
[[ $fail == 0 ]] && echo "completion: ok"
exit $fail
