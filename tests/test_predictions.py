import os

import pytest
import torch

from eenn import predictions
from eenn.errors import EENNError
from eenn.predictions import Predictions, check_compatible


def _preds(n=6, k=3, c=4, **kw):
    torch.manual_seed(0)
    return Predictions(
        logits=torch.randn(n, k, c),
        labels=torch.randint(0, c, (n,)),
        costs=torch.tensor([1.0, 2.0, 3.0][:k]),
        head_costs=torch.tensor([0.1, 0.1, 0.01][:k]),
        cost_table={"latency_ms": torch.tensor([0.5, 0.9, 1.2][:k])},
        split="val",
        **kw,
    )


def test_round_trip_keeps_everything(tmp_path):
    p = _preds(class_names=["a", "b", "c", "d"])
    p.save(tmp_path / "val.safetensors")
    q = Predictions.load(tmp_path / "val.safetensors")
    torch.testing.assert_close(q.logits, p.logits)
    torch.testing.assert_close(q.labels, p.labels)
    assert q.costs.dtype == torch.float64 and q.labels.dtype == torch.int64 and q.logits.dtype == torch.float32
    assert q.class_names == ["a", "b", "c", "d"] and q.exit_names == ["exit0", "exit1", "exit2"] and q.split == "val"
    torch.testing.assert_close(q.costs_in("latency_ms"), p.cost_table["latency_ms"])
    torch.testing.assert_close(q.head_costs_in("flops"), p.head_costs)
    torch.testing.assert_close(q.head_costs_in("latency_ms"), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(EENNError, match="cost unit 'joules' is not in the predictions file"):
        q.costs_in("joules")


def test_truncated_missing_and_nan_files_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    _preds().save(path)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(EENNError, match="not a readable safetensors file"):
        Predictions.load(tmp_path / "cut.safetensors")
    with pytest.raises(EENNError, match="does not exist"):
        Predictions.load(tmp_path / "nope.safetensors")
    bad = _preds()
    bad.logits[2, 1, 0] = float("nan")
    with pytest.raises(EENNError, match="NaN or Inf values in 1 of 6 samples"):
        bad.save(tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_val_and_test_must_match():
    with pytest.raises(EENNError, match="K=3 exits .* K=2"):
        check_compatible(_preds(), _preds(k=2))


def test_the_same_predictions_give_the_same_bytes(tmp_path):
    """safetensors writes its metadata in a random order; eenn's files do not differ for it."""
    p = _preds()
    files = [p.save(tmp_path / f"{i}.safetensors").read_bytes() for i in range(6)]
    assert all(f == files[0] for f in files)
    assert Predictions.load(tmp_path / "0.safetensors").exit_names == p.exit_names


def _resident_bytes(tensor: torch.Tensor) -> int:
    """Resident bytes of the memory mapping that holds ``tensor`` (from /proc/self/smaps)."""
    address, inside = tensor.data_ptr(), False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inside = lo <= address < hi
        elif inside and fields[0] == "Rss:":
            return int(fields[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_a_loaded_file_is_memory_mapped_and_row_block_passes_hand_pages_back(tmp_path, monkeypatch):
    monkeypatch.setattr(predictions, "BLOCK_BYTES", 2**16)
    p = _preds(n=2000, c=256)
    p.save(tmp_path / "big.safetensors")
    size = p.logits.numel() * 4  # 6 MB
    q = Predictions.load(tmp_path / "big.safetensors")
    assert q.mapping is not None
    assert _resident_bytes(q.logits) < 2**17  # loading validated every row, a block at a time
    q.validate()
    assert _resident_bytes(q.logits) < 2**17
    assert torch.equal(q.logits, p.logits)  # touching every row brings the whole file in ...
    assert _resident_bytes(q.logits) >= size
    q.release()  # ... and handing it back keeps the values
    assert _resident_bytes(q.logits) < 2**16  # the header, labels and costs stay
    assert torch.equal(q.logits, p.logits)
    blocks = list(q.row_blocks())
    assert torch.equal(torch.cat([b for _, b in blocks]), p.logits) and len(blocks) > 10


def test_predictions_in_memory_have_no_mapping_to_hand_back():
    p = _preds()
    p.release()  # a no-op
    assert p.mapping is None and torch.equal(p.logits, _preds().logits)
