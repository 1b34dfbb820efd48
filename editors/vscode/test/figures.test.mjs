// Unit tests for the figures of the status bar item's tooltip. Run with `npm test` (esbuild
// compiles src/figures.ts first).
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";

const require = createRequire(import.meta.url);
const { formatRate, tokensPerSecond } = require("../out/figures.js");

test("tokens per second come from the decoded tokens and the decode time", () => {
  assert.equal(tokensPerSecond({ generated_tokens: 24, decode_ms: 400, from_cache: false, stop: "EndOfText" }), 60);
  assert.equal(formatRate(60), "60");
  assert.equal(formatRate(59.6), "60");
  assert.equal(formatRate(7.25), "7.3");
});

test("no rate for an answer without generation", () => {
  assert.equal(tokensPerSecond(undefined), undefined);
  assert.equal(tokensPerSecond(null), undefined);
  assert.equal(tokensPerSecond({ generated_tokens: 0, decode_ms: 0, stop: "manual" }), undefined);
  assert.equal(tokensPerSecond({ generated_tokens: 8, decode_ms: 90, from_cache: true, stop: "speculated" }), undefined);
  assert.equal(tokensPerSecond({ generated_tokens: 8 }), undefined);
});
