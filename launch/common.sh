# Shared by the launchers (sourced, not run).

quote() {  # the arguments as one shell line, quoting only those that need it
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  echo "${out[*]}"
}
