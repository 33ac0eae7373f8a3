// The shapes of the server's custom messages this extension reads (`anchorcoder/status`).

export interface DocumentStatus {
  uri: string;
  tokens: number;
  anchors: number;
  keptTokens: number;
  kvBytes: number;
  pendingTokens: number;
  reusedTokens: number;
  /** Tokens of project context (other files) at the head of the prompt. */
  contextTokens?: number;
  /** The files that context came from, least relevant first. */
  contextFiles?: { path: string; bytes: number }[];
}

export interface BackendStatus {
  kind: 'local' | 'openai' | 'llamacpp';
  url?: string;
  state?: 'unknown' | 'reachable' | 'slow' | 'down';
  latencyMs?: number | null;
  lastError?: string | null;
  note?: string | null;
  fallbackToLocal?: boolean;
}

export interface ServerStatus {
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
