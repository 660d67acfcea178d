# Shared by the launchers (sourced, not run).

quote() {  # the arguments as one shell line, quoting only those that need it
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  echo "${out[*]}"
}

usage() {  # the script's leading comment block (its usage), without the "# "
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

need_value() {  # need_value OPTION "$#": an option that takes a value must have one
  [[ "$2" -ge 2 ]] || { echo "$1 needs a value" >&2; exit 2; }
}

positive_int() {  # positive_int OPTION VALUE
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "$1 must be a positive integer, not '$2'" >&2; exit 2; }
}
