-- One attempt at a time drives a payment: a retry that arrives while an
-- earlier attempt still runs is told so instead of racing it.
ALTER TABLE payments ADD COLUMN lease_until timestamptz;
CREATE INDEX payments_processing_idx ON payments (updated_at) WHERE status = 'PROCESSING';
