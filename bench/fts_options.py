#!/usr/bin/env python3
# How much an FTS5 insert costs per text with the search table as hubbub builds it and
# with the other FTS5 options (BENCHMARKS.md, "What indexing texts for search costs a
# store"): 100,000 texts of 16 random words, indexed in batches of 1,024 as the SQLite
# writer does, each batch in its own durable transaction.
#
#   python3 bench/fts_options.py
import os
import random
import sqlite3
import tempfile
import time

random.seed(1)
WORDS = [
    "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 9)))
    for _ in range(5000)
]
TEXTS = [" ".join(random.choice(WORDS) for _ in range(16)) for _ in range(100_000)]
BATCH = 1024
TOKENIZE = "tokenize='unicode61 remove_diacritics 2'"
INDEX = (
    "INSERT INTO message_text (rowid, body) SELECT id, json_extract(content, '$') "
    "FROM messages WHERE id > ? AND id <= ?"
)


def run(name, ddl):
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "t.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, content TEXT)")
        db.executescript(ddl)
        spent = 0.0
        for b in range(0, len(TEXTS), BATCH):
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO messages (id, content) VALUES (?, ?)",
                [(b + i + 1, '"%s"' % t) for i, t in enumerate(TEXTS[b : b + BATCH])],
            )
            started = time.perf_counter()
            db.execute(INDEX, (b, b + BATCH))
            spent += time.perf_counter() - started
            db.execute("COMMIT")
        db.close()
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{name:28s} index {spent * 1e6 / len(TEXTS):6.2f} us/text, files {size / 1e6:.1f} MB")


run("fts5 (as built)", f"CREATE VIRTUAL TABLE message_text USING fts5(body, {TOKENIZE});")
run("fts5 detail=column", f"CREATE VIRTUAL TABLE message_text USING fts5(body, detail=column, {TOKENIZE});")
run("fts5 detail=none", f"CREATE VIRTUAL TABLE message_text USING fts5(body, detail=none, {TOKENIZE});")
run(
    "fts5 external content view",
    "CREATE VIEW bodies AS SELECT id, json_extract(content, '$') AS body FROM messages; "
    f"CREATE VIRTUAL TABLE message_text USING fts5(body, content='bodies', content_rowid='id', {TOKENIZE});",
)
run("fts5 contentless", f"CREATE VIRTUAL TABLE message_text USING fts5(body, content='', {TOKENIZE});")
