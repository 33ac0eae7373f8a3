// Finding the `anchorcoder` binary and starting, stopping and restarting the language client
// (the server over stdio).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as vscode from 'vscode';
import {
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
  WorkDoneProgress,
  WorkDoneProgressBegin,
  WorkDoneProgressEnd,
  WorkDoneProgressReport,
} from 'vscode-languageclient/node';
import type { Context } from './context';
import { reportCursor } from './cursor';
import { completionMiddleware } from './inline';
import { config, expandHome, serverSettings } from './settings';
import { schedulePoll, updateStatusItem } from './status';

const INSTALL_HINT =
  'Install the AnchorCoder extension package for your platform (it carries the server), or build the ' +
  'server from the AnchorCoder source tree with `cargo install --path server` (puts `anchorcoder` in ' +
  '~/.cargo/bin), or set `anchorcoder.server.path` to the binary, then run "AnchorCoder: Restart the Server".';

/** Where a platform package (`vsce package --target ...`, see scripts/package) puts the server. */
export function bundledBinary(extensionPath: string): string {
  return path.join(extensionPath, 'server', process.platform === 'win32' ? 'anchorcoder.exe' : 'anchorcoder');
}

/** A server binary and how it was found (shown in the log and the status detail). */
export interface FoundBinary {
  path: string;
  source: 'anchorcoder.server.path' | 'bundled' | 'PATH' | '~/.cargo/bin';
}

function isExecutable(p: string): boolean {
  try {
    const st = fs.statSync(p);
    if (!st.isFile()) return false;
    if (process.platform === 'win32') return true;
    fs.accessSync(p, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The server binary, in this order: `anchorcoder.server.path` when the user set it (an explicit
 * choice wins, as rust-analyzer's `server.path` does), then the binary bundled in a platform
 * package, then `anchorcoder` on PATH, then ~/.cargo/bin (the extension host's PATH does not
 * always include it). An Error with an install hint when none is there.
 */
export function findBinary(extensionPath: string): FoundBinary {
  const configured = (config().get<string>('server.path', '') ?? '').trim();
  if (configured !== '') {
    let p = expandHome(configured);
    const ws = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
    if (ws) p = p.replace(/\$\{workspaceFolder\}/g, ws);
    if (!path.isAbsolute(p) && ws) p = path.join(ws, p);
    if (isExecutable(p)) return { path: p, source: 'anchorcoder.server.path' };
    throw new Error(`anchorcoder.server.path is set to "${configured}", but no executable file is there. ${INSTALL_HINT}`);
  }
  const bundled = bundledBinary(extensionPath);
  if (isExecutable(bundled)) return { path: bundled, source: 'bundled' };
  const exe = process.platform === 'win32' ? 'anchorcoder.exe' : 'anchorcoder';
  const dirs = (process.env.PATH ?? '').split(path.delimiter).filter((d) => d !== '');
  for (const dir of dirs) {
    const p = path.join(dir, exe);
    if (isExecutable(p)) return { path: p, source: 'PATH' };
  }
  const cargo = path.join(os.homedir(), '.cargo', 'bin', exe);
  if (isExecutable(cargo)) return { path: cargo, source: '~/.cargo/bin' };
  throw new Error(
    `The AnchorCoder server (\`anchorcoder\`) was not found: this extension package carries none for ` +
      `${process.platform}-${process.arch}, and it is not on PATH or in ~/.cargo/bin. ${INSTALL_HINT}`,
  );
}

async function startClient(ctx: Context): Promise<void> {
  ctx.lastError = undefined;
  ctx.lastStatus = undefined;
  ctx.progressText = undefined;
  ctx.progressMessage = undefined;
  let binaryPath: string;
  try {
    const found = findBinary(ctx.extension.extensionPath);
    binaryPath = found.path;
    ctx.binaryPath = `${found.path} (${found.source})`;
    ctx.output.info(`AnchorCoder server: ${found.path} (found via ${found.source})`);
  } catch (e) {
    const error = (e as Error).message;
    ctx.lastError = error;
    ctx.binaryPath = undefined;
    updateStatusItem(ctx);
    ctx.output.appendLine(error);
    const pick = await vscode.window.showErrorMessage(error, 'Open Settings');
    if (pick === 'Open Settings') {
      void vscode.commands.executeCommand('workbench.action.openSettings', 'anchorcoder.server.path');
    }
    return;
  }
  const extraArgs = config().get<string[]>('server.extraArgs', []) ?? [];
  // No `transport`: stdio without the `--stdio` argument that TransportKind.stdio would append.
  const serverOptions: ServerOptions = {
    command: binaryPath,
    args: ['serve', ...extraArgs],
  };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: { anchorcoder: serverSettings() },
    outputChannel: ctx.output,
    middleware: completionMiddleware(ctx),
  };
  const c = new LanguageClient('anchorcoder', 'AnchorCoder', serverOptions, clientOptions);
  ctx.client = c;
  c.onDidChangeState((e) => {
    if (e.newState === State.Stopped && ctx.client === c) {
      ctx.lastStatus = undefined;
    }
    updateStatusItem(ctx);
  });
  updateStatusItem(ctx);
  try {
    await c.start();
  } catch (e) {
    ctx.lastError = `The AnchorCoder server failed to start: ${(e as Error).message}`;
    ctx.output.appendLine(ctx.lastError);
    updateStatusItem(ctx);
    return;
  }
  c.onProgress(WorkDoneProgress.type, 'anchorcoder/model', (p: WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd) => {
    if (p.kind === 'end') {
      ctx.progressText = undefined;
      ctx.progressMessage = p.message;
    } else {
      ctx.progressText = typeof p.percentage === 'number' ? `${Math.round(p.percentage)}%` : '';
      ctx.progressMessage = p.message;
    }
    updateStatusItem(ctx);
    schedulePoll(ctx, 200);
  });
  ctx.extension.subscriptions.push({ dispose: () => void c.stop() });
  ctx.lastCursor = '';
  reportCursor(ctx, vscode.window.activeTextEditor);
  schedulePoll(ctx, 0);
}

export async function stopClient(ctx: Context): Promise<void> {
  const c = ctx.client;
  ctx.client = undefined;
  if (ctx.pollTimer) clearTimeout(ctx.pollTimer);
  ctx.pollTimer = undefined;
  if (c) {
    try {
      await c.stop(5000);
    } catch (e) {
      ctx.output.appendLine(`stopping the server: ${(e as Error).message}`);
    }
  }
  ctx.lastStatus = undefined;
  updateStatusItem(ctx);
}

/** Stops the client if it runs and starts it again; one restart at a time. */
export async function restart(ctx: Context): Promise<void> {
  if (ctx.starting) await ctx.starting;
  ctx.starting = (async () => {
    await stopClient(ctx);
    await startClient(ctx);
  })();
  try {
    await ctx.starting;
  } finally {
    ctx.starting = undefined;
  }
}

/** Sends the changed settings to the running server. */
export async function sendSettings(ctx: Context): Promise<void> {
  const c = ctx.client;
  if (c && c.state === State.Running) {
    await c.sendNotification('workspace/didChangeConfiguration', { settings: { anchorcoder: serverSettings() } });
    schedulePoll(ctx, 300);
  }
}
