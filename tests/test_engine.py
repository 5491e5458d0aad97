"""Calibration on shards: a local 2-CPU Ray cluster gives the same ranges and the same quantized model bytes,
to the bit, as a run in this process; a worker that fails is retried, never dropped."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from ortq import AutoCalibrationConfig, QuantizationConfig, WeightOnlyConfig
from ortq.calibrators.activations import MomentsJob
from ortq.calibrators.collect import RangesJob
from ortq.calibrators.engine import LocalEngine, RayEngine, shards_of
from ortq.data import real_text
from ortq.errors import CalibrationDataError, ConfigError
from ortq.passes.plan import calibration_targets
from ortq.quantizer import ORTQuantizer


def _digest(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    data = path.parent / (path.name + ".data")
    if data.is_file():
        h.update(data.read_bytes())
    return h.hexdigest()


def test_shards_are_a_fixed_partition():
    batches = [{"x": np.full((1, 1), i)} for i in range(10)]
    shards = shards_of(batches, 4)
    assert [len(s) for s in shards] == [4, 4, 2]
    assert [int(b["x"][0, 0]) for s in shards for b in s] == list(range(10))
    with pytest.raises(CalibrationDataError):
        shards_of([], 4)
    with pytest.raises(ConfigError):
        shards_of(batches, 0)


class _SumJob:
    """A foldable job whose merge records how many partials it held at once."""

    foldable = True

    def __init__(self):
        self.widest = 0

    def open(self, model):
        return None

    def run(self, opened, batches):
        return np.array([float(b["x"][0, 0]) * 0.1 for b in batches])

    def merge(self, partials):
        self.widest = max(self.widest, len(partials))
        total = partials[0].copy()
        for p in partials[1:]:
            total = total + np.resize(p, total.shape)
        return total


def test_foldable_statistics_are_merged_as_they_come_bit_for_bit():
    """GPTQ's Hessians of every shard are not all held at once, and the sum is the same float bits."""
    batches = [{"x": np.full((1, 1), i)} for i in range(40)]
    job = _SumJob()
    folded = LocalEngine(shard_batches=4).run(job, None, batches)
    assert job.widest <= 2
    whole = _SumJob()
    assert np.array_equal(folded, whole.merge([whole.run(None, s) for s in shards_of(batches, 4)]))


def test_local_engine_equals_the_streaming_collector(tiny_bert_dir):
    """Shards merged in order give exactly the state of one stream over all batches (histograms too)."""
    config = AutoCalibrationConfig.percentiles(percentile=99.9, batch_size=8)
    text = real_text("calibration", 64)
    stream = ORTQuantizer.from_pretrained(tiny_bert_dir)
    ranges = stream.fit(text, config)
    sharded = ORTQuantizer.from_pretrained(tiny_bert_dir)
    assert sharded.fit(text, config, engine=LocalEngine(shard_batches=3)) == ranges
    assert sharded.calibration_state.num_samples == stream.calibration_state.num_samples == 64


def test_ray_extra_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'ortq\[ray\]'"):
        RayEngine()


def test_cli_ray_without_the_extra_is_one_line(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from ortq.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["quantize", str(tiny_bert_dir), "--output", str(tmp_path / "q"), "--ray", "auto"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: calibration on Ray needs the ray extra: pip install 'ortq[ray]'"]


ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'ortq[ray]')")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    yield
    ray.shutdown()


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_ray_ranges_and_model_bytes_are_bit_identical(cluster, tiny_bert_dir, tmp_path, method):
    config = getattr(AutoCalibrationConfig, method)(batch_size=8)
    qconfig = QuantizationConfig()
    text = real_text("calibration", 64)
    local = ORTQuantizer.from_pretrained(tiny_bert_dir)
    local_ranges = local.fit(text, config, quantization_config=qconfig)
    local_path = local.quantize(qconfig, tmp_path / "local")
    remote = ORTQuantizer.from_pretrained(tiny_bert_dir)
    remote_ranges = remote.fit(text, config, quantization_config=qconfig,
                               engine=RayEngine(num_workers=2, shard_batches=2))
    remote_path = remote.quantize(qconfig, tmp_path / "ray")
    assert remote_ranges == local_ranges  # TensorRange equality: every float bit and every count
    assert remote.calibration_state.num_samples == 64
    assert _digest(remote_path) == _digest(local_path)


def test_ray_gptq_hessians_and_int4_bytes_are_bit_identical(cluster, tiny_llama_dir, tmp_path):
    config = WeightOnlyConfig(bits=4, block_size=16, algorithm="gptq")
    text = real_text("calibration", 24)
    a = ORTQuantizer.from_pretrained(tiny_llama_dir).quantize(config, tmp_path / "local", calibration_data=text)
    b = ORTQuantizer.from_pretrained(tiny_llama_dir).quantize(config, tmp_path / "ray", calibration_data=text,
                                                               engine=RayEngine(num_workers=2, shard_batches=1))
    assert _digest(a) == _digest(b)


class _FailsOnce(RangesJob):
    """Raises (or kills its worker process) on the first shard it sees; a marker file remembers."""

    def __init__(self, *args, marker: str, die: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker, self.die = marker, die

    def run(self, opened, batches):
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text("failed once")
            if self.die:
                import os

                os._exit(1)
            raise RuntimeError("injected worker failure")
        return super().run(opened, batches)


@pytest.mark.parametrize("die", [False, True], ids=["raises", "dies"])
def test_a_failing_worker_is_retried_not_dropped(cluster, tiny_bert_dir, tmp_path, die):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    config = AutoCalibrationConfig.minmax(batch_size=8)
    feeds = list(q.batches(real_text("calibration", 48), batch_size=8))
    names = calibration_targets(q.model, QuantizationConfig())
    expected = LocalEngine().run(RangesJob(names, config), q.model, feeds)
    job = _FailsOnce(names, config, marker=str(tmp_path / "failed"), die=die)
    state = RayEngine(num_workers=2, shard_batches=1, max_retries=2).run(job, q.model, feeds)
    assert (tmp_path / "failed").exists()
    assert state.num_samples == 48 and state.num_batches == 6
    assert state.compute_ranges() == expected.compute_ranges()


def test_a_shard_that_keeps_failing_is_an_error(cluster, tiny_bert_dir):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    feeds = list(q.batches(real_text("calibration", 16), batch_size=8))

    class Broken(MomentsJob):
        def run(self, opened, batches):
            raise RuntimeError("always broken")

    with pytest.raises(CalibrationDataError, match="failed on Ray after 1 retries"):
        RayEngine(num_workers=1, max_retries=1).run(Broken([q.model.graph.inputs[0].name]), q.model, feeds)


def test_cli_quantize_on_ray_writes_the_same_model(cluster, tiny_bert_dir, tmp_path):
    from ortq.cli import main

    common = ["--quiet", "quantize", str(tiny_bert_dir), "--num-samples", "32", "--batch-size", "8"]
    assert main([*common, "--output", str(tmp_path / "local")]) == 0
    assert main([*common, "--output", str(tmp_path / "ray"), "--ray", "local", "--ray-workers", "2"]) == 0
    assert _digest(tmp_path / "ray" / "model.onnx") == _digest(tmp_path / "local" / "model.onnx")


def test_a_ray_dataset_calibrates_like_a_list(cluster, tiny_bert_dir):
    text = real_text("calibration", 32)
    config = AutoCalibrationConfig.minmax(batch_size=8)
    dataset = ray.data.from_items([{"text": t} for t in text])
    on_ray = ORTQuantizer.from_pretrained(tiny_bert_dir).fit(dataset, config, engine=RayEngine(num_workers=2))
    assert on_ray == ORTQuantizer.from_pretrained(tiny_bert_dir).fit(text, config)
