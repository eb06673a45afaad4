"""Stand-in for Forge's backend package (only what MemoGuard touches)."""
