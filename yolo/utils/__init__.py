"""Small helpers every part of the project shares (atomic files, locks, redaction): one home each."""
