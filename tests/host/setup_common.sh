# Shared by setup_webui.sh and setup_forge.sh (sourced, not run): the Python environment of a host.

# provision_venv VENV HOST_REQS STAMP_FILE STAMP [EXTRA_PACKAGE...]
# Make the venv VENV with $PYTHON (when missing) and install into it, unless STAMP_FILE already holds
# STAMP: torch/torchvision (the builds this machine serves from disk; PyPI's newer torchvision wheels
# do not import beside them; they also constrain the rest), the host's pinned requirements HOST_REQS
# minus torch (pinned here) and setuptools (its ==69.5.1 pin has no pkg_resources on 3.11's newer pip
# and conflicts with that torch), then setuptools with pkg_resources (lightning_fabric needs it),
# `clip` (normally a GitHub zip) and EXTRA_PACKAGE..., what the extension needs (its install.py does
# not run with --skip-prepare-environment: $REPO_ROOT/requirements.txt), and pytest (the host tests'
# runner; requests comes with the host's requirements).
provision_venv() {
  local venv=$1 host_reqs=$2 stamp=$3 want_stamp=$4; shift 4
  if [ ! -x "$venv/bin/python" ]; then
    echo "venv $venv ($($PYTHON --version))"
    "$PYTHON" -m venv "$venv"
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ]; then
    echo "ok   venv already provisioned ($stamp)"; return
  fi
  local pip=("$venv/bin/python" -m pip install -q) cons reqs
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
  cons=$(mktemp); reqs=$(mktemp)
  printf 'torch==2.14.1\ntorchvision==0.29.1\n' >"$cons"
  grep -v -E '^(torch|setuptools)([=<> #]|$)' "$host_reqs" >"$reqs"
  "${pip[@]}" -r "$reqs" -c "$cons"
  "${pip[@]}" "setuptools>=77.0.3,<81" clip-anytorch "$@" -c "$cons"
  "${pip[@]}" -r "$REPO_ROOT/requirements.txt" -c "$cons"
  "${pip[@]}" pytest -c "$cons"
  rm -f "$cons" "$reqs"
  echo "$want_stamp" >"$stamp"
}
