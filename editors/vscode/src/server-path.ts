// Which phi-lsp binary to start: the `phi-lsp.serverPath` setting, else the binary bundled in the
// extension (`server/phi-lsp`), else `phi-lsp` on PATH. Pure (no `vscode` import) so that it runs
// under `node --test`.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

export type ServerPath =
  | { kind: "found"; path: string; source: "setting" | "bundled" | "PATH" }
  | { kind: "missing"; message: string };

export interface Environment {
  platform: NodeJS.Platform;
  pathVariable: string | undefined;
  home: string;
  isExecutable: (file: string) => boolean;
}

export function nodeEnvironment(): Environment {
  return {
    platform: process.platform,
    pathVariable: process.env.PATH ?? process.env.Path,
    home: os.homedir(),
    isExecutable,
  };
}

function isExecutable(file: string): boolean {
  try {
    if (!fs.statSync(file).isFile()) {
      return false;
    }
    fs.accessSync(file, process.platform === "win32" ? fs.constants.F_OK : fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

export function binaryName(platform: NodeJS.Platform): string {
  return platform === "win32" ? "phi-lsp.exe" : "phi-lsp";
}

export function resolveServerPath(setting: string | undefined, extensionPath: string, env: Environment): ServerPath {
  const configured = (setting ?? "").trim();
  if (configured !== "") {
    const expanded = configured === "~" || configured.startsWith("~/") ? path.join(env.home, configured.slice(1)) : configured;
    if (env.isExecutable(expanded)) {
      return { kind: "found", path: expanded, source: "setting" };
    }
    return {
      kind: "missing",
      message:
        `phi-lsp.serverPath is "${configured}" but there is no executable file there: ` +
        "fix the setting, or clear it to use the bundled binary or phi-lsp on PATH",
    };
  }
  const name = binaryName(env.platform);
  const bundled = path.join(extensionPath, "server", name);
  if (env.isExecutable(bundled)) {
    return { kind: "found", path: bundled, source: "bundled" };
  }
  const separator = env.platform === "win32" ? ";" : ":";
  for (const dir of (env.pathVariable ?? "").split(separator)) {
    if (dir === "") {
      continue;
    }
    const candidate = path.join(dir, name);
    if (env.isExecutable(candidate)) {
      return { kind: "found", path: candidate, source: "PATH" };
    }
  }
  return {
    kind: "missing",
    message:
      "phi-lsp: no server binary found (not in the phi-lsp.serverPath setting, not bundled, not on PATH): " +
      "build it with `cargo build --release` in the phi-lsp repository and set phi-lsp.serverPath " +
      "to its target/release/phi-lsp, or put phi-lsp on PATH",
  };
}
