// Unit tests for the rule that decides whether a `phi-lsp/suggestionGrew` notification refreshes
// the ghost text, and for the capability that asks for it. Run with `npm test` (esbuild compiles
// src/growth.ts first).
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";

const require = createRequire(import.meta.url);
const { growthApplies, parseSuggestionGrew, withGrowthCapability } = require("../out/growth.js");

const params = {
  textDocument: { uri: "file:///w/sample.py", version: 7 },
  position: { line: 3, character: 4 },
  text: "return n\n",
  done: false,
};
const caret = { uri: "file:///w/sample.py", version: 7, line: 3, character: 4, single: true };

test("well-formed params parse to themselves", () => {
  assert.deepEqual(parseSuggestionGrew(params), params);
  assert.deepEqual(parseSuggestionGrew({ ...params, done: true }), { ...params, done: true });
});

test("params without a field, or with a field of the wrong type, are refused", () => {
  for (const bad of [
    null,
    "text",
    { ...params, textDocument: undefined },
    { ...params, textDocument: { uri: "file:///w/sample.py" } },
    { ...params, textDocument: { uri: 1, version: 7 } },
    { ...params, position: { line: 3 } },
    { ...params, position: { line: -1, character: 4 } },
    { ...params, position: { line: 3, character: 1.5 } },
    { ...params, text: undefined },
    { ...params, done: "no" },
  ]) {
    assert.equal(parseSuggestionGrew(bad), undefined, JSON.stringify(bad));
  }
});

test("a growth applies where it was asked for: same document, version and position", () => {
  assert.equal(growthApplies(params, caret), true);
});

test("a growth is stale once the user typed, moved, switched file or selected", () => {
  assert.equal(growthApplies(params, { ...caret, version: 8 }), false);
  assert.equal(growthApplies(params, { ...caret, character: 5 }), false);
  assert.equal(growthApplies(params, { ...caret, line: 2 }), false);
  assert.equal(growthApplies(params, { ...caret, uri: "file:///w/other.py" }), false);
  assert.equal(growthApplies(params, { ...caret, single: false }), false);
  assert.equal(growthApplies(params, undefined), false);
});

test("the capability joins the other experimental capabilities", () => {
  assert.deepEqual(withGrowthCapability(undefined), { phiLsp: { suggestionGrowth: true } });
  assert.deepEqual(withGrowthCapability({ other: 1 }), { other: 1, phiLsp: { suggestionGrowth: true } });
});
