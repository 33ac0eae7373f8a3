// The one object that holds the extension's state while it is active: created in `activate`
// and passed explicitly to every function that reads or changes it.
import * as vscode from 'vscode';
import type { LanguageClient } from 'vscode-languageclient/node';
import type { ServerStatus } from './protocol';
import { createStatusItem } from './status';

export interface Context {
  /** VS Code's context of this extension (subscriptions). */
  readonly extension: vscode.ExtensionContext;
  /** The "AnchorCoder" log channel (also the language client's output). */
  readonly output: vscode.LogOutputChannel;
  readonly statusItem: vscode.StatusBarItem;
  /** The running (or starting) language client; undefined while stopped. */
  client: LanguageClient | undefined;
  /** The server binary found at the last start, with how it was found ("path (bundled)"). */
  binaryPath: string | undefined;
  /** The last answer to `anchorcoder/status`. */
  lastStatus: ServerStatus | undefined;
  /** Why the server is not running (binary not found, failed to start). */
  lastError: string | undefined;
  /** Percentage of the model progress, while it runs. */
  progressText: string | undefined;
  progressMessage: string | undefined;
  /** Inline completion requests waiting for their answer. */
  inFlight: number;
  pollTimer: NodeJS.Timeout | undefined;
  /** The restart in progress. */
  starting: Promise<void> | undefined;
  cursorTimer: NodeJS.Timeout | undefined;
  /** The cursor reported last (uri, version, line, character). */
  lastCursor: string;
}

export function createContext(extension: vscode.ExtensionContext): Context {
  const output = vscode.window.createOutputChannel('AnchorCoder', { log: true });
  const statusItem = createStatusItem();
  extension.subscriptions.push(output, statusItem);
  return {
    extension,
    output,
    statusItem,
    client: undefined,
    binaryPath: undefined,
    lastStatus: undefined,
    lastError: undefined,
    progressText: undefined,
    progressMessage: undefined,
    inFlight: 0,
    pollTimer: undefined,
    starting: undefined,
    cursorTimer: undefined,
    lastCursor: '',
  };
}
