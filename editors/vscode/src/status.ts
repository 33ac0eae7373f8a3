// The status bar item and the status detail, both from the server's `anchorcoder/status`, which
// is polled while the client runs.
import * as vscode from 'vscode';
import { State } from 'vscode-languageclient/node';
import type { Context } from './context';
import type { BackendStatus, ServerStatus } from './protocol';
import { enabled } from './settings';

export function createStatusItem(): vscode.StatusBarItem {
  const item = vscode.window.createStatusBarItem('anchorcoder.status', vscode.StatusBarAlignment.Right, 100);
  item.name = 'AnchorCoder';
  item.command = 'anchorcoder.showStatus';
  return item;
}

/** Asks the running server for `anchorcoder/status` and keeps the answer in `ctx.lastStatus`. */
export async function fetchStatus(ctx: Context): Promise<ServerStatus | undefined> {
  const c = ctx.client;
  if (!c || c.state !== State.Running) return undefined;
  try {
    const s = await c.sendRequest<ServerStatus>('anchorcoder/status');
    if (ctx.client === c) {
      ctx.lastStatus = s;
      if (s.model.state !== 'pulling' && s.model.state !== 'loading') ctx.progressText = undefined;
    }
    return s;
  } catch (e) {
    ctx.output.appendLine(`anchorcoder/status: ${(e as Error).message}`);
    return undefined;
  }
}

/** Polls the status after `delayMs`, then every second while busy or loading, else every 5 s. */
export function schedulePoll(ctx: Context, delayMs: number): void {
  if (ctx.pollTimer) clearTimeout(ctx.pollTimer);
  ctx.pollTimer = setTimeout(async () => {
    ctx.pollTimer = undefined;
    await fetchStatus(ctx);
    updateStatusItem(ctx);
    if (!ctx.client) return;
    const state = ctx.lastStatus?.model.state;
    const busy = ctx.inFlight > 0 || (ctx.lastStatus?.queueDepth ?? 0) > 0;
    const next = state === 'loading' || state === 'pulling' || busy || !ctx.lastStatus ? 1000 : 5000;
    if (!ctx.pollTimer) schedulePoll(ctx, next);
  }, delayMs);
}

function mib(bytes: number): string {
  const m = bytes / (1024 * 1024);
  return m >= 100 ? `${Math.round(m)} MiB` : `${m.toFixed(1)} MiB`;
}

export function updateStatusItem(ctx: Context): void {
  const { statusItem, client, lastError, progressText, progressMessage, inFlight } = ctx;
  const isEnabled = enabled();
  const s = ctx.lastStatus;
  let text: string;
  let bg: vscode.ThemeColor | undefined;
  if (lastError) {
    text = '$(error) AnchorCoder';
    bg = new vscode.ThemeColor('statusBarItem.errorBackground');
  } else if (!client || client.state === State.Stopped) {
    text = '$(debug-disconnect) AnchorCoder: stopped';
  } else if (client.state === State.Starting || !s) {
    text = progressText !== undefined ? `$(loading~spin) AnchorCoder: loading model ${progressText}` : '$(loading~spin) AnchorCoder: starting';
  } else if (remote(s) && s.backend?.state === 'down') {
    text = `$(cloud) AnchorCoder: remote down${s.backend.fallbackToLocal ? ' (local)' : ''}`;
    bg = new vscode.ThemeColor(s.backend.fallbackToLocal ? 'statusBarItem.warningBackground' : 'statusBarItem.errorBackground');
  } else if (remote(s) && s.backend?.state === 'slow') {
    text = '$(cloud) AnchorCoder: remote slow';
    bg = new vscode.ThemeColor('statusBarItem.warningBackground');
  } else if (remote(s)) {
    text = `$(cloud) AnchorCoder${inFlight > 0 ? ' …' : ''}`;
  } else if (s.model.state === 'error') {
    text = '$(error) AnchorCoder: model error';
    bg = new vscode.ThemeColor('statusBarItem.errorBackground');
  } else if (s.model.state === 'pulling' || s.model.state === 'loading') {
    text = `$(loading~spin) AnchorCoder: ${s.model.state} model ${progressText ?? ''}`.trimEnd();
  } else if (inFlight > 0 || s.queueDepth > 0) {
    text = `$(loading~spin) AnchorCoder ${mib(s.cacheBytes)}`;
  } else {
    text = `$(check) AnchorCoder ${mib(s.cacheBytes)}`;
  }
  if (!isEnabled && !lastError) text = `$(circle-slash) AnchorCoder (off)`;
  statusItem.text = text;
  statusItem.backgroundColor = bg;
  const tip = new vscode.MarkdownString(undefined, true);
  tip.appendMarkdown(`**AnchorCoder** — ${isEnabled ? 'inline completions on' : 'inline completions off'}\n\n`);
  if (lastError) tip.appendMarkdown(`Error: ${lastError}\n\n`);
  if (s) {
    if (remote(s)) tip.appendMarkdown(`${remoteLine(s.backend!)}\n\n`);
    tip.appendMarkdown(`Model: ${s.model.state}${s.model.path ? ` (${s.model.path})` : ''}\n\n`);
    if (s.model.error) tip.appendMarkdown(`Model error: ${s.model.error}\n\n`);
    if (progressMessage) tip.appendMarkdown(`${progressMessage}\n\n`);
    tip.appendMarkdown(`Cache: ${mib(s.cacheBytes)} of ${mib(s.cacheBudgetBytes)}, ${s.documents.length} document(s)\n\n`);
  }
  tip.appendMarkdown('Click for details.');
  statusItem.tooltip = tip;
  statusItem.show();
}

/** Whether generation goes to a remote engine (`backend.kind` other than local). */
function remote(s: ServerStatus): boolean {
  return !!s.backend && s.backend.kind !== 'local';
}

function remoteLine(b: BackendStatus): string {
  const parts = [`Remote ${b.kind} at ${b.url ?? '?'}: ${b.state ?? 'unknown'}`];
  if (b.latencyMs != null) parts.push(`${Math.round(b.latencyMs)} ms`);
  if (b.lastError) parts.push(`last error: ${b.lastError}`);
  if (b.note) parts.push(b.note);
  if (b.fallbackToLocal) parts.push('falls back to the local model while down');
  return parts.join(' — ');
}

/** The text of the "Show Status" dialog (and of the log's status section). */
export function statusDetail(ctx: Context, s: ServerStatus | undefined): string {
  const lines: string[] = [];
  lines.push(`Server: ${ctx.binaryPath ?? '(not found)'}`);
  lines.push(`Inline completions: ${enabled() ? 'enabled' : 'disabled'}`);
  if (ctx.lastError) lines.push(`Error: ${ctx.lastError}`);
  if (!s) {
    lines.push(ctx.client ? 'Server state: starting' : 'Server state: stopped');
    return lines.join('\n');
  }
  if (remote(s)) lines.push(remoteLine(s.backend!));
  lines.push(`Model: ${s.model.state}${ctx.progressText ? ` (${ctx.progressText})` : ''}${ctx.progressMessage ? ` — ${ctx.progressMessage}` : ''}`);
  if (s.model.path) lines.push(`Model path: ${s.model.path}${s.model.source ? ` [${s.model.source}]` : ''}`);
  if (s.model.error) lines.push(`Model error: ${s.model.error}`);
  lines.push(`Policy: ${typeof s.policy === 'string' ? s.policy : JSON.stringify(s.policy)}`);
  lines.push(`Cache: ${mib(s.cacheBytes)} of ${mib(s.cacheBudgetBytes)}`);
  lines.push(`Queue depth: ${s.queueDepth}`);
  if (s.cursor) {
    const p = s.cursor.position;
    lines.push(`Cursor reported: ${s.cursor.textDocument.uri.split('/').pop()}:${p.line + 1}:${p.character + 1}`);
  }
  if (s.lastLatenciesMs?.length) lines.push(`Last latencies: ${s.lastLatenciesMs.map((x) => Math.round(x)).join(', ')} ms`);
  for (const d of s.documents) {
    const name = d.uri.split('/').pop();
    lines.push(`• ${name}: ${d.tokens} tokens, ${d.keptTokens} kept, ${d.anchors} anchors, ${mib(d.kvBytes)} KV`);
  }
  return lines.join('\n');
}
