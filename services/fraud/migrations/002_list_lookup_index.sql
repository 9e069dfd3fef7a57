-- Every Score looks its subjects up by (subject_type, value), whatever list.
CREATE INDEX list_entries_subject_idx ON list_entries (subject_type, value);
