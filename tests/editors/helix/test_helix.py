"""The Helix integration: editors/helix/languages.toml parses with the keys Helix documents, and
phi-lsp started the way that snippet starts it, with its options and with Helix's client
capabilities (no inline completion; utf-8, utf-32, utf-16 positions; completion only), gives the
suggestion `phi-lsp complete` gives, in the completion menu.

Run: python3 tests/editors/helix/test_helix.py PHI_LSP_BIN MODEL_DIR
(no Helix binary comes from the package registries, so the client here behaves like Helix.)
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SNIPPET = REPO / "editors" / "helix" / "languages.toml"
BIN = os.environ.get("PHI_LSP_BIN", str(REPO / "target" / "release" / "phi-lsp"))
MODEL = os.environ.get("PHI_LSP_MODEL_DIR", str(REPO / "tests" / "fixtures" / "tiny-phi"))

# Keys from Helix's book (languages.md): the [language-server.<name>] table and the entries of
# a [[language]]'s `language-servers` list, and the feature names `only-features` accepts.
HELIX_SERVER_KEYS = {"command", "args", "config", "timeout", "environment", "required-root-patterns"}
HELIX_LANGUAGE_SERVER_ENTRY_KEYS = {"name", "only-features", "except-features"}
HELIX_FEATURES = {
    "format", "goto-definition", "goto-declaration", "goto-type-definition", "goto-reference",
    "goto-implementation", "signature-help", "hover", "document-highlight", "completion",
    "code-action", "workspace-command", "document-symbols", "workspace-symbols", "diagnostics",
    "rename-symbol", "inlay-hints", "document-colors",
}
# The server's options (initializationOptions / didChangeConfiguration) and their types.
SERVER_OPTIONS = {
    "model": str, "tokenizer": str, "device": str, "dtype": str, "backend": str, "maxNewTokens": int,
    "deadlineMs": int, "contextTokens": int, "completionMode": str,
}
CHOICES = {
    "device": {"auto", "cpu", "cuda", "metal"},
    "dtype": {"auto", "f32", "f16", "bf16", "q8_0", "q4k"},
    "completionMode": {"auto", "inline", "menu", "both"},
}

# What Helix (25.x) declares: no textDocument.inlineCompletion, completion with snippets and
# insert/replace edits, work-done progress, utf-8 preferred.
HELIX_CAPABILITIES = {
    "general": {"positionEncodings": ["utf-8", "utf-32", "utf-16"]},
    "window": {"workDoneProgress": True, "showMessage": {}},
    "workspace": {"configuration": True, "didChangeConfiguration": {"dynamicRegistration": False},
                  "workspaceFolders": True},
    "textDocument": {
        "synchronization": {"didSave": True},
        "completion": {
            "completionItem": {
                "snippetSupport": True,
                "insertReplaceSupport": True,
                "deprecatedSupport": True,
                "resolveSupport": {"properties": ["documentation", "detail", "additionalTextEdits"]},
                "tagSupport": {"valueSet": [1]},
            },
            "completionItemKind": {},
        },
        "hover": {"contentFormat": ["markdown"]},
    },
}

TYPED = 'def add(a, b):\n    """Return the sum of a and b."""\n    return a'


def load_snippet():
    with open(SNIPPET, "rb") as f:
        return tomllib.load(f)


class Snippet(unittest.TestCase):
    def setUp(self):
        self.toml = load_snippet()
        self.server = self.toml["language-server"]["phi-lsp"]

    def test_language_server_table_has_only_documented_keys(self):
        self.assertLessEqual(set(self.server), HELIX_SERVER_KEYS)
        self.assertIsInstance(self.server["command"], str)
        self.assertTrue(Path(self.server["command"]).name.startswith("phi-lsp"))
        self.assertIsInstance(self.server["args"], list)
        self.assertTrue(all(isinstance(a, str) for a in self.server["args"]))
        self.assertIn("--stdio", self.server["args"])
        self.assertIsInstance(self.server.get("timeout", 20), int)

    def test_config_holds_server_options_of_the_right_type(self):
        config = self.server["config"]
        self.assertLessEqual(set(config), set(SERVER_OPTIONS))
        for key, value in config.items():
            self.assertIsInstance(value, SERVER_OPTIONS[key], key)
            if key in CHOICES:
                self.assertIn(value, CHOICES[key], key)
        self.assertIn(config.get("completionMode", "auto"), {"menu", "auto", "both"},
                      "Helix has no ghost text: the suggestion must go to the menu")
        self.assertGreater(self.server.get("timeout", 20) * 1000, config.get("deadlineMs", 4000),
                           "Helix's request timeout must exceed the server's deadline")

    def test_python_uses_phi_lsp_beside_another_server(self):
        python = [lang for lang in self.toml["language"] if lang["name"] == "python"]
        self.assertEqual(len(python), 1)
        servers = python[0]["language-servers"]
        names = []
        for entry in servers:
            if isinstance(entry, str):
                names.append(entry)
                continue
            self.assertLessEqual(set(entry), HELIX_LANGUAGE_SERVER_ENTRY_KEYS)
            for key in ("only-features", "except-features"):
                self.assertLessEqual(set(entry.get(key, [])), HELIX_FEATURES, key)
            if entry["name"] == "phi-lsp":
                self.assertIn("completion", entry.get("only-features", ["completion"]))
                self.assertNotIn("completion", entry.get("except-features", []))
            names.append(entry["name"])
        self.assertIn("phi-lsp", names)
        self.assertGreater(len(names), 1, "phi-lsp goes beside the user's Python server")
        self.assertNotEqual(names[0], "phi-lsp", "the user's Python server stays first")


class LspClient:
    """Just enough JSON-RPC over stdio; answers the server's requests the way Helix does."""

    def __init__(self, argv, config):
        self.config = config
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.next_id = 0
        self.responses = {}
        self.notifications = []
        self.lock = threading.Condition()
        self.stderr = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _send(self, message):
        body = json.dumps(message).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def _read(self):
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                line = line.strip()
                if not line:
                    break
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            message = json.loads(out.read(length))
            if "id" in message and "method" in message:
                self._answer(message)
            with self.lock:
                if "id" in message and "method" not in message:
                    self.responses[message["id"]] = message
                elif "method" in message:
                    self.notifications.append(message)
                self.lock.notify_all()

    def _answer(self, request):
        result = None
        if request["method"] == "workspace/configuration":
            result = [self.config for _ in request["params"]["items"]]
        self._send({"jsonrpc": "2.0", "id": request["id"], "result": result})

    def request(self, method, params=None, timeout=60):
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        self._send(message)
        with self.lock:
            if not self.lock.wait_for(lambda: self.next_id in self.responses, timeout):
                raise TimeoutError(f"{method}: no answer in {timeout} s; stderr: {self.stderr_text()}")
            response = self.responses.pop(self.next_id)
        if "error" in response:
            raise RuntimeError(f"{method}: {response['error']}")
        return response.get("result")

    def notify(self, method, params):
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def stderr_text(self):
        return b"".join(self.stderr).decode(errors="replace")[-2000:]

    def close(self):
        try:
            self.request("shutdown", timeout=10)
            self.notify("exit", None)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


def cli_complete(text, line, character, max_new_tokens):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    try:
        out = subprocess.run(
            [BIN, "complete", f.name, "--model", MODEL, "--line", str(line), "--character",
             str(character), "--max-new-tokens", str(max_new_tokens), "--deadline-ms", "60000", "--json"],
            capture_output=True, text=True, timeout=300, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout)["text"]


def apply_edit(text, edit):
    lines = text.split("\n")

    def offset(pos):  # utf-8 positions: a byte offset in the line
        before = "\n".join(lines[: pos["line"]])
        line = lines[pos["line"]].encode()[: pos["character"]].decode()
        return len(before) + (1 if pos["line"] else 0) + len(line)

    start, end = offset(edit["range"]["start"]), offset(edit["range"]["end"])
    return text[:start] + edit["newText"] + text[end:]


class AsHelix(unittest.TestCase):
    """phi-lsp as the snippet starts it, talking to a client with Helix's capabilities."""

    def session(self, config):
        server = load_snippet()["language-server"]["phi-lsp"]
        client = LspClient([BIN, *server["args"]], config)
        self.addCleanup(client.close)
        workspace_dir = tempfile.TemporaryDirectory()
        self.addCleanup(workspace_dir.cleanup)
        workspace = Path(workspace_dir.name)
        init = client.request("initialize", {
            "processId": os.getpid(),
            "clientInfo": {"name": "helix", "version": "25.07.1"},
            "rootUri": workspace.as_uri(),
            "workspaceFolders": [{"uri": workspace.as_uri(), "name": "w"}],
            "capabilities": HELIX_CAPABILITIES,
            "initializationOptions": config,
        })
        client.notify("initialized", {})
        client.notify("workspace/didChangeConfiguration", {"settings": config})
        deadline = time.time() + 120
        while True:
            status = client.request("phi-lsp/status")
            if status["state"] != "loading" or time.time() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(status["state"], "ready", status)
        return client, init["capabilities"], workspace

    def config(self, **overrides):
        config = dict(load_snippet()["language-server"]["phi-lsp"]["config"])
        # The committed tiny model, and a deadline long enough that the answer never depends on time.
        config.update(model=MODEL, device="cpu", deadlineMs=60000, **overrides)
        return config

    def check_menu_suggestion(self, config):
        client, caps, workspace = self.session(config)
        self.assertEqual(caps.get("positionEncoding"), "utf-8")
        self.assertIn("completionProvider", caps)
        self.assertNotIn("inlineCompletionProvider", caps)
        uri = (workspace / "sample.py").as_uri()
        client.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": TYPED}})
        lines = TYPED.split("\n")
        line, character = len(lines) - 1, len(lines[-1].encode())
        result = client.request("textDocument/completion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 1}}, timeout=120)
        expected = cli_complete(TYPED, line, len(lines[-1].encode("utf-16-le")) // 2,
                                config.get("maxNewTokens", 64))
        self.assertTrue(expected, "phi-lsp complete gives no suggestion at the test position")
        self.assertIsInstance(result, dict, result)
        self.assertTrue(result["isIncomplete"])
        self.assertEqual(len(result["items"]), 1, result)
        item = result["items"][0]
        # Helix shows no labelDetails: the marker first, where a long line cannot push it away.
        self.assertTrue(item["label"].startswith("(phi-1) "), item["label"])
        self.assertLessEqual(len(item["label"]), len("(phi-1) ") + 41, item["label"])
        if os.environ.get("VERBOSE"):
            print(json.dumps(item, ensure_ascii=False), file=sys.stderr)
        edit = item["textEdit"]
        if "insert" in edit:  # InsertReplaceEdit: Helix applies `insert` unless completion-replace
            edit = {"range": edit["insert"], "newText": edit["newText"]}
        self.assertEqual(apply_edit(TYPED, edit), TYPED + expected,
                         "accepting the menu item gives the text `phi-lsp complete` suggests")
        return item, expected

    def test_snippet_options_give_the_suggestion_in_the_menu(self):
        item, expected = self.check_menu_suggestion(self.config())
        first_line = expected.split("\n")[0]
        self.assertIn(first_line.strip()[:20], item["label"])

    def test_auto_mode_chooses_the_menu_for_helix(self):
        self.check_menu_suggestion(self.config(completionMode="auto"))


if __name__ == "__main__":
    if len(sys.argv) >= 3:
        BIN, MODEL = sys.argv[1], sys.argv[2]
        del sys.argv[1:3]
    BIN, MODEL = str(Path(BIN).resolve()), str(Path(MODEL).resolve())
    result = unittest.main(verbosity=2, exit=False).result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(f"helix: {result.testsRun - failed - len(result.skipped)} passed, {failed} failed", flush=True)
    sys.exit(0 if failed == 0 and result.testsRun > 0 else 1)
