// Where the cursor rests, told to the server (`anchorcoder/didMoveCursor`).
import * as vscode from 'vscode';
import { State } from 'vscode-languageclient/node';
import type { Context } from './context';
import { config, enabledFor } from './settings';

/** How long the cursor rests before the server is told where it is. */
const CURSOR_DEBOUNCE_MS = 250;

/**
 * Tell the server where the cursor rests (`anchorcoder/didMoveCursor`), debounced, so that it
 * warms that document's cache there before the first keystroke: the LSP itself never says where
 * the cursor is. Called on selection changes and when the active editor changes.
 */
export function reportCursor(ctx: Context, editor: vscode.TextEditor | undefined): void {
  if (ctx.cursorTimer) clearTimeout(ctx.cursorTimer);
  ctx.cursorTimer = undefined;
  if (!editor) return;
  ctx.cursorTimer = setTimeout(() => {
    ctx.cursorTimer = undefined;
    const c = ctx.client;
    if (!c || c.state !== State.Running || editor !== vscode.window.activeTextEditor) return;
    const document = editor.document;
    if (!enabledFor(document) || !config(document).get<boolean>('warmAtCursor', true)) return;
    if (document.uri.scheme !== 'file' && document.uri.scheme !== 'untitled') return;
    const p = editor.selection.active;
    const uri = c.code2ProtocolConverter.asUri(document.uri);
    const key = `${uri}:${document.version}:${p.line}:${p.character}`;
    if (key === ctx.lastCursor) return;
    ctx.lastCursor = key;
    c.sendNotification('anchorcoder/didMoveCursor', {
      textDocument: { uri },
      position: { line: p.line, character: p.character },
    }).catch((e: Error) => ctx.output.appendLine(`anchorcoder/didMoveCursor: ${e.message}`));
  }, CURSOR_DEBOUNCE_MS);
}
