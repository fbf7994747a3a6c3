"""``axolotl_dskd.core.projector_io``, the projector files: only safetensors whose shapes fit the
pair are read (a pickle is never opened), checked again at validation, and a failed write leaves
the previous file whole."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from axolotl_dskd.core import projector_io
from axolotl_dskd.core.loss import Projectors
from axolotl_dskd.core.projector_io import META_NAME, WEIGHTS_NAME, load_projectors, save_projectors
from dskd_devkit.axolotl_runs import dskd_config, load_config, refusal

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


STUDENT_HIDDEN, TEACHER_HIDDEN = 64, 128  # the fixture's students and teacher


class RunsCodeWhenUnpickled:
    """What a malicious pickle does: unpickling it calls ``Path.write_text`` on a marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("name", ["projectors.bin", "projectors.pt", "projectors.pth", "pickled.safetensors"])
def test_pickled_projectors_are_refused_unopened(assets, tmp_path, name):
    """A pickle given as dskd_projectors (even one named .safetensors) stops validation with a
    message naming the key, and is never unpickled."""
    marker = tmp_path / "marker"
    payload = pickle.dumps({"t2s.weight": RunsCodeWhenUnpickled(marker)})
    file = tmp_path / name
    file.write_bytes(payload)

    message = refusal(dskd_config(assets, tmp_path, dskd_projectors=str(file)), tmp_path)
    assert "dskd_projectors" in message and str(file) in message, message
    with pytest.raises(ValueError, match="dskd_projectors"):
        load_projectors(Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN), file, key="dskd_projectors")
    assert not marker.exists()

    pickle.loads(payload)  # the file really is dangerous: unpickling it runs its code
    assert marker.exists()


def test_projectors_for_another_pair_are_refused_with_both_shapes(assets, tmp_path):
    """Projectors whose shapes do not fit the student/teacher pair stop validation (before any
    weights load) and the trainer's load, naming the key and both sets of shapes."""
    wrong = save_projectors(Projectors(STUDENT_HIDDEN, 2 * TEACHER_HIDDEN), tmp_path / "wrong", {})
    found = {"s2t.bias": (256,), "s2t.weight": (256, 64), "t2s.bias": (64,), "t2s.weight": (64, 256)}
    needed = {"s2t.bias": (128,), "s2t.weight": (128, 64), "t2s.bias": (64,), "t2s.weight": (64, 128)}

    message = refusal(dskd_config(assets, tmp_path, dskd_projectors=str(wrong)), tmp_path)
    assert "dskd_projectors" in message, message
    for shapes in (found, needed):
        for key, shape in shapes.items():
            assert f"'{key}': {shape}" in message, (key, message)

    with pytest.raises(ValueError) as info:
        load_projectors(Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN), wrong, key="dskd_projectors")
    assert (
        "dskd_projectors" in str(info.value)
        and str(found) in str(info.value)
        and str(needed) in str(info.value)
    )

    # same dimensions, other kind: CMA projectors (with a query) for a same-vocabulary pair
    cma = save_projectors(
        Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN, cross_tokenizer=True), tmp_path / "cma", {}
    )
    assert "query.weight" in refusal(dskd_config(assets, tmp_path, dskd_projectors=str(cma.parent)), tmp_path)


def test_projectors_that_fit_validate_and_load_exactly(assets, tmp_path):
    """The counterpart: a file (or its folder) for this pair validates and loads bit for bit;
    with dskd_method: vanilla_kd, which has no projectors, it is refused rather than ignored."""
    torch.manual_seed(0)
    saved = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    file = save_projectors(saved, tmp_path / "good", {"global_step": 3})
    for path in (file, file.parent):
        assert load_config(
            dskd_config(assets, tmp_path, dskd_projectors=str(path)), tmp_path
        ).dskd_projectors == str(path)
    loaded = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    load_projectors(loaded, file.parent, key="dskd_projectors")
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    message = refusal(
        dskd_config(assets, tmp_path, dskd_projectors=str(file), dskd_method="vanilla_kd"), tmp_path
    )
    assert "dskd_projectors" in message and "vanilla_kd" in message, message


def test_a_failed_projector_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """The disk fills up halfway through writing new projectors: the write fails loudly, the
    previous file is intact and still loads, and no partial or temporary file is left."""
    torch.manual_seed(0)
    old, new = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN), Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    save_projectors(old, tmp_path, {"global_step": 1})
    weights, meta = tmp_path / WEIGHTS_NAME, tmp_path / META_NAME
    before = weights.read_bytes(), meta.read_bytes()

    def disk_full_halfway(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(projector_io, "save_file", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_projectors(new, tmp_path, {"global_step": 2})

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, META_NAME])
    assert (weights.read_bytes(), meta.read_bytes()) == before
    restored = Projectors(STUDENT_HIDDEN, TEACHER_HIDDEN)
    load_projectors(restored, tmp_path, key="resume_from_checkpoint")
    assert torch.equal(restored.t2s.weight, old.t2s.weight)

    monkeypatch.undo()  # once the disk has room again, the new projectors replace the old
    save_projectors(new, tmp_path, {"global_step": 2})
    assert torch.equal(load_file(weights)["t2s.weight"], new.t2s.weight.detach())
    assert json.loads(meta.read_text())["global_step"] == 2
