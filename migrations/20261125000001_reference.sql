-- Reference data joined onto every event by enrich. Every change NOTIFYs channel
-- `tg_refdata` with {"table", "op", "key"} so caches stay fresh without polling.

CREATE TABLE venues (
    mic         text PRIMARY KEY CHECK (mic ~ '^[A-Z0-9]{4}$'),
    name        text NOT NULL,
    country     char(2) NOT NULL,            -- ISO 3166-1 alpha-2
    timezone    text NOT NULL,               -- IANA zone, e.g. Europe/London
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE instruments (
    symbol      text PRIMARY KEY CHECK (length(symbol) BETWEEN 1 AND 32),
    name        text NOT NULL,
    asset_class text NOT NULL CHECK (asset_class IN ('equity', 'etf', 'fx', 'future', 'bond', 'crypto')),
    currency    char(3) NOT NULL,            -- ISO 4217 quote currency
    venue       text NOT NULL REFERENCES venues (mic),  -- primary listing
    tick_size   numeric NOT NULL CHECK (tick_size > 0),
    lot_size    numeric NOT NULL CHECK (lot_size > 0),
    sector      text,
    isin        text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instruments_venue ON instruments (venue);
CREATE INDEX instruments_asset_class ON instruments (asset_class);

CREATE TABLE accounts (
    id          text PRIMARY KEY,
    desk        text NOT NULL,
    owner       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One unit of `currency` is worth `usd_rate` US dollars.
CREATE TABLE fx_rates (
    currency    char(3) PRIMARY KEY,
    usd_rate    numeric NOT NULL CHECK (usd_rate > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION tg_refdata_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        k := to_jsonb(OLD) ->> TG_ARGV[0];
    ELSE
        k := to_jsonb(NEW) ->> TG_ARGV[0];
    END IF;
    PERFORM pg_notify('tg_refdata',
        json_build_object('table', TG_TABLE_NAME, 'op', TG_OP, 'key', k)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER venues_notify AFTER INSERT OR UPDATE OR DELETE ON venues
    FOR EACH ROW EXECUTE FUNCTION tg_refdata_notify('mic');
CREATE TRIGGER instruments_notify AFTER INSERT OR UPDATE OR DELETE ON instruments
    FOR EACH ROW EXECUTE FUNCTION tg_refdata_notify('symbol');
CREATE TRIGGER accounts_notify AFTER INSERT OR UPDATE OR DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION tg_refdata_notify('id');
CREATE TRIGGER fx_rates_notify AFTER INSERT OR UPDATE OR DELETE ON fx_rates
    FOR EACH ROW EXECUTE FUNCTION tg_refdata_notify('currency');
-- TRUNCATE fires no row triggers: tell caches to reload everything.
CREATE FUNCTION tg_refdata_notify_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tg_refdata',
        json_build_object('table', TG_TABLE_NAME, 'op', 'TRUNCATE', 'key', NULL)::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER venues_truncate AFTER TRUNCATE ON venues
    FOR EACH STATEMENT EXECUTE FUNCTION tg_refdata_notify_truncate();
CREATE TRIGGER instruments_truncate AFTER TRUNCATE ON instruments
    FOR EACH STATEMENT EXECUTE FUNCTION tg_refdata_notify_truncate();
CREATE TRIGGER accounts_truncate AFTER TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION tg_refdata_notify_truncate();
CREATE TRIGGER fx_rates_truncate AFTER TRUNCATE ON fx_rates
    FOR EACH STATEMENT EXECUTE FUNCTION tg_refdata_notify_truncate();
