// AnchorCoder for VS Code: starts the `anchorcoder` language server over stdio and lets
// vscode-languageclient (10+, LSP 3.18) turn its textDocument/inlineCompletion answers into
// ghost text. Adds a status bar item, settings and a few commands.
//
// Modules: context (the one state object), settings (`anchorcoder.*`), client (binary lookup,
// start/stop/restart), inline (completion middleware), cursor (anchorcoder/didMoveCursor),
// status (status bar, `anchorcoder/status` polling, status detail), commands.
import * as vscode from 'vscode';
import { restart, sendSettings, stopClient } from './client';
import { registerCommands } from './commands';
import { Context, createContext } from './context';
import { reportCursor } from './cursor';
import { updateStatusItem } from './status';

/** The context of the active extension: the only module-level state, kept for `deactivate`. */
let active: Context | undefined;

export async function activate(extension: vscode.ExtensionContext): Promise<void> {
  const ctx = createContext(extension);
  active = ctx;
  extension.subscriptions.push(
    ...registerCommands(ctx),
    vscode.window.onDidChangeTextEditorSelection((e) => reportCursor(ctx, e.textEditor)),
    vscode.window.onDidChangeActiveTextEditor((e) => reportCursor(ctx, e)),
    vscode.workspace.onDidChangeConfiguration(async (e) => {
      if (!e.affectsConfiguration('anchorcoder')) return;
      updateStatusItem(ctx);
      if (e.affectsConfiguration('anchorcoder.server')) {
        await restart(ctx);
        return;
      }
      await sendSettings(ctx);
    }),
  );

  updateStatusItem(ctx);
  await restart(ctx);
}

export async function deactivate(): Promise<void> {
  const ctx = active;
  active = undefined;
  if (ctx) await stopClient(ctx);
}
