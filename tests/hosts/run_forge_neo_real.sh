#!/usr/bin/env bash
# The Forge real-host suite (run_forge_real.sh, tests/a1111/test_real_forge.py) against a real Forge Neo 2.26 (set up
# by checkout_webuis.sh and setup_forge_neo.sh). Same arguments and environment as run_forge_real.sh; FORGE_DIR
# defaults to HOSTS/forge-neo/webui.
HOSTS=${HOSTS:-/work/hosts}
FORGE_KIND=forge-neo FORGE_DIR=${FORGE_DIR:-$HOSTS/forge-neo/webui} exec "$(dirname "$0")/run_forge_real.sh" "$@"
