"""A checkpoint from a partner is data, never code: RNG state is tensors, trainer state is JSON,
and a file replaced by a pickle that would run code is refused without running it."""

from __future__ import annotations

import io
import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import catalog, manifest, storage
from orchestrator.checkpoint.distributed import Checkpointer
from orchestrator.checkpoint.manifest import CheckpointInvalid
from orchestrator.checkpoint.rng import capture_rng, restore_rng, rng_from_bytes, rng_to_bytes
from tests.unit.single_rank import one_rank, storage_root, tiny_model

REPO = Path(__file__).resolve().parents[2]


class WritesMarker:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def hostile_payloads(marker: Path) -> dict[str, bytes]:
    """A plain pickle and a torch.save zip, each of which runs code when fully unpickled."""
    buf = io.BytesIO()
    torch.save({"torch": WritesMarker(marker)}, buf)
    return {"pickle": pickle.dumps(WritesMarker(marker)), "torch.save": buf.getvalue()}


def test_the_payloads_would_run_code(tmp_path):
    # Without this the tests below could pass with a harmless payload.
    control = tmp_path / "control"
    payloads = hostile_payloads(control)
    pickle.loads(payloads["pickle"])
    assert control.read_text() == "ran"
    control.unlink()
    torch.load(io.BytesIO(payloads["torch.save"]), weights_only=False)
    assert control.read_text() == "ran"


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
    )


def test_rng_round_trip_through_bytes_is_exact():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in Python's state
    np.random.standard_normal()  # and one in numpy's (odd count: has_gauss=1)
    data = rng_to_bytes(capture_rng())
    expected = draws()
    draws()  # move every generator on
    restore_rng(rng_from_bytes(data))
    assert draws() == expected


def test_rng_file_of_the_earlier_format_is_refused():
    # What the previous format wrote: numpy arrays and tuples, loadable only by full unpickling.
    old = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(old, buf)
    with pytest.raises(ValueError, match="is not a tensor-only RNG file"):
        rng_from_bytes(buf.getvalue())


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda s: s.pop("torch"), "torch"),
        (lambda s: s.update(python_state=torch.zeros(3, dtype=torch.int64)), "python_state"),
        (lambda s: s.update(numpy_keys=torch.full((624,), -1, dtype=torch.int64)), "32 bits"),
        (lambda s: s.update(format="other"), "has format"),
    ],
)
def test_malformed_rng_state_is_refused(mutate, why):
    state = capture_rng()
    mutate(state)
    with pytest.raises(ValueError, match=why):
        rng_from_bytes(rng_to_bytes(state))


def _saved_checkpoint(url: str) -> tuple[Checkpointer, torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = tiny_model()
    ckpt = Checkpointer(url, keep=2)
    ckpt.save(4, model, optimizer, {"tokens_seen": 40})
    return ckpt, model, optimizer


def _replace_as_a_partner_would(url: str, step: int, rel: str, data: bytes) -> None:
    """Swap one file and rewrite the manifest to match: a hostile store's manifest proves nothing."""
    fs, root = storage.open_root(url)
    path = catalog.step_dir(root, step)
    fs.pipe_file(storage.join(path, rel), data)
    manifest.build_manifest(fs, path, meta={"step": step})
    manifest.verify(fs, path, check_hashes=True)  # it verifies: only the loader can refuse it


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_checkpoint_loads_and_restores_rng(tmp_path, kind):
    with one_rank(tmp_path), storage_root(kind, tmp_path) as url:
        ckpt, model, optimizer = _saved_checkpoint(url)
        assert ckpt.read_state(4)["tokens_seen"] == 40
        assert ckpt.load(4, model, optimizer) is True
        ckpt.close()


@pytest.mark.parametrize("payload", ["pickle", "torch.save"])
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_rng_file_that_would_run_code_is_refused(tmp_path, kind, payload):
    marker = tmp_path / "marker"
    with one_rank(tmp_path), storage_root(kind, tmp_path) as url:
        ckpt, model, optimizer = _saved_checkpoint(url)
        rel = "rng/rank-00000.pt"
        _replace_as_a_partner_would(url, 4, rel, hostile_payloads(marker)[payload])
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(CheckpointInvalid) as refused:
            ckpt.load(4, model, optimizer)
        ckpt.close()
    assert not marker.exists(), "the checkpoint ran code"
    assert refused.value.file == rel
    assert str(refused.value).startswith(f"step-000000004: {rel} is not a tensor-only RNG file")
    # Refused before any tensor was loaded.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_trainer_state_that_would_run_code_is_refused(tmp_path, kind):
    marker = tmp_path / "marker"
    with one_rank(tmp_path), storage_root(kind, tmp_path) as url:
        ckpt, _, _ = _saved_checkpoint(url)
        payload = hostile_payloads(marker)["pickle"]
        _replace_as_a_partner_would(url, 4, "trainer_state.json", payload)
        with pytest.raises(CheckpointInvalid, match="trainer_state.json is not JSON"):
            ckpt.read_state(4)
        ckpt.close()
    assert not marker.exists()


@pytest.mark.parametrize(
    "state, why",
    [
        ([1, 2], "is not a JSON object"),
        ({"step": 4}, "has no integer 'world_size'"),
        ({"step": True, "world_size": 1}, "has no integer 'step'"),
        ({"step": 5, "world_size": 1}, "is the state of step 5"),
    ],
)
def test_malformed_trainer_state_is_refused(tmp_path, state, why):
    with one_rank(tmp_path), storage_root("local", tmp_path) as url:
        ckpt, _, _ = _saved_checkpoint(url)
        _replace_as_a_partner_would(url, 4, "trainer_state.json", json.dumps(state).encode())
        with pytest.raises(CheckpointInvalid, match=re.escape(why)):
            ckpt.read_state(4)
        ckpt.close()


def _scheduler():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_a_scheduler_state_is_accepted_only_with_exactly_its_own_keys(tmp_path):
    scheduler = _scheduler()
    scheduler.optimizer.step()
    scheduler.step()
    with one_rank(tmp_path), storage_root("local", tmp_path) as url:
        model, optimizer = tiny_model()
        ckpt = Checkpointer(url, keep=2)
        ckpt.save(4, model, optimizer, {"scheduler": scheduler.state_dict()})
        saved = ckpt.read_state(4, expect={"scheduler": dict})["scheduler"]
        fresh = _scheduler()
        ckpt.check_like(4, "scheduler", saved, fresh.state_dict())
        fresh.load_state_dict(saved)
        assert fresh.state_dict() == scheduler.state_dict()
        # LambdaLR.load_state_dict would copy any key onto the scheduler object.
        for forged, odd in (
            ({**saved, "optimizer": {}}, "optimizer"),
            ({**saved, "last_epoch": "1"}, "last_epoch"),
        ):
            with pytest.raises(CheckpointInvalid, match=f"unexpected keys \\['{odd}'\\]"):
                ckpt.check_like(4, "scheduler", forged, fresh.state_dict())
        with pytest.raises(CheckpointInvalid, match="has no object 'scheduler'"):
            ckpt.check_like(4, "scheduler", [1], fresh.state_dict())
        ckpt.close()


def test_the_trainer_state_types_a_resume_expects(tmp_path):
    with one_rank(tmp_path), storage_root("local", tmp_path) as url:
        model, optimizer = tiny_model()
        ckpt = Checkpointer(url, keep=2)
        ckpt.save(4, model, optimizer, {"tokens_seen": "8", "run_id": "abc", "flag": True})
        assert ckpt.read_state(4, expect={"run_id": str, "flag": bool})["run_id"] == "abc"
        with pytest.raises(CheckpointInvalid, match="trainer_state.json has no int 'tokens_seen'"):
            ckpt.read_state(4, expect={"tokens_seen": int})
        with pytest.raises(CheckpointInvalid, match="has no int 'flag'"):
            ckpt.read_state(4, expect={"flag": int})  # a JSON true is no count
        ckpt.close()


UNSAFE = re.compile(
    r"weights_only\s*=\s*False|pickle\.loads?\(|^\s*(import|from)\s+(c?pickle|dill)\b"
)


def test_no_unpickling_in_checkpoint_or_recipe_code():
    sources = sorted((REPO / "orchestrator" / "checkpoint").rglob("*.py"))
    sources += sorted((REPO / "recipes").rglob("*.py"))
    assert len(sources) > 5
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if UNSAFE.search(line)
    ]
    assert found == []
    # Every torch.load there says weights_only=True.
    loads = [
        line
        for path in sources
        for line in path.read_text().splitlines()
        if "torch.load(" in line and not line.strip().startswith("#")
    ]
    assert loads and all("weights_only=True" in line for line in loads)
