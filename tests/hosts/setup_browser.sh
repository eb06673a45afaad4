#!/usr/bin/env bash
# Chromium from Debian + Playwright for node (no browser download) for the ComfyUI browser tests.
#   tests/hosts/setup_browser.sh [PW_DIR]      (default /work/hosts/pw; needs root for apt-get)
# Afterwards: NODE_PATH=$PW_DIR/node_modules CHROMIUM=/usr/bin/chromium (browser_check.mjs imports
# playwright-core / playwright and launches executablePath=$CHROMIUM).
set -euo pipefail
PW_DIR=${1:-/work/hosts/pw}
if ! command -v chromium >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi
command -v node >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm; }
mkdir -p "$PW_DIR"
cd "$PW_DIR"
[ -f package.json ] || echo '{"name": "memoguard-pw", "private": true}' > package.json
# playwright's postinstall does not fetch browsers; the env var makes sure nothing is downloaded.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund playwright
chromium --version
node -e "
const { chromium } = require('$PW_DIR/node_modules/playwright');
(async () => {
  const b = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox'] });
  const p = await b.newPage(); await p.setContent('<p id=x>ok</p>');
  console.log('playwright', require('$PW_DIR/node_modules/playwright/package.json').version, 'chromium', b.version(), await p.textContent('#x'));
  await b.close();
})().catch(e => { console.error(e); process.exit(1); });"
echo "NODE_PATH=$PW_DIR/node_modules CHROMIUM=$(command -v chromium)"
