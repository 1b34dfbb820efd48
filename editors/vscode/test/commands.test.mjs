// Every command the extension registers is declared in package.json (contributes.commands), so
// that it is in the Command Palette with a title; and every declared one is registered.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

const source = readFileSync(new URL("../src/extension.ts", import.meta.url), "utf8");
const manifest = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"));
const registered = [...source.matchAll(/registerCommand\(\s*"([^"]+)"/g)].map((m) => m[1]);
const declared = manifest.contributes.commands.map((c) => c.command);

test("the extension registers commands (the pattern finds them)", () => {
  assert.ok(registered.includes("phi-lsp.restart"), registered.join(", "));
});

test("every registered command is declared in package.json", () => {
  const missing = registered.filter((id) => !declared.includes(id));
  assert.deepEqual(missing, [], `registered but not in contributes.commands: ${missing.join(", ")}`);
});

test("every declared command is registered, with a title and the phi-lsp category", () => {
  for (const command of manifest.contributes.commands) {
    assert.ok(registered.includes(command.command), `${command.command} is declared but not registered`);
    assert.ok(command.title, `${command.command} has no title`);
    assert.equal(command.category, "phi-lsp", command.command);
  }
});
