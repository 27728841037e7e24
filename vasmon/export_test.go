package vasmon

// Queued returns the Monitor's count of queued hooks minus queued unhooks
// of r and of its VM; both are 0 between calls into the Monitor.
func Queued(r *Root) (root, vm int64) { return r.queued, r.VM.queued }
