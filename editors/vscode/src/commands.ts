// The `anchorcoder.*` commands and what they do.
import * as vscode from 'vscode';
import { findBinary, restart } from './client';
import type { Context } from './context';
import { config, enabled } from './settings';
import { fetchStatus, statusDetail, updateStatusItem } from './status';

export function registerCommands(ctx: Context): vscode.Disposable[] {
  return [
    vscode.commands.registerCommand('anchorcoder.enable', () => setEnabled(ctx, true)),
    vscode.commands.registerCommand('anchorcoder.disable', () => setEnabled(ctx, false)),
    vscode.commands.registerCommand('anchorcoder.toggle', () => setEnabled(ctx, !enabled())),
    vscode.commands.registerCommand('anchorcoder.showStatus', () => showStatus(ctx)),
    vscode.commands.registerCommand('anchorcoder.pullModel', () => pullModel(ctx)),
    vscode.commands.registerCommand('anchorcoder.restartServer', () => restart(ctx)),
    vscode.commands.registerCommand('anchorcoder.showLog', () => ctx.output.show(true)),
  ];
}

async function showStatus(ctx: Context): Promise<void> {
  const s = await fetchStatus(ctx);
  updateStatusItem(ctx);
  const detail = statusDetail(ctx, s);
  ctx.output.appendLine('--- status ---');
  ctx.output.appendLine(detail);
  if (s) ctx.output.appendLine(JSON.stringify(s, null, 2));
  const actions = [enabled() ? 'Disable' : 'Enable', 'Restart Server', 'Pull Model', 'Show Log'];
  const pick = await vscode.window.showInformationMessage('AnchorCoder status', { modal: true, detail }, ...actions);
  switch (pick) {
    case 'Disable':
      return setEnabled(ctx, false);
    case 'Enable':
      return setEnabled(ctx, true);
    case 'Restart Server':
      return restart(ctx);
    case 'Pull Model':
      return pullModel(ctx);
    case 'Show Log':
      ctx.output.show(true);
      return;
  }
}

async function setEnabled(ctx: Context, on: boolean): Promise<void> {
  await config().update('enable', on, vscode.ConfigurationTarget.Global);
  updateStatusItem(ctx);
  vscode.window.setStatusBarMessage(`AnchorCoder inline completions ${on ? 'enabled' : 'disabled'}`, 3000);
}

/** Runs `anchorcoder model pull` in a terminal; offers a restart when it succeeds. */
async function pullModel(ctx: Context): Promise<void> {
  let bin: string;
  try {
    bin = findBinary(ctx.extension.extensionPath).path;
  } catch (e) {
    void vscode.window.showErrorMessage((e as Error).message);
    return;
  }
  const terminal = vscode.window.createTerminal({ name: 'AnchorCoder: model pull', shellPath: bin, shellArgs: ['model', 'pull'] });
  terminal.show();
  const sub = vscode.window.onDidCloseTerminal(async (t) => {
    if (t !== terminal) return;
    sub.dispose();
    const code = t.exitStatus?.code;
    if (code === 0) {
      const pick = await vscode.window.showInformationMessage('AnchorCoder: the model was pulled.', 'Restart Server');
      if (pick) await restart(ctx);
    } else if (code !== undefined) {
      void vscode.window.showErrorMessage(`AnchorCoder: \`anchorcoder model pull\` failed (exit ${code}).`);
    }
  });
  ctx.extension.subscriptions.push(sub);
}
