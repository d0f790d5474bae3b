/**
 * Environment onnxruntime-node reads when it loads; imported by runtime.ts before onnxruntime-node itself.
 *
 * onnxruntime 1.30's Linux build records usage telemetry (a `/tmp/mat-debug-<pid>.log` per process and an event
 * queue under `~/.cache/Microsoft/DeveloperTools/.onnxruntime`). edgeshard runs offline and private, so it turns
 * that off unless the user has set `ORT_DISABLE_TELEMETRY` themselves.
 */
process.env.ORT_DISABLE_TELEMETRY ??= '1'
