/** The OpenAI-compatible server: its HTTP front, the engine interface it drives, and the cluster's engine. */
export { ApiError } from './api-error.ts'
export { ClusterEngine, type CompletionEngine, type EngineGenerateOptions, type EngineResult, modelIdOf } from './engine.ts'
export { GenerationQueue } from './generation-queue.ts'
export { DEFAULT_COMPLETION_MAX_TOKENS, MAX_BODY_BYTES, OpenAiServer, type OpenAiServerOptions, type RequestSummary } from './openai-server.ts'
export { StopText } from './stop-text.ts'
