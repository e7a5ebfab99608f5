-- Result tokens: every TaskInstance carries an HMAC of its task id under this installation's key,
-- and a result must carry it back, so that only whoever was handed a task can report on it (an
-- executor of one type cannot finish another type's tasks by guessing their derived ids).
-- Owner: orchestrator (the key is made here once; tasks.result_token_required is written with
-- each task).

CREATE TABLE result_token_key (
    id  smallint PRIMARY KEY CHECK (id = 1),
    key bytea NOT NULL CHECK (length(key) = 32)
);
-- 32 bytes from the server's strong random source (gen_random_uuid: 244 random bits in all).
INSERT INTO result_token_key (id, key)
VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));

-- Tasks stored before tokens existed (or by an orchestrator not yet upgraded, during a rolling
-- upgrade) take results without one; the orchestrator marks each task it makes with a token, and
-- a RetryTask gives an older task its token.
ALTER TABLE tasks ADD COLUMN result_token_required boolean NOT NULL DEFAULT false;
