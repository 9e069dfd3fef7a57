-- CreateBudget with an idempotency key: the budget's id is derived from the
-- caller and the key, and the request's fingerprint is kept, so that a retry
-- answers the budget it created and the same key with another request is
-- refused (IDEMPOTENCY_KEY_REUSED).
ALTER TABLE budgets ADD COLUMN create_fingerprint text;
