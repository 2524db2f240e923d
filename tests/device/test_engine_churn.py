"""10,000 random add / plan+write / fork / free operations on a real cache: no block leaked or
doubly owned, and every live sequence still reads back exactly what was written."""

import random

import numpy as np

import kvcl
from kvcl.engine import PagedKVCache


def test_ten_thousand_random_operations(device):
    cache = PagedKVCache(1, 1, 4, num_blocks=48, block_size=4, dtype="fp16", device=device)
    rnd = random.Random(7)
    history: dict[int, list[np.ndarray]] = {}
    counter = 0
    ops = {"add": 0, "write": 0, "fork": 0, "free": 0, "out_of_blocks": 0}
    for i in range(10_000):
        live = list(history)
        op = rnd.choices(["add", "write", "fork", "free"], weights=[2, 6, 1, 2])[0]
        if op == "add" or not live:
            history[cache.add_sequence()] = []
            ops["add"] += 1
        elif op == "write":
            seqs = rnd.sample(live, k=min(len(live), rnd.randint(1, 3)))
            counts = [rnd.randint(1, 5) for _ in seqs]
            try:
                step = cache.plan(seqs, counts)
            except kvcl.OutOfBlocks:
                ops["out_of_blocks"] += 1          # a normal outcome: free something instead
                victim = rnd.choice(live)
                cache.free(victim)
                del history[victim]
                continue
            rows = []
            for n in counts:
                # small integers are exact in fp16, so reads compare with ==
                rows.append(np.arange(counter, counter + n, dtype=np.float32)[:, None, None] % 2048
                            * np.ones((1, 1, 4), np.float32))
                counter += n
            keys = np.concatenate(rows)
            cache.write(0, step, keys, -keys)
            for s, r in zip(seqs, rows):
                history[s].append(r)
            ops["write"] += 1
        elif op == "fork":
            parent = rnd.choice(live)
            history[cache.fork(parent)] = list(history[parent])
            ops["fork"] += 1
        else:
            victim = rnd.choice(live)
            cache.free(victim)
            del history[victim]
            ops["free"] += 1
        if i % 500 == 0:
            cache._book.check_invariants()
    cache._book.check_invariants()
    for s, rows in history.items():          # every live sequence reads back its own history
        k, v = cache.read(0, s)
        want = np.concatenate(rows) if rows else np.zeros((0, 1, 4), np.float32)
        np.testing.assert_array_equal(k, want)
        np.testing.assert_array_equal(v, -want)
    for s in list(history):
        cache.free(s)
    cache._book.check_invariants()
    assert cache.num_free_blocks == cache.num_blocks
    assert min(ops.values()) > 0, ops
