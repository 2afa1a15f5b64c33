// Package hostile holds no code of the node: its test feeds hostile inputs
// (messages, refs, headers, bodies, websocket frames, guest frames, images,
// archives, downloads, aggregates, volume names, settings) to the node's
// real components, checks that each is refused (or kept harmless) without
// a crash, a leak or unbounded memory, and keeps docs/hostile-inputs.md,
// the table of what each got, in step with the code.
package hostile
