#!/usr/bin/env bash
# System packages the tests need beyond the Python ones: headless Chromium for the browser
# test of `flexmoe report` (tests/test_report_browser.py). Installs only what is missing.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends chromium
fi
