// AnchorCoder for VS Code: starts the `anchorcoder` language server over stdio and lets
// vscode-languageclient (10+, LSP 3.18) turn its textDocument/inlineCompletion answers into
// ghost text. Adds a status bar item, settings and a few commands.
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

const INSTALL_HINT =
  'Build and install it from the AnchorCoder source tree with `cargo install --path server` ' +
  '(puts `anchorcoder` in ~/.cargo/bin, which must be on PATH), or set `anchorcoder.server.path` ' +
  'to the binary, then run "AnchorCoder: Restart the Server".';

interface DocumentStatus {
  uri: string;
  tokens: number;
  anchors: number;
  keptTokens: number;
  kvBytes: number;
  pendingTokens: number;
  reusedTokens: number;
}

interface BackendStatus {
  kind: 'local' | 'openai' | 'llamacpp';
  url?: string;
  state?: 'unknown' | 'reachable' | 'slow' | 'down';
  latencyMs?: number | null;
  lastError?: string | null;
  note?: string | null;
  fallbackToLocal?: boolean;
}

interface ServerStatus {
  model: { path: string | null; source: string | null; state: 'loading' | 'pulling' | 'ready' | 'error' | 'unloaded'; error: string | null };
  backend?: BackendStatus;
  policy: unknown;
  documents: DocumentStatus[];
  cacheBytes: number;
  cacheBudgetBytes: number;
  queueDepth: number;
  lastLatenciesMs: number[];
  /** The cursor this extension reported last (anchorcoder/didMoveCursor). */
  cursor?: { textDocument: { uri: string }; position: { line: number; character: number } };
}

let client: LanguageClient | undefined;
let binaryPath: string | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let lastStatus: ServerStatus | undefined;
let lastError: string | undefined;
let progressText: string | undefined; // percentage of the model progress, while it runs
let progressMessage: string | undefined;
let inFlight = 0;
let pollTimer: NodeJS.Timeout | undefined;
let starting: Promise<void> | undefined;
let cursorTimer: NodeJS.Timeout | undefined;
let lastCursor = '';

/** How long the cursor rests before the server is told where it is. */
const CURSOR_DEBOUNCE_MS = 250;

function config(scope?: vscode.ConfigurationScope): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration('anchorcoder', scope);
}

/** The server settings (docs/configuration.md) this extension exposes as `anchorcoder.<key>`. */
const SERVER_KEYS = [
  'model.path',
  'model.adapter',
  'attention.policy',
  'attention.recentLines',
  'attention.sinkTokens',
  'attention.denseEvery',
  'attention.windowTokens',
  'cache.enabled',
  'cache.memoryBudgetMiB',
  'completion.maxTokens',
  'completion.maxLines',
  'completion.prefixTokens',
  'completion.suffixTokens',
  'completion.debounceMs',
  'completion.fim',
  'threads',
  'logFile',
  'backend.kind',
  'backend.url',
  'backend.model',
  'backend.apiKeyEnv',
  'backend.timeoutMs',
  'backend.fallbackToLocal',
] as const;

/** The server's own settings (docs/configuration.md), built from `anchorcoder.*`: the keys the
 * user set, and null for the others (the server's own default then stands, so that a default it
 * chooses by itself, like an adapter's trained policy, is not overridden); only keys the server
 * knows, so it warns about none. */
export function serverSettings(): Record<string, unknown> {
  const c = config();
  const out: Record<string, Record<string, unknown> | unknown> = {};
  for (const key of SERVER_KEYS) {
    const i = c.inspect(key);
    const set = [i?.workspaceFolderValue, i?.workspaceValue, i?.globalValue].find((v) => v !== undefined);
    // null: the server's default (and, on a change, back to it when the user removes the key).
    let value: unknown = set === undefined ? null : set;
    if ((key === 'model.path' || key === 'logFile') && typeof set === 'string') {
      value = set.trim() === '' ? null : expandHome(set);
    }
    const dot = key.indexOf('.');
    if (dot < 0) {
      out[key] = value;
    } else {
      const [group, name] = [key.slice(0, dot), key.slice(dot + 1)];
      const g = (out[group] as Record<string, unknown> | undefined) ?? {};
      g[name] = value;
      out[group] = g;
    }
  }
  return out;
}

function expandHome(p: string): string {
  if (p === '~') return os.homedir();
  if (p.startsWith('~/')) return path.join(os.homedir(), p.slice(2));
  return p;
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

/** The configured path, else `anchorcoder` on PATH; an Error with an install hint otherwise. */
export function findBinary(): string {
  const configured = (config().get<string>('server.path', '') ?? '').trim();
  if (configured !== '') {
    let p = expandHome(configured);
    const ws = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
    if (ws) p = p.replace(/\$\{workspaceFolder\}/g, ws);
    if (!path.isAbsolute(p) && ws) p = path.join(ws, p);
    if (isExecutable(p)) return p;
    throw new Error(`anchorcoder.server.path is set to "${configured}", but no executable file is there. ${INSTALL_HINT}`);
  }
  const exe = process.platform === 'win32' ? ['anchorcoder.exe'] : ['anchorcoder'];
  const dirs = (process.env.PATH ?? '').split(path.delimiter).filter((d) => d !== '');
  dirs.push(path.join(os.homedir(), '.cargo', 'bin'));
  for (const dir of dirs) {
    for (const name of exe) {
      const p = path.join(dir, name);
      if (isExecutable(p)) return p;
    }
  }
  throw new Error(`The AnchorCoder server (\`anchorcoder\`) was not found on PATH. ${INSTALL_HINT}`);
}

function enabledFor(document: vscode.TextDocument): boolean {
  return config(document).get<boolean>('enable', true);
}

async function startClient(context: vscode.ExtensionContext): Promise<void> {
  lastError = undefined;
  lastStatus = undefined;
  progressText = undefined;
  progressMessage = undefined;
  try {
    binaryPath = findBinary();
  } catch (e) {
    lastError = (e as Error).message;
    binaryPath = undefined;
    updateStatusItem();
    output.appendLine(lastError);
    const pick = await vscode.window.showErrorMessage(lastError, 'Open Settings');
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
    outputChannel: output,
    middleware: {
      provideInlineCompletionItems: async (document, position, ctx, token, next) => {
        if (!enabledFor(document)) return null;
        inFlight++;
        updateStatusItem();
        try {
          return await next(document, position, ctx, token);
        } finally {
          inFlight--;
          updateStatusItem();
          schedulePoll(200);
        }
      },
      provideCompletionItem: async (document, position, ctx, token, next) => {
        if (!enabledFor(document) || !config().get<boolean>('suggestWidget', false)) return null;
        return next(document, position, ctx, token);
      },
    },
  };
  const c = new LanguageClient('anchorcoder', 'AnchorCoder', serverOptions, clientOptions);
  client = c;
  c.onDidChangeState((e) => {
    if (e.newState === State.Stopped && client === c) {
      lastStatus = undefined;
    }
    updateStatusItem();
  });
  updateStatusItem();
  try {
    await c.start();
  } catch (e) {
    lastError = `The AnchorCoder server failed to start: ${(e as Error).message}`;
    output.appendLine(lastError);
    updateStatusItem();
    return;
  }
  c.onProgress(WorkDoneProgress.type, 'anchorcoder/model', (p: WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd) => {
    if (p.kind === 'end') {
      progressText = undefined;
      progressMessage = p.message;
    } else {
      progressText = typeof p.percentage === 'number' ? `${Math.round(p.percentage)}%` : '';
      progressMessage = p.message;
    }
    updateStatusItem();
    schedulePoll(200);
  });
  context.subscriptions.push({ dispose: () => void c.stop() });
  lastCursor = '';
  reportCursor(vscode.window.activeTextEditor);
  schedulePoll(0);
}

/**
 * Tell the server where the cursor rests (`anchorcoder/didMoveCursor`), debounced, so that it
 * warms that document's cache there before the first keystroke: the LSP itself never says where
 * the cursor is. Called on selection changes and when the active editor changes.
 */
function reportCursor(editor: vscode.TextEditor | undefined): void {
  if (cursorTimer) clearTimeout(cursorTimer);
  cursorTimer = undefined;
  if (!editor) return;
  cursorTimer = setTimeout(() => {
    cursorTimer = undefined;
    const c = client;
    if (!c || c.state !== State.Running || editor !== vscode.window.activeTextEditor) return;
    const document = editor.document;
    if (!enabledFor(document) || !config(document).get<boolean>('warmAtCursor', true)) return;
    if (document.uri.scheme !== 'file' && document.uri.scheme !== 'untitled') return;
    const p = editor.selection.active;
    const uri = c.code2ProtocolConverter.asUri(document.uri);
    const key = `${uri}:${document.version}:${p.line}:${p.character}`;
    if (key === lastCursor) return;
    lastCursor = key;
    c.sendNotification('anchorcoder/didMoveCursor', {
      textDocument: { uri },
      position: { line: p.line, character: p.character },
    }).catch((e: Error) => output.appendLine(`anchorcoder/didMoveCursor: ${e.message}`));
  }, CURSOR_DEBOUNCE_MS);
}

async function stopClient(): Promise<void> {
  const c = client;
  client = undefined;
  if (pollTimer) clearTimeout(pollTimer);
  pollTimer = undefined;
  if (c) {
    try {
      await c.stop(5000);
    } catch (e) {
      output.appendLine(`stopping the server: ${(e as Error).message}`);
    }
  }
  lastStatus = undefined;
  updateStatusItem();
}

async function restart(context: vscode.ExtensionContext): Promise<void> {
  if (starting) await starting;
  starting = (async () => {
    await stopClient();
    await startClient(context);
  })();
  try {
    await starting;
  } finally {
    starting = undefined;
  }
}

async function fetchStatus(): Promise<ServerStatus | undefined> {
  const c = client;
  if (!c || c.state !== State.Running) return undefined;
  try {
    const s = await c.sendRequest<ServerStatus>('anchorcoder/status');
    if (client === c) {
      lastStatus = s;
      if (s.model.state !== 'pulling' && s.model.state !== 'loading') progressText = undefined;
    }
    return s;
  } catch (e) {
    output.appendLine(`anchorcoder/status: ${(e as Error).message}`);
    return undefined;
  }
}

function schedulePoll(delayMs: number): void {
  if (pollTimer) clearTimeout(pollTimer);
  pollTimer = setTimeout(async () => {
    pollTimer = undefined;
    await fetchStatus();
    updateStatusItem();
    if (!client) return;
    const state = lastStatus?.model.state;
    const busy = inFlight > 0 || (lastStatus?.queueDepth ?? 0) > 0;
    const next = state === 'loading' || state === 'pulling' || busy || !lastStatus ? 1000 : 5000;
    if (!pollTimer) schedulePoll(next);
  }, delayMs);
}

function mib(bytes: number): string {
  const m = bytes / (1024 * 1024);
  return m >= 100 ? `${Math.round(m)} MiB` : `${m.toFixed(1)} MiB`;
}

function updateStatusItem(): void {
  if (!statusItem) return;
  const enabled = config().get<boolean>('enable', true);
  const s = lastStatus;
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
  if (!enabled && !lastError) text = `$(circle-slash) AnchorCoder (off)`;
  statusItem.text = text;
  statusItem.backgroundColor = bg;
  const tip = new vscode.MarkdownString(undefined, true);
  tip.appendMarkdown(`**AnchorCoder** — ${enabled ? 'inline completions on' : 'inline completions off'}\n\n`);
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

function statusDetail(s: ServerStatus | undefined): string {
  const lines: string[] = [];
  lines.push(`Server: ${binaryPath ?? '(not found)'}`);
  lines.push(`Inline completions: ${config().get<boolean>('enable', true) ? 'enabled' : 'disabled'}`);
  if (lastError) lines.push(`Error: ${lastError}`);
  if (!s) {
    lines.push(client ? 'Server state: starting' : 'Server state: stopped');
    return lines.join('\n');
  }
  if (remote(s)) lines.push(remoteLine(s.backend!));
  lines.push(`Model: ${s.model.state}${progressText ? ` (${progressText})` : ''}${progressMessage ? ` — ${progressMessage}` : ''}`);
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

async function showStatus(context: vscode.ExtensionContext): Promise<void> {
  const s = await fetchStatus();
  updateStatusItem();
  const detail = statusDetail(s);
  output.appendLine('--- status ---');
  output.appendLine(detail);
  if (s) output.appendLine(JSON.stringify(s, null, 2));
  const enabled = config().get<boolean>('enable', true);
  const actions = [enabled ? 'Disable' : 'Enable', 'Restart Server', 'Pull Model', 'Show Log'];
  const pick = await vscode.window.showInformationMessage('AnchorCoder status', { modal: true, detail }, ...actions);
  switch (pick) {
    case 'Disable':
      return setEnabled(false);
    case 'Enable':
      return setEnabled(true);
    case 'Restart Server':
      return restart(context);
    case 'Pull Model':
      return pullModel(context);
    case 'Show Log':
      output.show(true);
      return;
  }
}

async function setEnabled(on: boolean): Promise<void> {
  await config().update('enable', on, vscode.ConfigurationTarget.Global);
  updateStatusItem();
  vscode.window.setStatusBarMessage(`AnchorCoder inline completions ${on ? 'enabled' : 'disabled'}`, 3000);
}

async function pullModel(context: vscode.ExtensionContext): Promise<void> {
  let bin: string;
  try {
    bin = findBinary();
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
      if (pick) await restart(context);
    } else if (code !== undefined) {
      void vscode.window.showErrorMessage(`AnchorCoder: \`anchorcoder model pull\` failed (exit ${code}).`);
    }
  });
  context.subscriptions.push(sub);
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel('AnchorCoder', { log: true });
  statusItem = vscode.window.createStatusBarItem('anchorcoder.status', vscode.StatusBarAlignment.Right, 100);
  statusItem.name = 'AnchorCoder';
  statusItem.command = 'anchorcoder.showStatus';
  context.subscriptions.push(output, statusItem);

  context.subscriptions.push(
    vscode.commands.registerCommand('anchorcoder.enable', () => setEnabled(true)),
    vscode.commands.registerCommand('anchorcoder.disable', () => setEnabled(false)),
    vscode.commands.registerCommand('anchorcoder.toggle', () => setEnabled(!config().get<boolean>('enable', true))),
    vscode.commands.registerCommand('anchorcoder.showStatus', () => showStatus(context)),
    vscode.commands.registerCommand('anchorcoder.pullModel', () => pullModel(context)),
    vscode.commands.registerCommand('anchorcoder.restartServer', () => restart(context)),
    vscode.commands.registerCommand('anchorcoder.showLog', () => output.show(true)),
    vscode.window.onDidChangeTextEditorSelection((e) => reportCursor(e.textEditor)),
    vscode.window.onDidChangeActiveTextEditor((e) => reportCursor(e)),
    vscode.workspace.onDidChangeConfiguration(async (e) => {
      if (!e.affectsConfiguration('anchorcoder')) return;
      updateStatusItem();
      if (e.affectsConfiguration('anchorcoder.server')) {
        await restart(context);
        return;
      }
      if (client && client.state === State.Running) {
        await client.sendNotification('workspace/didChangeConfiguration', { settings: { anchorcoder: serverSettings() } });
        schedulePoll(300);
      }
    }),
  );

  updateStatusItem();
  await restart(context);
}

export async function deactivate(): Promise<void> {
  await stopClient();
}
