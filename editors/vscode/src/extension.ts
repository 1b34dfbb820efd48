// The phi-lsp extension: starts the phi-lsp language server for Python files and shows its
// suggestions as inline completions (ghost text), refreshed as the server's suggestion grows.
// `restart` is the single way to (re)start it.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as vscode from "vscode";
import {
  ClientCapabilities,
  FeatureState,
  LanguageClient,
  LanguageClientOptions,
  RequestType0,
  ServerOptions,
  State,
  StaticFeature,
  TransportKind,
  WorkDoneProgressBegin,
  WorkDoneProgressEnd,
  WorkDoneProgressReport,
} from "vscode-languageclient/node";
import { formatRate, tokensPerSecond } from "./figures";
import { Caret, growthApplies, parseSuggestionGrew, SUGGESTION_GREW, SuggestionGrew, withGrowthCapability } from "./growth";
import { binaryName, nodeEnvironment, resolveServerPath } from "./server-path";

const SECTION = "phi-lsp";

/** The answer to the server's `phi-lsp/status` request (the fields this extension shows). */
interface ServerStatus {
  state: "loading" | "ready" | "failed";
  message?: string;
  model?: string;
  device?: string;
  dtype?: string;
  positionEncoding?: string;
  completionMode?: string;
  automatic?: boolean;
  last?: {
    prompt_tokens?: number;
    reused_tokens?: number;
    generated_tokens?: number;
    decode_ms?: number;
    total_ms?: number;
    from_cache?: boolean;
    stop?: string;
  } | null;
}

/** `phi-lsp/status` takes no params: the server rejects `{}`. */
const statusRequest = new RequestType0<ServerStatus, void>("phi-lsp/status");

type View =
  | { kind: "starting" }
  | { kind: "loading"; title?: string; message?: string; percentage?: number }
  | { kind: "ready"; status: ServerStatus }
  | { kind: "error"; message: string };

let client: LanguageClient | undefined;
let log: vscode.OutputChannel;
let statusItem: vscode.StatusBarItem;
let view: View = { kind: "starting" };
/** Restarts run one after another, never interleaved. */
let restarting: Promise<void> = Promise.resolve();
/** Set while this extension stops the client itself, so that the stop is not shown as an error. */
let stopping = false;
let statusTimer: NodeJS.Timeout | undefined;

export function activate(context: vscode.ExtensionContext): Promise<void> {
  log = vscode.window.createOutputChannel("phi-lsp");
  statusItem = vscode.window.createStatusBarItem("phi-lsp.status", vscode.StatusBarAlignment.Right, 100);
  statusItem.name = "phi-lsp";
  context.subscriptions.push(
    log,
    statusItem,
    vscode.commands.registerCommand("phi-lsp.restart", () => restart(context)),
    vscode.commands.registerCommand("phi-lsp.showLog", () => log.show(true)),
    vscode.commands.registerCommand("phi-lsp.enable", () => setEnabled(true)),
    vscode.commands.registerCommand("phi-lsp.disable", () => setEnabled(false)),
    vscode.commands.registerCommand("phi-lsp.toggle", () => setEnabled(!enabled())),
    vscode.commands.registerCommand("phi-lsp.toggleAutomatic", () => setAutomatic(!automatic())),
    vscode.commands.registerCommand("phi-lsp.menu", () => showMenu()),
    vscode.commands.registerCommand("phi-lsp.status", () => queryStatus()),
    vscode.workspace.onDidChangeConfiguration((event) => onConfigurationChanged(event, context)),
    { dispose: () => clearTimeout(statusTimer) },
  );
  render();
  statusItem.show();
  return restart(context);
}

export async function deactivate(): Promise<void> {
  await stopClient();
}

function config(): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration(SECTION);
}

function enabled(): boolean {
  return config().get<boolean>("enable", true);
}

async function setEnabled(on: boolean): Promise<void> {
  await config().update("enable", on, vscode.ConfigurationTarget.Global);
  render();
}

/** Whether the server suggests as you type (`phi-lsp.automatic`); off: manual-only. */
function automatic(): boolean {
  return config().get<boolean>("automatic", true);
}

/** Flips manual-only mode; the configuration change sends it to the server. */
async function setAutomatic(on: boolean): Promise<void> {
  await config().update("automatic", on, vscode.ConfigurationTarget.Global);
  render();
  void vscode.window.showInformationMessage(
    on ? "phi-lsp: automatic suggestions on" : "phi-lsp: automatic suggestions off — ask with Trigger Inline Suggestion (Alt+\\)",
  );
}

function expandHome(file: string): string {
  return file === "~" || file.startsWith("~/") ? path.join(os.homedir(), file.slice(1)) : file;
}

/** The server's options, as `initializationOptions` and `workspace/didChangeConfiguration` carry them. */
function serverSettings(): Record<string, unknown> {
  const c = config();
  const settings: Record<string, unknown> = {
    device: c.get<string>("device", "auto"),
    dtype: c.get<string>("dtype", "auto"),
    backend: c.get<string>("backend", "local"),
    maxNewTokens: c.get<number>("maxNewTokens", 64),
    deadlineMs: c.get<number>("deadlineMs", 4000),
    contextTokens: c.get<number>("contextTokens", 1024),
    completionMode: c.get<string>("completionMode", "auto"),
    speculate: c.get<boolean>("speculate", true),
    tokenHealing: c.get<boolean>("tokenHealing", true),
    automatic: c.get<boolean>("automatic", true),
    alternatives: c.get<number>("alternatives", 3),
    // An empty string clears a tokenizer set before.
    tokenizer: expandHome(c.get<string>("tokenizer", "").trim()),
  };
  // An empty model means the server's own default, which only a fresh start gives back.
  const model = c.get<string>("model", "").trim();
  if (model !== "") {
    settings.model = expandHome(model);
  }
  return settings;
}

async function onConfigurationChanged(event: vscode.ConfigurationChangeEvent, context: vscode.ExtensionContext) {
  if (!event.affectsConfiguration(SECTION)) {
    return;
  }
  if (event.affectsConfiguration(`${SECTION}.enable`) || event.affectsConfiguration(`${SECTION}.automatic`)) {
    render();
  }
  const modelCleared = event.affectsConfiguration(`${SECTION}.model`) && config().get<string>("model", "").trim() === "";
  if (event.affectsConfiguration(`${SECTION}.serverPath`) || modelCleared || client === undefined) {
    await restart(context);
    return;
  }
  if (client.isRunning()) {
    await client.sendNotification("workspace/didChangeConfiguration", { settings: { [SECTION]: serverSettings() } });
    scheduleStatus(200);
  }
}

function restart(context: vscode.ExtensionContext): Promise<void> {
  restarting = restarting.then(() => startClient(context)).catch((error) => showError(String(error)));
  return restarting;
}

async function stopClient(): Promise<void> {
  clearTimeout(statusTimer);
  if (client === undefined) {
    return;
  }
  const old = client;
  client = undefined;
  stopping = true;
  try {
    if (old.isRunning()) {
      await old.stop(3000);
    }
    await old.dispose();
  } catch (error) {
    log.appendLine(`phi-lsp: stopping the server: ${error}`);
  } finally {
    stopping = false;
  }
}

async function startClient(context: vscode.ExtensionContext): Promise<void> {
  await stopClient();
  view = { kind: "starting" };
  render();

  // A bundled binary may lose its executable bit in packaging.
  const bundled = path.join(context.extensionPath, "server", binaryName(process.platform));
  try {
    if (fs.existsSync(bundled)) {
      fs.chmodSync(bundled, 0o755);
    }
  } catch {
    // a read-only install: resolveServerPath says what it finds
  }
  const found = resolveServerPath(config().get<string>("serverPath"), context.extensionPath, nodeEnvironment());
  if (found.kind === "missing") {
    showError(found.message.replace(/^phi-lsp: /, ""));
    // Not awaited: a restart (after fixing the setting) must not wait for this notification.
    void vscode.window.showErrorMessage(found.message, "Open Settings", "Show Log").then((choice) => {
      if (choice === "Open Settings") {
        void vscode.commands.executeCommand("workbench.action.openSettings", "phi-lsp.serverPath");
      } else if (choice === "Show Log") {
        log.show(true);
      }
    });
    return;
  }
  log.appendLine(`phi-lsp: starting ${found.path} (from ${found.source})`);

  const serverOptions: ServerOptions = {
    command: found.path,
    transport: TransportKind.stdio, // adds --stdio
    options: { env: process.env },
  };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [
      { scheme: "file", language: "python" },
      { scheme: "untitled", language: "python" },
      // Python cells of Jupyter notebooks: the server syncs them as notebooks (notebookDocument/*,
      // declared in its capabilities), so a cell's prompt has the earlier cells before it.
      { notebook: "*", language: "python" },
    ],
    outputChannel: log,
    initializationOptions: serverSettings(),
    middleware: {
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        if (!enabled()) {
          return null;
        }
        // A growth refresh is VS Code's explicit trigger, but not the user asking: the server
        // answers it as typing would (from the generation running), not with alternatives.
        const refresh = refreshAsked;
        refreshAsked = false;
        const explicit = !refresh && context.triggerKind === vscode.InlineCompletionTriggerKind.Invoke;
        // vscode-languageclient 9 copies VS Code's triggerKind into the request as it is, but VS
        // Code counts from 0 (Invoke 0, Automatic 1) and LSP from 1 (Invoked 1, Automatic 2): typing
        // would reach the server as Invoked and Alt+\ as an unknown 0. The LSP value goes in instead.
        const lspKind = explicit ? 1 : 2;
        const asked = { ...context, triggerKind: lspKind as unknown as vscode.InlineCompletionTriggerKind };
        const items = await next(document, position, asked, token);
        scheduleStatus(50);
        return items;
      },
      provideCompletionItem: async (document, position, context, token, next) => {
        if (!enabled()) {
          return null;
        }
        const items = await next(document, position, context, token);
        scheduleStatus(50);
        return items;
      },
      handleWorkDoneProgress: (token, params, next) => {
        onProgress(String(token), params);
        next(token, params);
      },
    },
  };

  const created = new LanguageClient("phi-lsp", "phi-lsp", serverOptions, clientOptions);
  // Inline completion (textDocument/inlineCompletion, LSP 3.18) is a proposed feature in
  // vscode-languageclient 9; its provider forwards VS Code's cancellation token to the request.
  created.registerProposedFeatures();
  created.registerFeature(growthFeature);
  // Registered before start: the client keeps it for the connection it opens.
  created.onNotification(SUGGESTION_GREW, (params: unknown) => onSuggestionGrew(created, params));
  created.onDidChangeState((event) => {
    if (event.newState === State.Stopped && !stopping && client === created) {
      showError("the phi-lsp server stopped: see the log, then run “phi-lsp: Restart the server”");
    }
  });
  client = created;
  try {
    await created.start();
  } catch (error) {
    showError(`phi-lsp did not start (${found.path}): ${error instanceof Error ? error.message : error}`);
    return;
  }
  if (view.kind === "starting") {
    view = { kind: "loading" };
    render();
  }
  scheduleStatus(0);
}

/** Declares `experimental.phiLsp.suggestionGrowth`, so that the server sends `phi-lsp/suggestionGrew`. */
const growthFeature: StaticFeature = {
  fillClientCapabilities(capabilities: ClientCapabilities) {
    capabilities.experimental = withGrowthCapability(capabilities.experimental);
  },
  initialize() {},
  getState(): FeatureState {
    return { kind: "static" };
  },
  clear() {},
};

/** The newest growth not yet shown; a refresh in progress picks it up when it ends. */
let grown: { client: LanguageClient; grew: SuggestionGrew } | undefined;
let refreshing = false;
/** The next inline request is the refresh's trigger (see provideInlineCompletionItems). */
let refreshAsked = false;

/** Where the cursor is now, as the server names documents and positions. */
function caret(current: LanguageClient): Caret | undefined {
  const editor = vscode.window.activeTextEditor;
  if (editor === undefined) {
    return undefined;
  }
  const active = editor.selection.active;
  return {
    uri: current.code2ProtocolConverter.asUri(editor.document.uri),
    version: editor.document.version,
    line: active.line,
    character: active.character,
    single: editor.selections.length === 1 && editor.selection.isEmpty,
  };
}

/**
 * `phi-lsp/suggestionGrew`: the suggestion shown at the cursor has grown. VS Code asks again (the
 * server answers from the generation still running, without recomputing); a notification for
 * another document, version or position is stale and ignored.
 */
function onSuggestionGrew(from: LanguageClient, params: unknown) {
  const grew = parseSuggestionGrew(params);
  if (grew === undefined) {
    log.appendLine(`phi-lsp: ${SUGGESTION_GREW} with unexpected params: ${JSON.stringify(params)}`);
    return;
  }
  grown = { client: from, grew };
  if (!refreshing) {
    void refreshGhostText();
  }
}

async function refreshGhostText() {
  refreshing = true;
  try {
    while (grown !== undefined) {
      const { client: from, grew } = grown;
      grown = undefined;
      if (from !== client || !enabled() || !growthApplies(grew, caret(from))) {
        continue;
      }
      // VS Code does not ask a provider again at the position and document version of an answer it
      // holds from an explicit request, so `trigger` alone would refresh once; hiding drops that
      // answer first.
      await vscode.commands.executeCommand("editor.action.inlineSuggest.hide");
      if (growthApplies(grew, caret(from))) {
        refreshAsked = true;
        await vscode.commands.executeCommand("editor.action.inlineSuggest.trigger");
        refreshAsked = false;
      }
    }
  } catch (error) {
    log.appendLine(`phi-lsp: refreshing the ghost text: ${error}`);
  } finally {
    refreshing = false;
  }
}

/** Follows the server's work-done progress (model loading). */
function onProgress(token: string, value: WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd) {
  if (!token.startsWith("phi-lsp/load")) {
    return;
  }
  switch (value.kind) {
    case "begin":
      view = { kind: "loading", title: value.title, message: value.message, percentage: value.percentage };
      break;
    case "report":
      view = {
        kind: "loading",
        title: view.kind === "loading" ? view.title : undefined,
        message: value.message ?? (view.kind === "loading" ? view.message : undefined),
        percentage: value.percentage,
      };
      break;
    case "end":
      // The status request that follows says why a load failed.
      scheduleStatus(0);
      break;
  }
  render();
}

function scheduleStatus(delayMs: number) {
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => void queryStatus(), delayMs);
}

/** Asks the server how it is; polls while the model loads, in case a progress message is missed. */
async function queryStatus(): Promise<ServerStatus | undefined> {
  const current = client;
  if (current === undefined || !current.isRunning()) {
    return undefined;
  }
  let status: ServerStatus;
  try {
    status = await current.sendRequest(statusRequest);
  } catch (error) {
    log.appendLine(`phi-lsp: phi-lsp/status failed: ${error}`);
    return undefined;
  }
  if (current !== client) {
    return undefined;
  }
  if (status.state === "ready") {
    view = { kind: "ready", status };
  } else if (status.state === "failed") {
    const message = `model load failed: ${status.message ?? "see the log"}`;
    if (view.kind !== "error" || view.message !== message) {
      showError(message); // into the log too, where a click on the status bar item leads
    }
  } else {
    if (view.kind !== "loading") {
      view = { kind: "loading", message: status.message };
    }
    scheduleStatus(1000);
  }
  render();
  return status;
}

function showError(message: string) {
  view = { kind: "error", message };
  log.appendLine(`phi-lsp: ${message}`);
  render();
}

function modelName(model: string | undefined): string {
  if (!model) {
    return "Phi-1";
  }
  return path.basename(model.replace(/[\\/]+$/, "")) || model;
}

function render() {
  const item = statusItem;
  item.backgroundColor = undefined;
  item.command = "phi-lsp.menu";
  switch (view.kind) {
    case "starting":
      item.text = "$(loading~spin) phi-lsp";
      item.tooltip = "phi-lsp: starting the server";
      break;
    case "loading": {
      const percent = view.percentage === undefined ? "" : ` ${Math.round(view.percentage)}%`;
      item.text = `$(loading~spin) Phi-1 loading${percent}`;
      item.tooltip = [view.title ?? "phi-lsp: loading Phi-1", view.message].filter(Boolean).join("\n");
      break;
    }
    case "ready": {
      const s = view.status;
      const latency = s.last?.total_ms === undefined ? "" : ` · ${Math.round(s.last.total_ms)} ms`;
      item.text = `$(sparkle) ${modelName(s.model)} ${s.device ?? ""} ${s.dtype ?? ""}${latency}`.replace(/ +/g, " ");
      const lines = [
        `phi-lsp: ready — ${s.model ?? "model"} on ${s.device ?? "?"}, ${s.dtype ?? "?"}`,
        `completions: ${s.completionMode ?? "?"}, positions: ${s.positionEncoding ?? "?"}`,
      ];
      if (s.last) {
        const rate = tokensPerSecond(s.last);
        lines.push(
          `last suggestion: ${s.last.total_ms === undefined ? "?" : Math.round(s.last.total_ms)} ms, ${s.last.prompt_tokens ?? "?"} prompt tokens ` +
            `(${s.last.reused_tokens ?? 0} reused), ${s.last.generated_tokens ?? "?"} generated` +
            `${rate === undefined ? "" : ` at ${formatRate(rate)} tokens/s`}${s.last.from_cache ? " (from cache)" : ""}`,
        );
      }
      if (!automatic()) {
        lines.push("manual-only: Alt+\\ (Trigger Inline Suggestion) asks");
      }
      lines.push("click for actions");
      item.tooltip = lines.join("\n");
      break;
    }
    case "error":
      item.text = "$(error) phi-lsp";
      item.tooltip = `${view.message}\nclick to see the log`;
      item.backgroundColor = new vscode.ThemeColor("statusBarItem.errorBackground");
      item.command = "phi-lsp.showLog";
      break;
  }
  if (!automatic() && enabled() && view.kind !== "error") {
    item.text = `${item.text} (manual)`;
  }
  if (!enabled() && view.kind !== "error") {
    item.text = `$(circle-slash) ${item.text.replace(/^\$\([^)]*\) /, "")} (off)`;
    item.tooltip = `phi-lsp: completions disabled — click to enable\n${item.tooltip}`;
  }
}

async function showMenu() {
  const on = enabled();
  const picks: (vscode.QuickPickItem & { command: string })[] = [
    { label: on ? "$(circle-slash) Disable completions" : "$(check) Enable completions", command: on ? "phi-lsp.disable" : "phi-lsp.enable" },
    {
      label: automatic() ? "$(debug-pause) Manual-only suggestions (ask with Alt+\\)" : "$(play) Automatic suggestions",
      command: "phi-lsp.toggleAutomatic",
    },
    { label: "$(debug-restart) Restart the server", command: "phi-lsp.restart" },
    { label: "$(output) Show the log", command: "phi-lsp.showLog" },
    { label: "$(gear) Settings", command: "phi-lsp.openSettings" },
  ];
  const choice = await vscode.window.showQuickPick(picks, { placeHolder: "phi-lsp" });
  if (choice?.command === "phi-lsp.openSettings") {
    await vscode.commands.executeCommand("workbench.action.openSettings", "@ext:phi-lsp.phi-lsp");
  } else if (choice) {
    await vscode.commands.executeCommand(choice.command);
  }
}
