// Figures the status bar item shows from the server's `phi-lsp/status`, kept apart from the
// extension so that they can be unit-tested without VS Code.

/** What `phi-lsp/status` says of the last completion (the fields used here). */
export interface LastCompletion {
  generated_tokens?: number;
  decode_ms?: number;
  from_cache?: boolean;
  stop?: string;
}

/**
 * Decoding speed of the last completion, in tokens per second, or undefined when it generated
 * nothing (an answer from the cache, the speculation or manual-only mode, no suggestion) or its
 * time is missing.
 */
export function tokensPerSecond(last: LastCompletion | null | undefined): number | undefined {
  const tokens = last?.generated_tokens;
  const ms = last?.decode_ms;
  if (last?.from_cache || typeof tokens !== "number" || typeof ms !== "number" || tokens <= 0 || ms <= 0) {
    return undefined;
  }
  return (tokens * 1000) / ms;
}

/** Tokens per second as the tooltip writes them: a whole number, one decimal under 10. */
export function formatRate(rate: number): string {
  return rate < 10 ? rate.toFixed(1) : String(Math.round(rate));
}
