// The language client's middleware for completions: vscode-languageclient (10+, LSP 3.18) turns
// the server's textDocument/inlineCompletion answers into ghost text; this gates them on
// `anchorcoder.enable` and counts the requests in flight for the status bar. The suggestion
// list (textDocument/completion) is offered only with `anchorcoder.suggestWidget`.
import type { Middleware } from 'vscode-languageclient/node';
import type { Context } from './context';
import { config, enabledFor } from './settings';
import { schedulePoll, updateStatusItem } from './status';

export function completionMiddleware(ctx: Context): Middleware {
  return {
    provideInlineCompletionItems: async (document, position, completionContext, token, next) => {
      if (!enabledFor(document)) return null;
      ctx.inFlight++;
      updateStatusItem(ctx);
      try {
        return await next(document, position, completionContext, token);
      } finally {
        ctx.inFlight--;
        updateStatusItem(ctx);
        schedulePoll(ctx, 200);
      }
    },
    provideCompletionItem: async (document, position, completionContext, token, next) => {
      if (!enabledFor(document) || !config().get<boolean>('suggestWidget', false)) return null;
      return next(document, position, completionContext, token);
    },
  };
}
