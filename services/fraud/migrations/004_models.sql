-- Trained scoring models. The newest row is the one in use: every replica
-- polls for it. A model is never changed or deleted; rolling back is storing
-- an older one again under a new version.
CREATE TABLE models (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version    text        NOT NULL UNIQUE CHECK (version ~ '^[a-z0-9][a-z0-9.-]{0,63}$'),
    kind       text        NOT NULL CHECK (kind = 'logistic_regression'),
    -- Feature names in order, standardisation, weights and bias.
    parameters jsonb       NOT NULL,
    -- Held-out ROC AUC, precision and recall, row counts.
    metrics    jsonb       NOT NULL,
    trained_on text        NOT NULL CHECK (trained_on IN ('history', 'synthetic')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER models_append_only BEFORE UPDATE OR DELETE ON models
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
