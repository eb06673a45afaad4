#!/usr/bin/env bash
# The Forge real-host suite (run_forge_real.sh, tests/a1111/test_real_forge.py) against a real Forge Neo 2.26 (set up
# by checkout_webuis.sh and setup_forge_neo.sh), then the flow model's (test_real_forge_neo_flow.py: Anima, built by
# make_random_anima.py into HOSTS/models/anima). Same arguments and environment as run_forge_real.sh; FORGE_DIR
# defaults to HOSTS/forge-neo/webui.
HOSTS=${HOSTS:-/work/hosts}
names_a_file=no
for a in "$@"; do case $a in *.py|*.py::*) names_a_file=yes;; esac; done
[ $names_a_file = yes ] || set -- "$@" test_real_forge.py test_real_forge_neo_flow.py
HOSTS=$HOSTS FORGE_KIND=forge-neo FORGE_DIR=${FORGE_DIR:-$HOSTS/forge-neo/webui} exec "$(dirname "$0")/run_forge_real.sh" "$@"
