"""compile_model=True: the recorder's hooks stay out of torch.compile's graphs (no recompile per step).

lerobot's ``compile_model`` does ``self.sample_actions = torch.compile(self.sample_actions, mode=...)``.
Hooks only meet dynamo, the tracer that would recompile (or fail) on a Python side effect inside the
graph; inductor's code generation plays no part in that and costs minutes on this CPU, so the test
compiles the same function the same way with dynamo's ``eager`` backend.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.lerobot

torch = pytest.importorskip("torch")
pytest.importorskip("lerobot")

from attnstore.capture import AttentionRecorder  # noqa: E402
from attnstore.capture.tiny import TinyDims, build_tiny_policy, example_model_batch, tiny_config  # noqa: E402
from attnstore.store.open import open_attention  # noqa: E402
from attnstore.store.writer import AttentionWriter  # noqa: E402


def test_compiled_sample_actions_records_without_recompiling(tmp_path):
    import torch._dynamo
    import torch._dynamo.utils as dynamo_utils

    dims = TinyDims(depth=2)
    compiled = build_tiny_policy(tiny_config(dims=dims), seed=0, dims=dims)
    eager = build_tiny_policy(tiny_config(dims=dims), seed=0, dims=dims)
    compiled.model.sample_actions = torch.compile(compiled.model.sample_actions, backend="eager")
    batch = example_model_batch()
    torch._dynamo.reset()
    dynamo_utils.counters.clear()

    with AttentionWriter(tmp_path / "a.zarr") as writer, AttentionRecorder(compiled, writer, layers="all") as rec:
        for i in range(3):
            torch.manual_seed(i)
            got = compiled.predict_action_chunk(batch)
            torch.manual_seed(i)
            want = eager.predict_action_chunk(batch)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sum(dynamo_utils.counters["recompiles"].values()) == 0
    # the hooks ran outside the graphs (dynamo skipped them), not traced into them
    skipped = " ".join(dynamo_utils.counters["graph_break"])
    assert "_make_expert_hook" in skipped and "_on_denoise_step" in skipped
    assert rec.inferences == 3

    ds = open_attention(tmp_path / "a.zarr")
    assert ds.sizes["inference"] == 3
    attention = ds.attention.values
    valid = ds.key_valid.values[:, None, None, None, None, :]
    assert np.abs(np.where(valid, attention, 0).sum(-1) - 1).max() < 1e-3  # uint16 rounding over ~600 keys
    assert (attention[~np.broadcast_to(valid, attention.shape)] == 0).all()
