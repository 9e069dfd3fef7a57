"""Wallets: people's money as they see it. Every movement is a ledger transfer."""
