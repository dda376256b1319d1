"""hierfed.runtime.checkpoint (atomic cloud checkpoints) and hierfed.model.FlatView, on a tiny real model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hierfed.config import ModelConfig, PeftConfig
from hierfed.errors import HierfedError
from hierfed.model import FlatView, build_model
from hierfed.runtime.checkpoint import Checkpoints, State

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def tiny():
    built = build_model(ModelConfig(source="gpt2", size="tiny"), PeftConfig(), kind="classification", num_labels=4, seed=0)
    return built.model, FlatView(built.model)


def state(flat: FlatView, round_: int) -> State:
    rng = np.random.default_rng(round_)
    return State(
        round=round_,
        params=rng.normal(size=flat.dim),  # float64: the cloud's master copy
        cloud_state={"velocity": rng.normal(size=flat.dim)},
    )


def save_two(tmp_path, tiny, keep: int = 1) -> tuple[Checkpoints, State]:
    model, flat = tiny
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=keep)
    meta = {"fingerprint": flat.fingerprint(), "seed": 0}
    ckpts.save(state(flat, 1), model, flat, meta)
    newest = state(flat, 2)
    path = ckpts.save(newest, model, flat, meta)  # as the cloud does: round 2 is written before round 1 is confirmed
    ckpts.confirm(1)
    ckpts.confirm(2)
    assert path == ckpts.root / "round-0002"
    return ckpts, newest


def test_keep_one_leaves_only_the_newest(tmp_path, tiny) -> None:
    ckpts, _ = save_two(tmp_path, tiny, keep=1)
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["latest", "round-0002"]
    assert (ckpts.root / "latest").read_text().strip() == "round-0002"
    assert ckpts.latest() == ckpts.root / "round-0002"
    assert (ckpts.root / "round-0002" / "adapter_model.safetensors").is_file()


def test_latest_moves_only_when_every_rank_has_saved_the_round(tmp_path, tiny) -> None:
    """A checkpoint the cloud wrote while the other ranks may still be saving theirs is not
    `latest` yet; once confirmed it is, and pruning (keep=1) spares the newer unconfirmed one."""
    model, flat = tiny
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=1)
    meta = {"fingerprint": flat.fingerprint(), "seed": 0}
    ckpts.save(state(flat, 1), model, flat, meta)
    assert ckpts.latest() is None  # a crash now: nothing to resume from rather than a half-saved round
    ckpts.confirm(1)
    ckpts.save(state(flat, 2), model, flat, meta)
    assert ckpts.latest() == ckpts.root / "round-0001"  # a crash now resumes from round 1, which every rank has
    assert ckpts.load_latest(flat.dim, flat.fingerprint()).round == 1
    ckpts.save(state(flat, 3), model, flat, meta)
    ckpts.confirm(2)
    assert sorted(p.name for p in ckpts.root.glob("round-*")) == ["round-0002", "round-0003"]
    with pytest.raises(HierfedError, match="never written"):
        ckpts.confirm(4)


def test_keep_two_keeps_both(tmp_path, tiny) -> None:
    ckpts, _ = save_two(tmp_path, tiny, keep=2)
    assert sorted(p.name for p in ckpts.root.glob("round-*")) == ["round-0001", "round-0002"]


def test_load_latest_is_exact(tmp_path, tiny) -> None:
    _, flat = tiny
    ckpts, saved = save_two(tmp_path, tiny)
    got = ckpts.load_latest(flat.dim, flat.fingerprint())
    assert got.round == 2
    assert got.params.dtype == np.float64
    np.testing.assert_array_equal(got.params, saved.params)
    assert got.cloud_state.keys() == {"velocity"}
    np.testing.assert_array_equal(got.cloud_state["velocity"], saved.cloud_state["velocity"])


def test_save_loads_params_into_the_model(tmp_path, tiny) -> None:
    _, flat = tiny
    _, saved = save_two(tmp_path, tiny)
    np.testing.assert_array_equal(flat.get(), saved.params.astype(np.float32))


def test_mismatched_model_is_refused(tmp_path, tiny) -> None:
    _, flat = tiny
    ckpts, _ = save_two(tmp_path, tiny)
    with pytest.raises(HierfedError, match="different model"):
        ckpts.load_latest(flat.dim + 1, flat.fingerprint())
    with pytest.raises(HierfedError, match="different model"):
        ckpts.load_latest(flat.dim, "0000000000000000")


def test_no_checkpoint(tmp_path) -> None:
    with pytest.raises(HierfedError, match="no checkpoint"):
        Checkpoints(tmp_path / "checkpoints", keep=1).load_latest(10, "x")


def test_leftover_tmp_dir_is_ignored(tmp_path, tiny) -> None:
    _, flat = tiny
    ckpts, saved = save_two(tmp_path, tiny)
    # A crash while writing round 5: its temporary directory is complete-looking but never renamed.
    crashed = ckpts.root / ".tmp-round-0005"
    shutil.copytree(ckpts.root / "round-0002", crashed)
    np.savez(crashed / "state.npz", params=np.zeros(flat.dim))
    (crashed / "state.json").write_text(f'{{"round": 5, "dim": {flat.dim}, "fingerprint": "{flat.fingerprint()}"}}')
    got = ckpts.load_latest(flat.dim, flat.fingerprint())
    assert got.round == 2
    np.testing.assert_array_equal(got.params, saved.params)


def test_flatview_round_trip(tiny) -> None:
    _, flat = tiny
    assert flat.dim == sum(flat.sizes) > 0
    original = flat.get()
    try:
        vec = np.arange(flat.dim, dtype=np.float32) / flat.dim
        flat.set(vec)
        np.testing.assert_array_equal(flat.get(), vec)
        out = np.empty(flat.dim, dtype=np.float32)
        assert flat.get(out) is out
        np.testing.assert_array_equal(out, vec)
        named = flat.state_dict(vec)
        assert [(n, tuple(t.shape)) for n, t in named.items()] == flat.manifest()
    finally:
        flat.set(original)


def test_flatview_rejects_wrong_length(tiny) -> None:
    _, flat = tiny
    before = flat.get()
    for n in (flat.dim - 1, flat.dim + 1):
        with pytest.raises(ValueError, match=f"{n} values"):
            flat.set(np.zeros(n, dtype=np.float32))
    np.testing.assert_array_equal(flat.get(), before)
