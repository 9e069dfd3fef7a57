"""The ledger: double-entry bookkeeping that never creates or loses money."""
