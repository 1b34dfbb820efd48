// Progressive suggestions: the server answers an inline completion as soon as the first line of the
// suggestion is complete, goes on generating, and sends `phi-lsp/suggestionGrew` (to clients that
// declared `experimental.phiLsp.suggestionGrowth`) after each new line and when it is done. This
// module decides whether a notification still concerns what the user sees; it has no `vscode`
// import, so that the unit tests run under plain node.

export const SUGGESTION_GREW = "phi-lsp/suggestionGrew";

/** The client capability that asks the server for `phi-lsp/suggestionGrew`. */
export const growthCapability = { phiLsp: { suggestionGrowth: true } } as const;

/** `phi-lsp/suggestionGrew`'s params. */
export interface SuggestionGrew {
  textDocument: { uri: string; version: number };
  /** Where the inline completion was requested (LSP position, UTF-16 code units). */
  position: { line: number; character: number };
  /** The whole suggestion so far, to insert at `position`. */
  text: string;
  /** The generation ended: no more notifications for this suggestion. */
  done: boolean;
}

/** Where the user is now: the active editor's document and its single, empty selection. */
export interface Caret {
  uri: string;
  version: number;
  line: number;
  character: number;
  /** false with a selection or several cursors: no ghost text is shown there. */
  single: boolean;
}

/** Adds the growth capability to the client's `experimental` capabilities, keeping the others. */
export function withGrowthCapability(experimental: unknown): Record<string, unknown> {
  const base = typeof experimental === "object" && experimental !== null ? (experimental as Record<string, unknown>) : {};
  return { ...base, ...growthCapability };
}

function isCount(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value) && value >= 0;
}

/** The notification's params, if they have the shape the protocol gives them; otherwise undefined. */
export function parseSuggestionGrew(params: unknown): SuggestionGrew | undefined {
  if (typeof params !== "object" || params === null) {
    return undefined;
  }
  const p = params as Record<string, unknown>;
  const doc = p.textDocument as Record<string, unknown> | undefined;
  const pos = p.position as Record<string, unknown> | undefined;
  if (
    typeof doc !== "object" || doc === null || typeof doc.uri !== "string" || !Number.isInteger(doc.version) ||
    typeof pos !== "object" || pos === null || !isCount(pos.line) || !isCount(pos.character) ||
    typeof p.text !== "string" || typeof p.done !== "boolean"
  ) {
    return undefined;
  }
  return {
    textDocument: { uri: doc.uri, version: doc.version as number },
    position: { line: pos.line, character: pos.character },
    text: p.text,
    done: p.done,
  };
}

/**
 * Whether a grown suggestion should replace the ghost text: the user is still in that document, at
 * that version (typed nothing since), with the cursor where the suggestion was asked for. A
 * notification that no longer matches is stale (the user moved or typed something else) and is
 * ignored.
 */
export function growthApplies(grew: SuggestionGrew, caret: Caret | undefined): boolean {
  return (
    caret !== undefined &&
    caret.single &&
    caret.uri === grew.textDocument.uri &&
    caret.version === grew.textDocument.version &&
    caret.line === grew.position.line &&
    caret.character === grew.position.character
  );
}
