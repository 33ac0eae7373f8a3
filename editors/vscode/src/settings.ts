// Reading the `anchorcoder.*` configuration, and the server settings built from it.
import * as os from 'os';
import * as path from 'path';
import * as vscode from 'vscode';

export function config(scope?: vscode.ConfigurationScope): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration('anchorcoder', scope);
}

/** `anchorcoder.enable` for this document (it can be set per language). */
export function enabledFor(document: vscode.TextDocument): boolean {
  return config(document).get<boolean>('enable', true);
}

/** `anchorcoder.enable` without a language scope. */
export function enabled(): boolean {
  return config().get<boolean>('enable', true);
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
  'completion.contextTokens',
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

export function expandHome(p: string): string {
  if (p === '~') return os.homedir();
  if (p.startsWith('~/')) return path.join(os.homedir(), p.slice(2));
  return p;
}
