"""Test helper: what the recorder hands to the writer, as the writer reads it.

Shared by the capture tests of every policy (pi05, pi0, smolvla).
"""

from __future__ import annotations

import numpy as np


def spy_appends(writer) -> list[dict]:
    """Copies of every InferenceBatch the writer gets: times, episodes and keep at ``append``; attention and
    prefix attention after the batch's ``ready`` callback (on the CPU the writer thread fills them there,
    before encoding). Attention the recorder quantised already (uint16: the quantised encodings, on the held
    and device paths) is given as the writer stores it, bits / 65535 in float32, with ``quantised`` True;
    tests of the exact probabilities record with ``encoding="float32"``. Entries are complete once the
    writer has flushed or closed."""
    import torch

    seen: list[dict] = []
    original = writer.append

    def append(batch):
        entry = {
            "times": np.asarray(batch.times),
            "episodes": np.asarray(batch.episodes).copy(),
            "keep": np.ones(len(batch.episodes), bool) if batch.keep is None else np.asarray(batch.keep).copy(),
        }
        ready = batch.ready

        def snapshot():
            if ready is not None:
                ready()
            attention = torch.as_tensor(batch.attention)
            entry["quantised"] = attention.dtype == torch.uint16
            entry["attention"] = attention.float() / 65535 if entry["quantised"] else attention.clone()
            entry["prefix"] = None if batch.prefix_attention is None else torch.as_tensor(batch.prefix_attention).clone()

        seen.append(entry)
        batch.ready = snapshot
        return original(batch)

    writer.append = append
    return seen
