#!/usr/bin/env python3
"""Which tables' pages a commit of the SQLite store writes, counted in the write-ahead log.

Replays the writer's statements for direct messages (50 conversations, 100 senders, one
100-byte text each, client ids per sender in chunks of 128, search texts every 1,024
messages) on a database that a release build of hubbub created, reads the page number
of every frame each commit appends to the log, and maps pages to tables and indexes
with `dbstat`.

    cargo build --release
    python3 bench/wal_pages.py [MESSAGES_PER_COMMIT] [COMMITS] [--ids-with-texts]

Defaults: 60 messages per commit, 1,500 commits. `--ids-with-texts` writes the client
ids as schema version 12 did: all of them with the search texts, every 1,024 messages.
"""

import collections
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

PAGE = 4096
CHUNK = 128
TEXTS_EVERY = 1024


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    batch = int(args[0]) if args else 60
    commits = int(args[1]) if len(args) > 1 else 1500
    with_texts = "--ids-with-texts" in sys.argv
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as data:
        # Any store command creates the schema; this one adds an account.
        subprocess.run(
            [os.path.join(root, "target/release/hubbub"), "user", "add", "walbench",
             "--data-dir", data],
            input=b"a password of some length\n", check=True, capture_output=True)
        db = os.path.join(data, "hubbub.db")
        replay(db, batch, commits, with_texts)


def replay(db, batch, commits, ids_with_texts):
    import sqlite3

    c = sqlite3.connect(db, isolation_level=None)
    c.execute("pragma journal_mode=WAL")
    c.execute("pragma synchronous=FULL")
    c.execute("pragma wal_autocheckpoint=0")
    c.execute("pragma wal_checkpoint(TRUNCATE)")
    names = [f"b1234567c{i}" for i in range(100)]
    convs = [f"dm:{names[2 * p]}:{names[2 * p + 1]}" for p in range(50)]
    seqs, counts = collections.Counter(), collections.Counter()
    pending = collections.defaultdict(list)
    wal = db + "-wal"
    log, offset, indexed, newest, n = [], 32, 0, 0, 0
    started = time.time()
    for b in range(commits):
        c.execute("BEGIN IMMEDIATE")
        for _ in range(batch):
            s = n % 100
            n += 1
            conv = convs[s // 2]
            seqs[conv] += 1
            counts[s] += 1
            k = counts[s]
            text = f"~B{s}.{k}.{int(time.time() * 1e6)}~".ljust(100, "x")
            c.execute(
                "INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, "
                "content, ts, reply_to, mentions) VALUES (?, ?, ?, ?, ?, 'text', ?, ?, NULL, NULL)",
                (conv, seqs[conv], f"01J{n:023d}", names[s], f"m{k:012}", json.dumps(text),
                 int(time.time() * 1000)))
            newest = c.execute("SELECT last_insert_rowid()").fetchone()[0]
            pending[names[s]].append((f"m{k:012}", newest))
        chunk = CHUNK if not ids_with_texts else float("inf")
        if ids_with_texts and newest - indexed >= TEXTS_EVERY:
            chunk = 0
        for sender in [s for s, ids in pending.items() if len(ids) >= chunk]:
            c.executemany(
                "INSERT OR IGNORE INTO client_ids (sender, client_msg_id, id) VALUES (?, ?, ?)",
                [(sender, cid, i) for cid, i in sorted(pending.pop(sender))])
        if newest - indexed >= TEXTS_EVERY:
            c.execute(
                "INSERT INTO message_text (rowid, body) SELECT id, json_extract(content, '$') "
                "FROM messages WHERE id > ? AND id <= ?", (indexed, newest))
            indexed = newest
        c.execute("COMMIT")
        frames, offset = frames_since(wal, offset)
        log.append(frames)
        if (b + 1) % 16 == 0:
            c.execute("pragma wal_checkpoint(RESTART)")
            offset = 32
    elapsed = time.time() - started
    owner = dict((page, name) for name, page in c.execute("SELECT name, pageno FROM dbstat"))
    pages = collections.Counter(owner.get(p, "?") for frames in log for p in frames)
    total = sum(len(f) for f in log)
    print(f"{batch} messages per commit, {commits} commits: {total / commits:.1f} pages per "
          f"commit, {total / commits / batch:.2f} per message ({elapsed:.1f} s)")
    for name, count in pages.most_common():
        print(f"  {name:28s} {count / commits:7.1f} per commit")


def frames_since(wal, offset):
    """The page numbers of the log's frames from `offset` on, and the new offset."""
    pages = []
    with open(wal, "rb") as f:
        f.seek(offset)
        while True:
            header = f.read(24)
            if len(header) < 24:
                break
            pages.append(struct.unpack(">I", header[:4])[0])
            f.seek(PAGE, 1)
            offset += 24 + PAGE
    return pages, offset


if __name__ == "__main__":
    main()
