import logging
import os
import threading

import numpy as np
import pytest

from lcpn.embedding_store import EmbeddingStore

KEY = {"backbone": "efficientnet-lite0", "image_size": 32, "weights": "0123456789abcdef", "precision": "fp32"}


def rows(n: int, start: int = 0, dim: int = 6) -> tuple[list[str], np.ndarray]:
    ids = [f"{i:064x}:0" for i in range(start, start + n)]
    return ids, np.arange(start * dim, (start + n) * dim, dtype=np.float32).reshape(n, dim)


def files(store: EmbeddingStore) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in store.folder.iterdir()}


def test_a_store_reopens_with_every_shard(tmp_path):
    store = EmbeddingStore(tmp_path, KEY)
    for start in (0, 5):
        store.add(*rows(5, start))
    again = EmbeddingStore(tmp_path, KEY)
    ids, expected = rows(10)
    assert len(again) == 10 and all(i in again for i in ids)
    assert np.array_equal(np.stack([again[i] for i in ids]), expected)
    assert isinstance(again[ids[0]].base, np.memmap)  # read from the disk as needed, not loaded up front
    assert EmbeddingStore(tmp_path, {**KEY, "precision": "bf16"}).folder != store.folder
    assert len(EmbeddingStore(tmp_path, {**KEY, "precision": "bf16"})) == 0


def test_adding_a_chunk_writes_only_that_chunk(tmp_path):
    store = EmbeddingStore(tmp_path, KEY)
    for start in range(0, 40, 10):
        store.add(*rows(10, start))
    before = files(store)
    store.add(*rows(10, 40))
    after = files(store)
    assert {name: after[name] for name in before} == before  # nothing rewritten
    new = {name: size for name, (_, _, size) in after.items() if name not in before}
    assert sorted(name.rsplit(".", 1)[1] for name in new) == ["json", "npy"]
    matrix_bytes = 10 * 6 * 4
    assert sum(new.values()) < matrix_bytes + 2_000  # the chunk, its ids and a header; not the 50 rows stored


def test_concurrent_writers_keep_each_others_work(tmp_path):
    barrier = threading.Barrier(2)

    def write(start: int) -> None:
        store = EmbeddingStore(tmp_path, KEY)  # each writer opens the store before the other wrote anything
        barrier.wait()
        for chunk in range(5):
            store.add(*rows(4, start + 4 * chunk))

    threads = [threading.Thread(target=write, args=(start,)) for start in (0, 100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = EmbeddingStore(tmp_path, KEY)
    assert len(store) == 40
    for start in (0, 100):
        ids, expected = rows(20, start)
        assert np.array_equal(np.stack([store[i] for i in ids]), expected)


def test_a_duplicate_id_in_two_shards_is_harmless(tmp_path):
    store = EmbeddingStore(tmp_path, KEY)
    store.add(*rows(3))
    store.add(*rows(3, 1))
    again = EmbeddingStore(tmp_path, KEY)
    ids, expected = rows(4)
    assert len(again) == 4 and np.array_equal(np.stack([again[i] for i in ids]), expected)


def damage_npy_data(npy, _index):
    data = bytearray(npy.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern inside the matrix: the header still reads
    npy.write_bytes(bytes(data))


def truncate_npy(npy, _index):
    npy.write_bytes(npy.read_bytes()[:-8])


def garble_index(_npy, index):
    index.write_text('{"ids": ["a", ')


def lose_npy(npy, _index):
    npy.unlink()


@pytest.mark.parametrize("damage", [damage_npy_data, truncate_npy, garble_index, lose_npy])
def test_a_damaged_shard_is_ignored_and_removed(tmp_path, caplog, damage):
    store = EmbeddingStore(tmp_path, KEY)
    store.add(*rows(4))
    store.add(*rows(4, 4))
    damaged_ids = rows(4, 4)[0]
    index = next(p for p in store.folder.glob("shard-*.json") if damaged_ids[0] in p.read_text())
    damage(index.with_suffix(".npy"), index)
    with caplog.at_level(logging.WARNING):
        again = EmbeddingStore(tmp_path, KEY)
    assert "damaged embedding shard" in caplog.text
    assert len(again) == 4 and not any(i in again for i in damaged_ids)
    assert not index.exists() and not index.with_suffix(".npy").exists()


def test_leftovers_of_a_killed_writer_are_removed_once_stale(tmp_path):
    store = EmbeddingStore(tmp_path, KEY)
    store.add(*rows(2))
    temp = store.folder / ".shard-x.npy.1234.tmp"
    orphan = store.folder / "shard-orphan.npy"  # killed between the matrix and its index
    fresh = store.folder / ".shard-y.npy.5678.tmp"  # another writer's file in flight
    for path in (temp, orphan, fresh):
        path.write_bytes(b"x" * 100)
    for path in (temp, orphan):
        os.utime(path, (1, 1))
    EmbeddingStore(tmp_path, KEY)
    assert not temp.exists() and not orphan.exists() and fresh.exists()
    assert len(EmbeddingStore(tmp_path, KEY)) == 2
