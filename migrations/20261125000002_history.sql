-- History of enriched events, written by the loader. (source, seq) is the event's
-- identity: the loader inserts with ON CONFLICT DO NOTHING, so a redelivered batch
-- never makes a second row. Times are epoch nanoseconds (timestamptz keeps only
-- microseconds); see the *_at views for readable times.

CREATE TABLE trades (
    source       text NOT NULL,
    seq          bigint NOT NULL,
    instrument   text NOT NULL,
    venue        text NOT NULL,
    ts_ns        bigint NOT NULL,
    price        numeric NOT NULL,
    qty          numeric NOT NULL,
    side         text NOT NULL CHECK (side IN ('buy', 'sell')),
    trade_id     text,
    account      text,
    asset_class  text NOT NULL,
    currency     char(3) NOT NULL,
    notional     numeric NOT NULL,
    notional_usd numeric NOT NULL,
    ingest_ns    bigint NOT NULL,
    enriched_ns  bigint NOT NULL,
    stream_id    text NOT NULL,              -- entry id in the enriched stream
    PRIMARY KEY (source, seq)
);
CREATE INDEX trades_instrument_ts ON trades (instrument, ts_ns DESC);

CREATE TABLE quotes (
    source       text NOT NULL,
    seq          bigint NOT NULL,
    instrument   text NOT NULL,
    venue        text NOT NULL,
    ts_ns        bigint NOT NULL,
    bid          numeric NOT NULL,
    ask          numeric NOT NULL,
    bid_size     numeric NOT NULL,
    ask_size     numeric NOT NULL,
    asset_class  text NOT NULL,
    currency     char(3) NOT NULL,
    mid          numeric NOT NULL,
    spread       numeric NOT NULL,
    ingest_ns    bigint NOT NULL,
    enriched_ns  bigint NOT NULL,
    stream_id    text NOT NULL,
    PRIMARY KEY (source, seq)
);
CREATE INDEX quotes_instrument_ts ON quotes (instrument, ts_ns DESC);

CREATE VIEW trades_at AS
    SELECT to_timestamp(ts_ns / 1e9) AS ts, * FROM trades;
CREATE VIEW quotes_at AS
    SELECT to_timestamp(ts_ns / 1e9) AS ts, * FROM quotes;
