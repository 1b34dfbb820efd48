// Unit tests for the server-path resolution order: setting -> bundled -> PATH -> an error that
// says what to do. Run with `npm test` (esbuild compiles src/server-path.ts first).
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";

const require = createRequire(import.meta.url);
const { resolveServerPath } = require("../out/server-path.js");

function env(executables, pathVariable = "/usr/local/bin:/usr/bin") {
  return { platform: "linux", pathVariable, home: "/home/u", isExecutable: (f) => executables.includes(f) };
}

test("the setting wins over the bundled binary and PATH", () => {
  const r = resolveServerPath("/opt/phi-lsp", "/ext", env(["/opt/phi-lsp", "/ext/server/phi-lsp", "/usr/bin/phi-lsp"]));
  assert.deepEqual(r, { kind: "found", path: "/opt/phi-lsp", source: "setting" });
});

test("the setting expands ~", () => {
  const r = resolveServerPath("~/bin/phi-lsp", "/ext", env(["/home/u/bin/phi-lsp"]));
  assert.deepEqual(r, { kind: "found", path: "/home/u/bin/phi-lsp", source: "setting" });
});

test("a setting that points nowhere is an error naming the setting, not a silent fallback", () => {
  const r = resolveServerPath("/nope/phi-lsp", "/ext", env(["/usr/bin/phi-lsp"]));
  assert.equal(r.kind, "missing");
  assert.match(r.message, /phi-lsp\.serverPath is "\/nope\/phi-lsp"/);
});

test("the bundled binary comes before PATH", () => {
  const r = resolveServerPath("", "/ext", env(["/ext/server/phi-lsp", "/usr/bin/phi-lsp"]));
  assert.deepEqual(r, { kind: "found", path: "/ext/server/phi-lsp", source: "bundled" });
});

test("PATH is searched in order", () => {
  const r = resolveServerPath(undefined, "/ext", env(["/usr/bin/phi-lsp", "/usr/local/bin/phi-lsp"]));
  assert.deepEqual(r, { kind: "found", path: "/usr/local/bin/phi-lsp", source: "PATH" });
});

test("windows looks for phi-lsp.exe with ; separators", () => {
  const e = { ...env(["C:\\tools/phi-lsp.exe"]), platform: "win32", pathVariable: "C:\\x;C:\\tools" };
  const r = resolveServerPath("", "C:\\ext", e);
  assert.equal(r.kind, "found");
  assert.equal(r.source, "PATH");
});

test("nothing found: the error says how to get a binary", () => {
  const r = resolveServerPath("", "/ext", env([]));
  assert.equal(r.kind, "missing");
  assert.match(r.message, /cargo build --release/);
  assert.match(r.message, /phi-lsp\.serverPath/);
  assert.match(r.message, /PATH/);
});
