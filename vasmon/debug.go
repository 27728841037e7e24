package vasmon

// DebugTrace, if set, is told of structural steps (tests only).
var DebugTrace func(format string, args ...any)
