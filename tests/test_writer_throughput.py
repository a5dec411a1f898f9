"""The writer that keeps up: device-quantised hand-over, blosc threads, back-pressure made visible, the
disk budget, and the recorder's device path (CUDA by default, forced here on the CPU so every line runs).

Truth: the float32 probabilities, quantised by the writer's own ``schema.encoding.quantise``; a store written
through the fast paths must hold bit-identical integers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from attnstore.errors import EvalConfigError, SchemaError, WriterError
from attnstore.evaluation.budget import CapturePlan, check_disk, estimate, plan_from_config
from attnstore.schema.encoding import quantise
from attnstore.store import writer as W
from attnstore.store.open import open_attention
from attnstore.store.writer import AttentionWriter, InferenceBatch
from synthetic import make_spec, synthetic_batch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_writer.py"


def small_spec(encoding: str = "portable"):
    return make_spec(layers=(1, 3), num_layers=None, denoise_steps=(0, 1, 2), num_denoise_steps=3, encoding=encoding,
                     images=False, actions=False, language_tokens=False, num_language=6, num_action=5, grid=4,
                     num_heads=2)


def stored_attention(path: Path) -> np.ndarray:
    return zarr.open_array(str(path / "attention"), mode="r")[:]


# ---- the writer ------------------------------------------------------------------------------------------
def test_uint16_handover_stores_the_same_integers_as_float(tmp_path):
    spec = small_spec()
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(spec, rng, [0, 1], [10 * k, 10 * k], keep=[True, k != 1]) for k in range(3)]
    with AttentionWriter(tmp_path / "f.zarr", spec) as writer:
        for b in batches:
            writer.append(b)
    with AttentionWriter(tmp_path / "u.zarr", spec, encode_threads=2) as writer:
        for b in batches:
            fast = InferenceBatch(b.episodes, b.env_steps, times=b.times, keep=b.keep, key_valid=b.key_valid,
                                  attention=quantise(np.array(b.attention, np.float32)))
            writer.append(fast)
        writer.flush()
        assert writer.stats.attention_bytes == 4 * 5 * np.prod(spec.attention_shape_per_inference)
    np.testing.assert_array_equal(stored_attention(tmp_path / "u.zarr"), stored_attention(tmp_path / "f.zarr"))
    ds = open_attention(tmp_path / "u.zarr")
    assert ds.sizes["inference"] == 5 and float(ds.attention.isel(inference=0).sum()) > 0


def test_uint16_into_an_exact_float32_store_is_refused(tmp_path):
    spec = small_spec("float32")
    b = synthetic_batch(spec, np.random.default_rng(0), [0], [0])
    with AttentionWriter(tmp_path / "a.zarr", spec) as writer:
        with pytest.raises(SchemaError, match="already quantised"):
            writer.append(InferenceBatch(b.episodes, b.env_steps, key_valid=b.key_valid,
                                         attention=quantise(np.array(b.attention, np.float32))))


def test_float_handover_is_not_modified(tmp_path):
    """The writer quantises in place on its own copy, never on the caller's array (every row kept)."""
    spec = small_spec()
    b = synthetic_batch(spec, np.random.default_rng(1), [0], [0])
    before = np.array(b.attention, copy=True)
    with AttentionWriter(tmp_path / "a.zarr", spec) as writer:
        writer.append(b)
    np.testing.assert_array_equal(b.attention, before)


def test_a_slow_writer_slows_the_caller_shows_it_and_drops_nothing(tmp_path, monkeypatch):
    spec = small_spec()
    original = W.AttentionWriter._write_batch

    def slow(self, batch):
        time.sleep(0.05)
        return original(self, batch)

    monkeypatch.setattr(W.AttentionWriter, "_write_batch", slow)
    monkeypatch.setattr(W, "PROGRESS_INTERVAL_S", 0.0)
    seen = []
    rng = np.random.default_rng(2)
    with AttentionWriter(tmp_path / "a.zarr", spec, max_queue=1, on_progress=lambda s: seen.append(s.postfix())) as w:
        for k in range(6):
            w.append(synthetic_batch(spec, rng, [0], [10 * k]))
        stats = w.stats
    assert stats.rows == 6 and open_attention(tmp_path / "a.zarr").sizes["inference"] == 6
    assert stats.waits >= 3 and stats.wait_seconds >= 0.1
    assert seen and seen[-1]["queue"].endswith("/1") and "waited" in seen[-1]
    assert stats.postfix(0)["queue"] == "0/1"


def test_blosc_threads_are_set_while_writing_and_restored(tmp_path):
    from numcodecs import blosc

    before = (blosc.use_threads, blosc.get_nthreads())
    spec = small_spec()
    with AttentionWriter(tmp_path / "a.zarr", spec, encode_threads=3) as writer:
        writer.append(synthetic_batch(spec, np.random.default_rng(3), [0], [0]))
        writer.flush()
        assert blosc.use_threads is True and blosc.get_nthreads() == 3
        with AttentionWriter(tmp_path / "b.zarr", spec, encode_threads=2):  # a second writer: the max
            assert blosc.get_nthreads() == 3
    assert (blosc.use_threads, blosc.get_nthreads()) == before
    with pytest.raises(WriterError, match="encode_threads"):
        AttentionWriter(tmp_path / "c.zarr", spec, encode_threads=0)


def test_writer_arrays_skip_the_fill_value_pass(tmp_path):
    spec = small_spec()
    with AttentionWriter(tmp_path / "a.zarr", spec) as writer:
        assert all(arr.config.write_empty_chunks for arr in writer._arrays.values())


# ---- the disk budget --------------------------------------------------------------------------------------
def test_budget_from_a_lerobot_config_and_the_refusal():
    from attnstore.evaluation.config import AttentionConfig

    policy = SimpleNamespace(num_inference_steps=10, chunk_size=50, n_action_steps=10, tokenizer_max_length=200,
                             image_features={f"observation.images.{c}": None for c in ("image", "image2", "empty_camera_0")})
    cfg = SimpleNamespace(policy=policy, env=SimpleNamespace(task="libero_object", episode_length=None),
                          eval=SimpleNamespace(n_episodes=10))
    plan = plan_from_config(cfg, AttentionConfig(layers="all"), depth=18, n_tasks=10)
    assert (plan.layers, plan.episodes, plan.keys, plan.cameras, plan.episode_length) == (18, 100, 1018, 2, 280)
    est = estimate(plan)
    assert round(est.raw_per_inference / 1e6) == 293 and est.inferences_per_episode == 28
    with pytest.raises(EvalConfigError, match="not enough free disk"):
        check_disk(est, free_bytes=est.minimum_total * 0.9)
    assert "warning" in check_disk(est, free_bytes=est.minimum_total * 1.1)
    few = plan_from_config(cfg, AttentionConfig(layers="last:2", episodes=[0, 3]), depth=18, n_tasks=10)
    assert few.episodes == 2 and estimate(few).expected_total < est.expected_total / 100


def test_budget_scales_with_what_is_stored():
    base = estimate(CapturePlan(layers=2))
    assert estimate(CapturePlan(layers=18)).raw_per_inference == pytest.approx(9 * base.raw_per_inference)
    assert estimate(CapturePlan(layers=2, encoding="compact")).expected_per_episode < base.expected_per_episode
    assert estimate(dataclasses.replace(CapturePlan(layers=2), episodes=10)).expected_total == pytest.approx(
        10 * base.expected_per_episode)


# ---- the recorder's device path (CUDA's default), on the CPU ---------------------------------------------------
torch = pytest.importorskip("torch")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_quantise_on_device_is_bit_identical_to_the_writer(device):
    from attnstore.capture.buffers import quantise_on_device

    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(300), size=(4, 7)).astype(np.float32)
    p[0, 0, :10] = 0.0
    p[1, 0, 0] = 1.0
    p[2, 0, 0] = 0.5 / 65535  # exactly half a step: rounds up, as the writer does
    bits, bad = quantise_on_device(torch.as_tensor(p).to(device))
    got = bits.cpu().view(torch.uint16).numpy()
    np.testing.assert_array_equal(got, quantise(p.copy()))
    assert not bad.any()
    p[3, 2, 5] = np.nan
    assert quantise_on_device(torch.as_tensor(p).to(device))[1].cpu().tolist() == [False, False, False, True]


def test_finite_flags_raise_the_writers_message():
    from attnstore.capture.buffers import check_finite_flags

    check_finite_flags(torch.tensor([False, False]), np.array([4, 5]), 30)
    with pytest.raises(SchemaError, match="env step 30 of episode 5 has non-finite"):
        check_finite_flags(torch.tensor([False, True]), np.array([4, 5]), 30)


@pytest.fixture(scope="module")
def tiny3():
    pytest.importorskip("lerobot")
    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config

    dims = TinyDims(depth=3)
    return build_tiny_policy(tiny_config(dims=dims), seed=0, dims=dims)


def record(policy, path: Path, *, staged, device="cpu", encoding="portable", layers="last:2", inference_mode=False,
           device_path=None):
    from attnstore.capture import AttentionRecorder
    from attnstore.capture.tiny import example_model_batch

    batch = {k: v.to(device) for k, v in example_model_batch(2).items()}
    batch["observation.language.attention_mask"][1, 10:] = False
    mode = torch.inference_mode() if inference_mode else torch.no_grad()  # lerobot-eval: inference_mode
    with AttentionWriter(path) as writer, AttentionRecorder(policy, writer, layers=layers, encoding=encoding) as rec:
        rec._stage_summaries, rec._device_path = staged, device_path
        with mode:
            policy.reset()
            torch.manual_seed(0)
            for _ in range(2 * policy.config.n_action_steps):
                policy.select_action(batch)
            rec.set_active([True, False])
            for _ in range(policy.config.n_action_steps):
                policy.select_action(batch)
    return rec


@pytest.mark.lerobot
@pytest.mark.parametrize("encoding", ["portable", "float32"])
def test_device_path_stores_what_the_cpu_path_stores(tiny3, tmp_path, encoding):
    record(tiny3, tmp_path / "cpu.zarr", staged=False, encoding=encoding)  # the per-hook path
    rec = record(tiny3, tmp_path / "dev.zarr", staged=True, device_path=True, encoding=encoding)  # CUDA's, on CPU
    assert rec._staging is not None and rec._staging.shape[2] == 3  # every layer staged: 2 stored, 3 summarised
    if encoding == "portable":
        assert rec._ring._buffers[0].attention.dtype == torch.int16  # quantised before the host copy
    cpu, dev = stored_attention(tmp_path / "cpu.zarr"), stored_attention(tmp_path / "dev.zarr")
    assert cpu.shape[0] == 5  # 2 + 2 + 1 kept rows
    np.testing.assert_array_equal(dev, cpu)
    a, b = open_attention(tmp_path / "cpu.zarr"), open_attention(tmp_path / "dev.zarr")
    for name in ("images", "actions"):
        np.testing.assert_array_equal(b[name].values, a[name].values, err_msg=name)
    for name in ("summary_region_mass", "summary_entropy", "summary_grid"):  # batched over layers or not
        np.testing.assert_allclose(b[name].values.astype(np.float32), a[name].values.astype(np.float32),
                                   rtol=2.0**-10, atol=1e-7, err_msg=name)


@pytest.mark.lerobot
def test_staged_path_under_inference_mode_as_lerobot_eval_runs_it(tiny3, tmp_path):
    """lerobot-eval wraps rollouts in torch.inference_mode(): the writer thread's deferred work must cope."""
    rec = record(tiny3, tmp_path / "a.zarr", staged=None, inference_mode=True)  # summaries on the writer thread
    # held: the writer thread quantises the references straight into the uint16 bits of the host buffer
    assert rec._ring._buffers[0].staging is not None and rec._ring._buffers[0].attention.dtype == torch.int16
    record(tiny3, tmp_path / "b.zarr", staged=False, inference_mode=True)
    record(tiny3, tmp_path / "c.zarr", staged=True, device_path=True, inference_mode=True)
    for other in ("b.zarr", "c.zarr"):
        np.testing.assert_array_equal(stored_attention(tmp_path / "a.zarr"), stored_attention(tmp_path / other))
    a, b = open_attention(tmp_path / "a.zarr"), open_attention(tmp_path / "b.zarr")
    assert a.sizes["inference"] == 5
    np.testing.assert_allclose(a.summary_entropy.values.astype(np.float32), b.summary_entropy.values.astype(np.float32),
                               rtol=2.0**-10, atol=1e-7)


@pytest.mark.lerobot
def test_the_writer_threads_torch_work_is_single_threaded_and_the_policys_is_not(tiny3, tmp_path, monkeypatch):
    """torch's OpenMP would give the writer thread a thread team of its own beside the policy's, which made
    GNU OpenMP stop spin-waiting and every later model run ~1.6x slower (capture/hooks.py serial_torch)."""
    from attnstore.capture import hooks

    before = torch.get_num_threads()
    seen = []
    real = hooks.put_summary

    def spy(*args):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args)

    monkeypatch.setattr(hooks, "put_summary", spy)
    record(tiny3, tmp_path / "a.zarr", staged=None, inference_mode=True)  # the held path: summaries on the writer
    assert seen and {name for name, _ in seen} == {"attnstore-writer"}
    assert {n for _, n in seen} == {1}
    assert torch.get_num_threads() == before  # the policy's thread keeps its own count


@pytest.mark.lerobot
@pytest.mark.parametrize("device_path", [False, True], ids=["held", "device"])
@pytest.mark.parametrize("keep_bad_row", [True, False])
def test_held_path_refuses_a_non_finite_row_it_stores(tiny3, tmp_path, keep_bad_row, device_path):
    """The held path quantises on the writer thread, the device path on the device: a NaN in a stored row is
    refused with the writer's message (nothing of that row written), a NaN in a row no longer recorded
    (finished env) is not."""
    from attnstore.capture import AttentionRecorder
    from attnstore.capture.policies import adapter_for
    from attnstore.capture.tiny import example_model_batch

    def poison(module, args, kwargs, output):  # runs before the recorder's hook (registered first)
        probs = output[1].clone()
        probs[1, 0, 0, 0] = float("nan")
        return output[0], probs

    handle = adapter_for(tiny3).register_expert_hook(2, poison)
    path = tmp_path / "nan.zarr"
    try:
        writer = AttentionWriter(path)
        with AttentionRecorder(tiny3, writer, layers="last:2") as rec, torch.inference_mode():
            rec._device_path = device_path
            tiny3.reset()
            rec.set_active([True, keep_bad_row])
            message = "env step 0 of episode 1 has non-finite"
            if keep_bad_row and device_path:  # on the CPU the device path checks its flags in the call itself
                with pytest.raises(SchemaError, match=message):
                    tiny3.select_action(example_model_batch(2))
                writer.close()
            elif keep_bad_row:  # the held path: on the writer thread, reported on the caller's next call
                tiny3.select_action(example_model_batch(2))
                with pytest.raises(WriterError, match=message):
                    writer.close()
            else:
                tiny3.select_action(example_model_batch(2))
                writer.close()
    finally:
        handle.remove()
    assert open_attention(path).sizes["inference"] == (0 if keep_bad_row else 1)


@pytest.mark.lerobot
def test_device_path_with_summaries_off_stages_the_stored_layers_only(tiny3, tmp_path):
    from attnstore.capture import AttentionRecorder
    from attnstore.capture.tiny import example_model_batch

    batch = example_model_batch(1)
    for staged in (False, True):
        with AttentionWriter(tmp_path / f"s{staged}.zarr") as writer, \
                AttentionRecorder(tiny3, writer, layers=[0, 2], summary=False) as rec:
            rec._stage_summaries, rec._device_path = staged, staged
            tiny3.reset()
            torch.manual_seed(0)
            tiny3.select_action(batch)
    np.testing.assert_array_equal(stored_attention(tmp_path / "sTrue.zarr"), stored_attention(tmp_path / "sFalse.zarr"))
    assert rec._staging.shape[2] == 2


@pytest.mark.lerobot
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_default_is_the_device_path(tmp_path):  # pragma: no cover - needs a GPU
    from attnstore.capture.tiny import TinyDims, build_tiny_policy, tiny_config

    dims = TinyDims(depth=3)
    config = tiny_config(dims=dims)
    config.device = "cuda"
    policy = build_tiny_policy(config, seed=0, dims=dims).to("cuda")
    rec = record(policy, tmp_path / "gpu.zarr", staged=None, device="cuda")
    assert rec._staging is not None and rec._staging.is_cuda
    assert rec._ring._buffers[0].attention.is_pinned()
    ds = open_attention(tmp_path / "gpu.zarr")
    np.testing.assert_allclose(ds.attention.sum("key").values, 1.0, atol=5e-3)


# ---- the benchmark's own checks ------------------------------------------------------------------------------
def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_writer", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_writer_runs_and_prints_every_variant(capsys):
    bench = _load_bench()
    assert bench.main(["--rows", "2", "--repeats", "1", "--cores", "1"]) == 0
    out = capsys.readouterr().out
    for name in bench.VARIANTS:
        assert name in out
    assert "1 core MB/s" in out


def test_bench_writer_refuses_bad_core_counts(capsys):
    with pytest.raises(SystemExit):
        _load_bench().main(["--cores", "99"])
    assert "--cores" in capsys.readouterr().err


def test_bench_variant_settings_restore_the_writer(tmp_path):
    bench = _load_bench()
    from attnstore import schema

    saved = (W.ARRAY_CONFIG, schema.attention_codecs)
    with bench.variant_settings("previous", 2) as threads:
        assert threads == 1 and W.ARRAY_CONFIG == {}
    with bench.variant_settings("+ blosc blocksize 1 MiB", 2):
        codecs = schema.attention_codecs("portable")
        assert codecs["compressors"][0].blocksize == 1 << 20
    assert (W.ARRAY_CONFIG, schema.attention_codecs) == saved
    assert threading.active_count() >= 1


def test_preflight_prints_refuses_and_warns(tmp_path):
    from attnstore.evaluation.budget import preflight_disk
    from attnstore.evaluation.config import AttentionConfig

    policy = SimpleNamespace(num_inference_steps=10, chunk_size=50, n_action_steps=10, tokenizer_max_length=200,
                             image_features={f"observation.images.{c}": None for c in ("image", "image2", "empty_camera_0")})
    cfg = SimpleNamespace(policy=policy, env=SimpleNamespace(task="libero_10", episode_length=None),
                          eval=SimpleNamespace(n_episodes=50))
    lines = []
    with pytest.raises(EvalConfigError, match="not enough free disk"):
        preflight_disk(cfg, AttentionConfig(layers="all"), tmp_path / "a.zarr", depth=18, n_tasks=10,
                       echo=lines.append, free=10**9)
    assert lines and "per episode on disk" in lines[0] and "(18 layers)" in lines[0]
    lines.clear()
    est = preflight_disk(cfg, AttentionConfig(layers="last:2"), tmp_path / "a.zarr", depth=18, n_tasks=1,
                         echo=lines.append, free=10**13)  # well under 1 GB an episode: no line
    assert est.plan.episode_length == 520 and not lines
