// End-to-end test of editors/vscode in real VS Code: installs the .vsix into code-server, opens a
// Python file in headless Chromium (Playwright), types a function head with its docstring, waits for
// the ghost text, checks it equals `phi-lsp complete` at that position, accepts it with Tab, saves
// and reads the file, and takes a screenshot.
//
// node tests/editors/vscode/e2e.mjs   with the environment:
//   PHI_LSP_BIN   the server binary          PHI_LSP_MODEL_DIR  the model folder (tiny-phi)
//   VSIX          the packaged extension     CODE_SERVER        code-server's executable
//   PLAYWRIGHT    playwright-core's folder   CHROMIUM           the browser (default /usr/bin/chromium)
//   SCREENSHOT    where to save the screenshot (default tests/editors/vscode/screenshot.png)

import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import { createRequire } from "node:module";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../..");
const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) {
    throw new Error(`set ${name}`);
  }
  return value;
};
const bin = path.resolve(env("PHI_LSP_BIN", path.join(repo, "target/release/phi-lsp")));
const model = path.resolve(env("PHI_LSP_MODEL_DIR", path.join(repo, "tests/fixtures/tiny-phi")));
const vsix = path.resolve(env("VSIX"));
const codeServer = env("CODE_SERVER");
const { chromium } = createRequire(import.meta.url)(env("PLAYWRIGHT"));
const browserPath = env("CHROMIUM", "/usr/bin/chromium");
const screenshot = path.resolve(env("SCREENSHOT", path.join(here, "screenshot.png")));
const typing = JSON.parse(fs.readFileSync(path.join(repo, "tests/editors/typing.json"), "utf8"));

let passed = 0;
let failed = 0;
function check(ok, what, detail) {
  if (ok) {
    passed += 1;
    console.log(`ok - vscode: ${what}`);
  } else {
    failed += 1;
    console.log(`not ok - vscode: ${what}${detail ? `\n    ${String(detail).replace(/\n/g, "\n    ")}` : ""}`);
  }
  return ok;
}
const log = (message) => console.log(`# ${new Date().toISOString().slice(11, 19)} ${message}`);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "phi-lsp-vscode-"));
const home = path.join(tmp, "home");
const userData = path.join(tmp, "user-data");
const extensions = path.join(tmp, "extensions");
const workspace = path.join(tmp, "workspace");
for (const dir of [home, path.join(userData, "User"), extensions, workspace]) {
  fs.mkdirSync(dir, { recursive: true });
}
const sample = path.join(workspace, "sample.py");
fs.writeFileSync(sample, "");

// Settings that make typing exact (no auto-closing quotes, no auto-indent, no other suggestion
// widgets) and keep the focus in the editor; the phi-lsp ones point at the test model.
const userSettings = {
  "chat.disableAIFeatures": true,
  "workbench.startupEditor": "none",
  "workbench.secondarySideBar.defaultVisibility": "hidden",
  "breadcrumbs.enabled": false,
  "workbench.tips.enabled": false,
  "workbench.colorTheme": "Default Dark Modern",
  "security.workspace.trust.enabled": false,
  "telemetry.telemetryLevel": "off",
  "update.mode": "none",
  "extensions.autoUpdate": false,
  "extensions.autoCheckUpdates": false,
  "extensions.ignoreRecommendations": true,
  "editor.autoClosingQuotes": "never",
  "editor.autoClosingBrackets": "never",
  "editor.autoIndent": "none",
  "editor.quickSuggestions": { other: "off", comments: "off", strings: "off" },
  "editor.suggestOnTriggerCharacters": false,
  "editor.wordBasedSuggestions": "off",
  "editor.inlineSuggest.enabled": true,
  "editor.minimap.enabled": false,
  "editor.fontSize": 15,
  "files.autoSave": "off",
  "phi-lsp.maxNewTokens": typing.maxNewTokens,
  "phi-lsp.deadlineMs": 60000,
  "phi-lsp.trace.server": "messages",
};
// Paths are machine-overridable settings: in code-server (a remote window) VS Code takes them
// from the machine's settings, not the user's.
const machineSettings = { "phi-lsp.serverPath": bin, "phi-lsp.model": model };
const machineSettingsFile = path.join(userData, "Machine", "settings.json");
function writeJson(file, value) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(value, null, 2));
  fs.renameSync(`${file}.tmp`, file); // whole, never half-written, when VS Code reads it
}
writeJson(path.join(userData, "User", "settings.json"), userSettings);
writeJson(machineSettingsFile, machineSettings);

const childEnv = {
  ...process.env,
  HOME: home,
  XDG_CONFIG_HOME: path.join(home, ".config"),
  XDG_DATA_HOME: path.join(home, ".local/share"),
  XDG_CACHE_HOME: path.join(home, ".cache"),
};
const serverArgs = ["--user-data-dir", userData, "--extensions-dir", extensions];

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function waitForHttp(url, timeoutMs) {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    try {
      const response = await fetch(url);
      if (response.ok) {
        return true;
      }
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  return false;
}

/** The phi-lsp output channel (with the JSON-RPC trace), for failures. */
function extensionLogs() {
  const found = [];
  const walk = (dir) => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) {
        walk(full);
      } else if (/phi-lsp/.test(entry.name) || entry.name === "exthost.log") {
        found.push(full);
      }
    }
  };
  try {
    walk(path.join(userData, "logs"));
  } catch {
    // no logs yet
  }
  return found;
}

function dumpLogs() {
  for (const file of extensionLogs()) {
    const text = fs.readFileSync(file, "utf8");
    console.log(`# --- ${path.relative(tmp, file)} (last 4000 characters)\n${text.slice(-4000).replace(/^/gm, "# ")}`);
  }
}

let codeServerProcess;
let browser;
async function cleanup() {
  await browser?.close().catch(() => {});
  if (codeServerProcess?.pid) {
    // code-server's children outlive a plain SIGTERM: end the whole group.
    try {
      process.kill(-codeServerProcess.pid, "SIGTERM");
    } catch {
      // already gone
    }
    await new Promise((r) => setTimeout(r, 500));
    try {
      process.kill(-codeServerProcess.pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
}

async function main() {
  log(`installing ${path.basename(vsix)} into code-server`);
  const installed = execFileSync(codeServer, [...serverArgs, "--install-extension", vsix], {
    env: childEnv,
    encoding: "utf8",
    timeout: 120000,
  });
  check(/successfully installed/i.test(installed), "the .vsix installs into code-server", installed);

  const port = await freePort();
  log(`starting code-server on port ${port}`);
  codeServerProcess = spawn(
    codeServer,
    [
      "--auth", "none", "--bind-addr", `127.0.0.1:${port}`, "--disable-telemetry",
      "--disable-update-check", "--disable-workspace-trust", "--disable-getting-started-override",
      ...serverArgs, workspace,
    ],
    { env: childEnv, detached: true, stdio: ["ignore", "pipe", "pipe"] },
  );
  let serverOutput = "";
  codeServerProcess.stdout.on("data", (d) => (serverOutput += d));
  codeServerProcess.stderr.on("data", (d) => (serverOutput += d));
  if (!check(await waitForHttp(`http://127.0.0.1:${port}/healthz`, 60000), "code-server starts", serverOutput)) {
    return;
  }

  log("starting Chromium");
  browser = await chromium.launch({
    executablePath: browserPath,
    headless: true,
    env: childEnv, // its profile leftovers go to the temporary home, not the user's
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = await browser.newPage({ viewport: { width: 1024, height: 400 } });
  await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(workspace)}`);
  await page.waitForSelector(".monaco-workbench", { timeout: 60000 });

  log("opening sample.py");
  const item = page.locator(".explorer-folders-view .monaco-list-row", { hasText: "sample.py" });
  await item.waitFor({ timeout: 60000 });
  await item.dblclick();
  const editor = page.locator(".editor-instance .monaco-editor").first();
  await editor.waitFor({ timeout: 30000 });

  // The status bar item turns to the model's name when the server has loaded it.
  const status = page.locator(".statusbar-item", { hasText: "tiny-phi" });
  const ready = await status.waitFor({ timeout: 90000 }).then(() => true, () => false);
  if (!check(ready, "the status bar shows the model ready (tiny-phi)",
    await page.locator(".statusbar").innerText().catch(() => "?"))) {
    return;
  }
  const readyText = await status.innerText();
  // The device shows as the server reports it (the setting's "auto" at present).
  // What the server uses, not what was asked: `auto` is the CPU and q8_0 here.
  check(/\bcpu\b/.test(readyText) && /\bq8_0\b/.test(readyText), "the status bar names device and dtype", readyText);

  log("typing the function head and its docstring");
  await editor.click();
  await page.keyboard.press("Control+B"); // hide the side bar: more room for the ghost text
  await editor.click();
  await page.keyboard.type(typing.text, { delay: 15 });

  const ghost = page.locator(".ghost-text-decoration");
  const shown = await ghost.first().waitFor({ timeout: 60000 }).then(() => true, () => false);
  if (!check(shown, "ghost text appears after typing")) {
    return;
  }
  // Ghost text renders spaces as no-break spaces; a suggestion of several lines puts the rest in
  // view zones (.ghost-text).
  const ghostText = await page.evaluate(() => {
    const first = [...document.querySelectorAll(".ghost-text-decoration")].map((e) => e.textContent).join("");
    const rest = [...document.querySelectorAll(".ghost-text .view-line")].map((e) => e.textContent);
    return [first, ...rest].join("\n").replace(/\u00a0/g, " ");
  });

  const lines = typing.text.split("\n");
  const line = lines.length - 1;
  const character = lines[line].length; // ASCII
  const promptFile = path.join(tmp, "prompt.py");
  fs.writeFileSync(promptFile, typing.text);
  const expected = JSON.parse(
    execFileSync(bin, [
      "complete", promptFile, "--model", model, "--line", String(line), "--character", String(character),
      "--max-new-tokens", String(typing.maxNewTokens), "--deadline-ms", "60000", "--json",
    ], { encoding: "utf8" }),
  ).text;
  check(expected !== "", "phi-lsp complete gives a suggestion there");
  check(ghostText === expected, "the ghost text is what `phi-lsp complete` suggests",
    `ghost:    ${JSON.stringify(ghostText)}\nexpected: ${JSON.stringify(expected)}`);

  // The status bar picks up the latency of that suggestion.
  const timed = await page.locator(".statusbar-item", { hasText: /tiny-phi.*\d+ ms/ })
    .waitFor({ timeout: 10000 }).then(() => true, () => false);
  check(timed, "the status bar shows the last suggestion's latency",
    await page.locator(".statusbar").innerText().catch(() => "?"));

  fs.mkdirSync(path.dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot });
  log(`screenshot: ${path.relative(repo, screenshot)}`);

  log("accepting with Tab and saving");
  await page.keyboard.press("Tab");
  const gone = await ghost.first().waitFor({ state: "detached", timeout: 10000 }).then(() => true, () => false);
  check(gone, "Tab takes the ghost text away");
  await page.keyboard.press("Control+S");
  const want = typing.text + expected;
  let onDisk = "";
  const end = Date.now() + 10000;
  while (Date.now() < end) {
    onDisk = fs.readFileSync(sample, "utf8");
    if (onDisk === want) {
      break;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  check(onDisk === want, "the saved buffer is the typed text plus the suggestion",
    `file: ${JSON.stringify(onDisk)}\nwant: ${JSON.stringify(want)}`);

  // The JSON-RPC trace shows the inline-completion request the ghost text came from.
  const trace = extensionLogs().filter((f) => /phi-lsp/.test(path.basename(f))).map((f) => fs.readFileSync(f, "utf8")).join("\n");
  check(/textDocument\/inlineCompletion/.test(trace), "the ghost text came from textDocument/inlineCompletion",
    trace.slice(-2000));

  // Commands from the palette: disabling shows in the status bar; enabling brings it back.
  const runCommand = async (title) => {
    await page.keyboard.press("F1");
    const input = page.locator(".quick-input-widget input");
    await input.waitFor({ timeout: 10000 });
    await input.fill(`>${title}`);
    await page.locator(".quick-input-list .monaco-list-row", { hasText: title }).first().waitFor({ timeout: 10000 });
    await page.keyboard.press("Enter");
  };
  await runCommand("phi-lsp: Disable completions");
  const off = await page.locator(".statusbar-item", { hasText: "(off)" }).waitFor({ timeout: 10000 })
    .then(() => true, () => false);
  check(off, "“phi-lsp: Disable completions” shows in the status bar",
    await page.locator(".statusbar").innerText().catch(() => "?"));
  await runCommand("phi-lsp: Enable completions");
  const on = await page.locator(".statusbar-item", { hasText: "(off)" }).waitFor({ state: "detached", timeout: 10000 })
    .then(() => true, () => false);
  check(on, "“phi-lsp: Enable completions” turns them back on");

  // A settings change reaches the server (workspace/didChangeConfiguration): a model folder that
  // does not exist fails to load, the status bar turns to an error, and clicking it shows the log.
  writeJson(machineSettingsFile, { ...machineSettings, "phi-lsp.model": path.join(tmp, "no-such-model") });
  const errorItem = page.locator(".statusbar-item", { hasText: /^\s*phi-lsp\s*$/ });
  const failedShown = await errorItem.waitFor({ timeout: 30000 }).then(() => true, () => false);
  check(failedShown, "a model that does not load turns the status bar item to an error",
    await page.locator(".statusbar").innerText().catch(() => "?"));
  if (failedShown) {
    await errorItem.click();
    const logShown = await page.locator(".part.panel .view-lines", { hasText: "no-such-model" }).first()
      .waitFor({ timeout: 10000 }).then(() => true, () => false);
    check(logShown, "clicking the error shows the phi-lsp log, which names the model folder",
      await page.locator(".part.panel").innerText().catch(() => "no panel"));
    if (process.env.SCREENSHOT) {
      await page.screenshot({ path: path.join(path.dirname(screenshot), "screenshot-error.png") });
    }
  }

  // Back to the real folder: the server loads it again and the status bar recovers.
  writeJson(machineSettingsFile, machineSettings);
  const recovered = await page.locator(".statusbar-item", { hasText: "tiny-phi" })
    .waitFor({ timeout: 30000 }).then(() => true, () => false);
  check(recovered, "setting the model back loads it again",
    await page.locator(".statusbar").innerText().catch(() => "?"));
}

const watchdog = setTimeout(() => {
  console.log("not ok - vscode: the test finished within 6 minutes");
  failed += 1;
  dumpLogs();
  cleanup().finally(() => process.exit(1));
}, 6 * 60 * 1000);

try {
  await main();
} catch (error) {
  check(false, "the test ran to the end", error?.stack ?? String(error));
}
if (failed > 0) {
  dumpLogs();
}
clearTimeout(watchdog);
await cleanup();
fs.rmSync(tmp, { recursive: true, force: true });
console.log(`vscode: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
