#!/usr/bin/env python3
# What the search index's merge settings cost (BENCHMARKS.md, round 7): 400,000 texts of
# 10 words indexed in batches of 1,024, each batch one durable transaction timed with its
# commit (FTS5 writes and merges its segments when the transaction ends), then prefix
# and two-word searches with highlights, newest first, as the store runs them.
#
#   python3 bench/fts_merge.py
import os
import random
import sqlite3
import tempfile
import time

random.seed(2)
WORDS = [f"w{i}" for i in range(5000)] + "deploy deployment friday lunch later".split()
QUERIES = ['"deplo"*', '"w1"*', '"lunch" "friday"', '"w4999"', '"later" "w12"*']
TEXTS, BATCH = 400_000, 1024


def run(automerge, crisismerge):
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "t.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE VIRTUAL TABLE t USING fts5(body, columnsize=0, "
            "tokenize='unicode61 remove_diacritics 2')"
        )
        db.execute("INSERT INTO t (t, rank) VALUES ('automerge', ?)", (automerge,))
        db.execute("INSERT INTO t (t, rank) VALUES ('crisismerge', ?)", (crisismerge,))
        times = []
        for b in range(0, TEXTS, BATCH):
            rows = [(i + 1, " ".join(random.choice(WORDS) for _ in range(10)))
                    for i in range(b, b + BATCH)]
            started = time.perf_counter()
            db.execute("BEGIN")
            db.executemany("INSERT INTO t (rowid, body) VALUES (?, ?)", rows)
            db.execute("COMMIT")
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(20):
            for q in QUERIES:
                db.execute(
                    "SELECT rowid, highlight(t, 0, '[', ']') FROM t WHERE t MATCH ? "
                    "ORDER BY rowid DESC LIMIT 20", (q,)).fetchall()
        query = (time.perf_counter() - started) / (20 * len(QUERIES))
        times.sort()
        print(f"automerge {automerge:2d}, crisismerge {crisismerge:2d}: batch mean "
              f"{sum(times) / len(times) * 1e3:.2f} ms, p99 {times[len(times) * 99 // 100] * 1e3:.2f} ms, "
              f"max {times[-1] * 1e3:.1f} ms; search {query * 1e3:.2f} ms")


for _ in range(2):
    run(4, 16)  # FTS5's defaults
    run(16, 64)  # hubbub's (migration 15)
