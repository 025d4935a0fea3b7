-- passerelle's PostgreSQL store, schema version 1 (see src/pg_store.rs for what each part
-- is for and the invariants). Applied at open, under a transaction-level advisory lock,
-- so that nodes starting together create it once. Every statement is idempotent.

CREATE TABLE IF NOT EXISTS passerelle_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Message ids and delivery sequence numbers: monotonic, never reused.
CREATE SEQUENCE IF NOT EXISTS passerelle_message_id;
CREATE SEQUENCE IF NOT EXISTS passerelle_delivery_seq;

CREATE TABLE IF NOT EXISTS passerelle_messages (
    id             bigint PRIMARY KEY,
    received_at_ms bigint NOT NULL,
    listener       text   NOT NULL,
    peer           text   NOT NULL,
    size           bigint NOT NULL,
    msh            jsonb,                 -- MshSummary, null when the header was unreadable
    control_id     text,                  -- MSH-10, copied out of msh for its index
    route          text,
    state          text   NOT NULL CHECK (state IN
                       ('received', 'rejected', 'unrouted', 'mapped', 'mapping_failed',
                        'duplicate')),
    error          text,
    bundle         text,
    history        jsonb  NOT NULL        -- [Transition]
);
-- Databases created before the `duplicate` state get it in their check at the next open
-- (once: the check is replaced only when it lacks it; NOT VALID, since every row already
-- holds one of the older states).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'passerelle_messages_state_check'
                     AND pg_get_constraintdef(oid) LIKE '%duplicate%') THEN
        ALTER TABLE passerelle_messages DROP CONSTRAINT IF EXISTS passerelle_messages_state_check;
        ALTER TABLE passerelle_messages ADD CONSTRAINT passerelle_messages_state_check
            CHECK (state IN ('received', 'rejected', 'unrouted', 'mapped', 'mapping_failed',
                             'duplicate')) NOT VALID;
    END IF;
END $$;
-- An operator's resubmission links a corrected copy and its original (`Links` as JSON;
-- null for every other message). Databases created before it get the column at the next
-- open; the schema version stays 1, since older readers name their columns.
ALTER TABLE passerelle_messages ADD COLUMN IF NOT EXISTS links jsonb;
CREATE INDEX IF NOT EXISTS passerelle_messages_state ON passerelle_messages (state, id);
CREATE INDEX IF NOT EXISTS passerelle_messages_received ON passerelle_messages (received_at_ms);
CREATE INDEX IF NOT EXISTS passerelle_messages_control_id ON passerelle_messages (control_id, id);

-- The frames' bytes, apart, so that updating a message's state does not copy them.
CREATE TABLE IF NOT EXISTS passerelle_frames (
    id    bigint PRIMARY KEY REFERENCES passerelle_messages (id) ON DELETE CASCADE,
    frame bytea  NOT NULL
);

CREATE TABLE IF NOT EXISTS passerelle_deliveries (
    destination     text    NOT NULL,
    seq             bigint  NOT NULL,
    message_id      bigint  NOT NULL REFERENCES passerelle_messages (id) ON DELETE CASCADE,
    ordering_key    text    NOT NULL,
    state           text    NOT NULL CHECK (state IN
                        ('pending', 'in_flight', 'retry_wait', 'delivered', 'dead')),
    attempts        integer NOT NULL,
    enqueued_at_ms  bigint  NOT NULL,
    next_attempt_ms bigint  NOT NULL,
    lease_until_ms  bigint  NOT NULL,
    dead_reason     text,
    history         jsonb   NOT NULL,     -- [Attempt]
    -- Holds its ordering key: unfinished, or dead while dead letters hold their key. The
    -- key's head is its holder with the lowest seq.
    holds_key       boolean NOT NULL,
    -- Set while the delivery is its key's head and may be leased from then on.
    ready_at_ms     bigint,
    -- The lease that the worker holding it must show; it only grows, so that a lease
    -- that expired and was given again can never complete.
    lease_token     bigint  NOT NULL DEFAULT 0,
    -- The PgStore (node) holding the lease, for the release of a dead node's leases.
    lease_owner     integer,
    PRIMARY KEY (destination, seq)
);
CREATE INDEX IF NOT EXISTS passerelle_deliveries_message ON passerelle_deliveries (message_id);
CREATE INDEX IF NOT EXISTS passerelle_deliveries_ready
    ON passerelle_deliveries (destination, ready_at_ms, seq) WHERE ready_at_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS passerelle_deliveries_key
    ON passerelle_deliveries (destination, ordering_key, seq) WHERE holds_key;
CREATE INDEX IF NOT EXISTS passerelle_deliveries_leases
    ON passerelle_deliveries (lease_until_ms) WHERE state = 'in_flight';
CREATE INDEX IF NOT EXISTS passerelle_deliveries_unfinished
    ON passerelle_deliveries (destination, enqueued_at_ms)
    WHERE state IN ('pending', 'in_flight', 'retry_wait');
CREATE INDEX IF NOT EXISTS passerelle_deliveries_by_key
    ON passerelle_deliveries (ordering_key, message_id);

-- Counts per state, as counters updated in the same transaction as the state change.
-- Each transaction adds to one of several shards picked at random, so that concurrent
-- writers do not queue on one hot row; reading sums the shards.
CREATE TABLE IF NOT EXISTS passerelle_counters (
    name  text     NOT NULL,
    shard smallint NOT NULL,
    value bigint   NOT NULL,
    PRIMARY KEY (name, shard)
);

INSERT INTO passerelle_meta (key, value) VALUES ('schema_version', '1')
    ON CONFLICT (key) DO NOTHING;
