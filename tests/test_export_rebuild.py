"""Rebuilding into an existing build directory: what is reused, what is refused (altered,
missing or edited artefacts and manifests) and made again, the directory's lock, and the
leftovers of dead processes.
"""

import json
import time

import pytest
from export_build import CONFIG

import atedm_compile as ac
from atedm_compile.export import BuildConfig, BuildPlan, ManifestError, build, load
from atedm_compile.export.manifest import MANIFEST, WEIGHTS
from atedm_compile.export.onnxruntime import CPU_CACHE


def test_second_build_reexports_nothing(built):
    directory, _, _ = built
    stamps = {p: p.stat().st_mtime_ns for p in directory.iterdir()}
    messages = []
    _, records = build(CONFIG, directory, log=messages.append)
    assert [r.name for r in records if r.ran] == ["manifest"]
    assert any("load model: skipped" in m for m in messages)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != MANIFEST)


def _alter(directory):
    graph = directory / "prune-less.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")


def test_altered_artefact_is_refused(copy_of):
    _alter(copy_of)
    with pytest.raises(ManifestError, match="prune-less.onnx was altered"):
        load(copy_of)
    with BuildPlan(CONFIG, copy_of, lambda _: None) as plan:
        assert {s.name: s.skip() is None for s in plan.stages() if s.name.startswith("export ONNX")} == {
            "export ONNX: prune-less": True, "export ONNX: pruned": False}


@pytest.mark.slow
def test_altered_artefact_is_rebuilt(copy_of):
    _alter(copy_of)
    _, records = build(CONFIG, copy_of, log=lambda _: None)
    ran = {r.name for r in records if r.ran}
    assert {"export ONNX: prune-less", "clean up: prune-less"} <= ran
    assert "export ONNX: pruned" not in ran
    load(copy_of)


def test_missing_artefact_is_refused(copy_of):
    (copy_of / WEIGHTS).unlink()
    with pytest.raises(ManifestError, match="weights.bin is missing"):
        load(copy_of)


def test_other_format_version_is_refused_and_rebuilt(copy_of):
    data = json.loads((copy_of / MANIFEST).read_text())
    data["format_version"] = 99
    (copy_of / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format version 99.*reads version 2"):
        load(copy_of)
    messages = []
    with BuildPlan(CONFIG, copy_of, messages.append) as plan:
        exports = [s for s in plan.stages() if s.name.startswith("export ONNX")]
        assert exports and all(s.skip() is None for s in exports)
    assert any("not reused" in m for m in messages)


def test_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and was not made by atedm-compile"):
        build(CONFIG, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _edit(directory, change, reseal=False):
    """Edit manifest.json with ``change(data)``; with ``reseal``, as a forger would, seal it again."""
    from atedm_compile.export.manifest import seal

    data = json.loads((directory / MANIFEST).read_text())
    change(data)
    if reseal:
        data["seal"] = seal(data)
    (directory / MANIFEST).write_text(json.dumps(data))


def _swap_graphs(data):
    first, second = data["phases"]
    first["onnx"], second["onnx"] = second["onnx"], first["onnx"]
    first["lint"], second["lint"] = second["lint"], first["lint"]


def _move_boundary(data):
    data["phases"][0]["stop"] = data["phases"][1]["start"] = 2


def _more_steps(data):
    data["schedule"]["num_steps"] = 5
    data["phases"][1]["stop"] = 5


def _drop_prune_less(data):
    data["phases"] = data["phases"][1:]
    data["phases"][0]["start"] = 0


def _keep_more(data):  # settings and rules edited consistently: only the export keys can tell
    data["schedule"]["options"]["keep_ratio"] = 0.5
    for phase in data["phases"]:
        phase["rules"] = [[selector, 0.5 if keep == 0.37 else keep] for selector, keep in phase["rules"]]


@pytest.mark.parametrize("change, message", [
    (_swap_graphs, "edited after the build"),
    (_move_boundary, r"phase 'prune-less' covers steps 0-1, but schedule 'atedm' for 4 steps gives it steps 0-0"),
    (_more_steps, "phase 'prune-less' covers steps 0-0, but schedule 'atedm' for 5 steps gives it steps 0-1"),
    (_drop_prune_less, r"phase 'prune-less' \(steps 0-0 of schedule 'atedm' for 4 steps\) is missing"),
    (lambda data: data.update(batch="2"), 'batch is "2", expected an integer'),
    (lambda data: data["phases"][0].update(start=None), "phases.0.start is null, expected an integer"),
    (lambda data: data.pop("weights_index"), "weights_index is missing"),
    (lambda data: data["phases"][0].update(speed=2), "malformed: .*unexpected keyword argument 'speed'"),
])
def test_an_edited_manifest_is_refused_by_load_and_check_and_rebuilt(copy_of, change, message):
    _edit(copy_of, change)
    with pytest.raises(ManifestError, match=message):
        load(copy_of)
    with pytest.raises(ManifestError, match=message):
        ac.export.check(copy_of, log=lambda _: None)
    messages = []
    with BuildPlan(CONFIG, copy_of, messages.append) as plan:
        pass
    assert any(m.startswith("previous manifest not reused") for m in messages)
    exports = [s for s in plan.stages() if s.name.startswith("export ONNX")]
    assert exports and all(s.skip() is None for s in exports)  # not "up to date": exported again


@pytest.mark.parametrize("change, message", [
    (_swap_graphs, "is the graph of phase 'pruned'.*lists it for phase 'prune-less'"),
    (_move_boundary, "covers steps 0-1, but schedule 'atedm' for 4 steps gives it steps 0-0"),
    (_keep_more, "the export key of phase 'prune-less' does not follow from the recorded settings"),
])
def test_a_resealed_edit_is_still_caught(copy_of, change, message):
    _edit(copy_of, change, reseal=True)
    with pytest.raises(ManifestError, match=message):
        load(copy_of)


def test_a_second_build_into_the_same_directory_waits_for_the_first(copy_of):
    import threading

    from filelock import FileLock

    from atedm_compile.export.build import LOCK

    lock = FileLock(copy_of / LOCK)
    lock.acquire()
    messages, done = [], threading.Event()
    thread = threading.Thread(target=lambda: (build(CONFIG, copy_of, log=messages.append), done.set()))
    thread.start()
    try:
        assert not done.wait(3.0)  # held up by the lock
        assert any("locked by another build: waiting" in m for m in messages)
    finally:
        lock.release()
    thread.join(60)
    assert done.is_set() and any("manifest: done" in m for m in messages)
    load(copy_of)


OTHER_MODEL = BuildConfig(model="tiny-shapes", schedule="uniform", num_steps=1)  # one phase, "pruned"


def test_a_build_of_another_model_removes_every_artefact_of_the_old_one(copy_of):
    # The old model's phase graphs (and ONNX Runtime's optimised copies) stayed, and check passed.
    cache = copy_of / CPU_CACHE / "0123456789abcdef0123"
    cache.mkdir(parents=True)
    (cache / WEIGHTS).write_bytes(b"\0" * 1000)
    messages = []
    with BuildPlan(OTHER_MODEL, copy_of, messages.append):
        pass
    assert any("build settings changed" in m for m in messages)
    assert not any((copy_of / name).exists() for name in ("prune-less.onnx", "pruned.onnx", WEIGHTS, CPU_CACHE))


def test_a_build_of_another_model_that_waited_for_one_does_not_replace_it(copy_of):
    # Two builds of other models into one folder both exited 0: the second undid the first.
    import threading

    from filelock import FileLock

    from atedm_compile.export.build import LOCK

    before = {p.name: p.read_bytes() for p in copy_of.iterdir() if p.is_file() and p.name != LOCK}
    lock = FileLock(copy_of / LOCK)
    lock.acquire()  # the first build, still running
    errors, messages = [], []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(ValueError, build, OTHER_MODEL, copy_of,
                                                                         log=messages.append)))
    thread.start()
    try:
        for _ in range(600):  # until the second build waits for the lock
            if any("locked by another build: waiting" in m for m in messages):
                break
            time.sleep(0.1)
    finally:
        lock.release()
    thread.join(60)
    assert "another build, of other settings (model 'tiny'), finished there while this one waited; refusing to " \
           "replace it" in str(errors[0].value)
    assert {p.name: p.read_bytes() for p in copy_of.iterdir() if p.is_file() and p.name != LOCK} == before
    load(copy_of)


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_processes_are_removed_and_only_those(copy_of):
    import os

    from atedm_compile.files import temp_prefix

    dead, alive = _dead_pid(), os.getpid()
    leftovers, kept = [], []
    for pid, where in ((dead, leftovers), (alive, kept)):
        prefix = temp_prefix("x").replace(f"pid{os.getpid()}", f"pid{pid}")[len(".x"):]
        raw = copy_of / ".raw" / f".pruned-0123456789abcdef{prefix}tmp"
        raw.mkdir(parents=True)
        (raw / "model.onnx").write_bytes(b"\0" * 1000)
        part = copy_of / f".{WEIGHTS}{prefix}tmp.part"
        part.write_bytes(b"\0" * 1000)
        cache = copy_of / CPU_CACHE / f".0123456789abcdef0123{prefix}tmp"
        cache.mkdir(parents=True)
        where += [raw, part, cache]
    stale = copy_of / ".raw" / "pruned-0000000000000000"  # a finished export of settings no longer asked for
    stale.mkdir()
    messages = []
    build(CONFIG, copy_of, log=messages.append)
    load(copy_of)
    assert not any(p.exists() for p in leftovers + [stale])
    assert all(p.exists() for p in kept)
    assert sum("left by an interrupted build" in m for m in messages) == 2
