-- Byte-order collation for the text columns the history indexes key on. Under the
-- database's locale collation every B-tree comparison of `source` (primary key)
-- and `instrument` (lookup index) went through strcoll, the largest single cost of
-- the loader's inserts at 60k rows/s (perf: _bt_compare, varstr_cmp). Identifiers
-- need no linguistic order; "C" compares with memcmp. The views read these
-- columns, so they are dropped and made again around the change.

DROP VIEW trades_at;
DROP VIEW quotes_at;

ALTER TABLE trades
    ALTER COLUMN source TYPE text COLLATE "C",
    ALTER COLUMN instrument TYPE text COLLATE "C";
ALTER TABLE quotes
    ALTER COLUMN source TYPE text COLLATE "C",
    ALTER COLUMN instrument TYPE text COLLATE "C";

CREATE VIEW trades_at AS
    SELECT to_timestamp(ts_ns / 1e9) AS ts, * FROM trades;
CREATE VIEW quotes_at AS
    SELECT to_timestamp(ts_ns / 1e9) AS ts, * FROM quotes;
