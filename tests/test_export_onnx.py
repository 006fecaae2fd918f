"""Step-specialised ONNX export of the tiny SD-XL U-Net and its ONNX Runtime backend.

One build (4 steps, ``atedm`` preset: phases prune-less at step 0, pruned at steps 1-3) is shared
by every test here; tests that alter a build work on a copy.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

import atedm_compile as ac
from atedm_compile.export import BuildConfig, ManifestError, build, load
from atedm_compile.export.build import _Build
from atedm_compile.export.manifest import MANIFEST, WEIGHTS, read_manifest
from atedm_compile.export.onnxruntime import CPU_CACHE, OrtEngine, optimize_for_cpu
from atedm_compile.export.onnx import example_inputs, external_initializers
from atedm_compile.models import build_unet, tiny_sdxl_pipeline

STEPS = 4
CONFIG = BuildConfig(model="tiny", schedule="atedm", num_steps=STEPS)
PROMPT = dict(prompt="a red cube", height=256, width=256, output_type="np")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "tiny"
    manifest, records = build(CONFIG, directory, log=lambda _: None)
    return directory, manifest, records


@pytest.fixture(scope="module")
def pipe():
    """One tiny pipeline for the module (PyTorch sampling is the slow part); tests give back its U-Net."""
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def reference(pipe):
    """The PyTorch runner's image and (step, phase) calls for the build's step count."""
    runner = ac.apply(pipe, "atedm")
    try:
        return _sample(pipe), [(c.step, c.phase) for c in runner.calls]
    finally:
        ac.remove(pipe)


@pytest.fixture
def exported(built, pipe):
    """``make(**load_options)`` attaches a loaded build to the shared pipeline, detached after the test."""
    attached = []

    def make(**options):
        unet = load(built[0], **options).attach(pipe)
        attached.append(unet)
        return unet

    yield make
    for unet in attached:
        unet.detach(pipe)


@pytest.fixture
def copy_of(built, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(built[0], target)
    return target


def _sample(pipe, steps=STEPS, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(num_inference_steps=steps, generator=generator, **{**PROMPT, **kwargs}).images[0]


def test_both_phases_export_with_the_contract(built):
    directory, manifest, records = built
    assert [(p.name, p.start, p.stop) for p in manifest.phases] == [("prune-less", 0, 1), ("pruned", 1, STEPS)]
    assert all(r.ran for r in records if r.name.startswith("export ONNX"))
    for phase in manifest.phases:
        model = onnx.load(str(directory / phase.onnx.file), load_external_data=False)
        inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert inputs == {"sample": [2, 4, 32, 32], "timestep": [], "encoder_hidden_states": [2, 77, 64],
                          "text_embeds": [2, 32], "time_ids": [2, 6]}
        assert [o.name for o in model.graph.output] == ["latent"]
        assert phase.lint == phase.onnx.sha256  # checker and TensorRT lint passed
        ops = {n.op_type for n in model.graph.node}
        assert {"TopK", "GatherElements", "ScatterElements"} <= ops and "NonZero" not in ops
    data = json.loads((directory / MANIFEST).read_text())
    assert data["format_version"] == 2 and data["complete"] and data["tools"]["torch"]


def test_each_phase_graph_matches_its_pytorch_phase(built, pipe):
    directory, manifest, _ = built
    unet = load(directory)
    runner = ac.apply(pipe.unet, ac.make_schedule("atedm", STEPS))
    runner.start(STEPS)
    feed = example_inputs(manifest.phases[0].inputs, seed=3)
    outputs = {}
    try:
        for phase in manifest.phases:
            runner.use_phase(phase.name)
            with torch.no_grad():
                reference = pipe.unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"],
                                      added_cond_kwargs={"text_embeds": feed["text_embeds"],
                                                         "time_ids": feed["time_ids"]}).sample
            outputs[phase.name] = unet.engines[phase.name].infer(feed)["latent"]
            assert (outputs[phase.name] - reference).abs().max().item() <= 1e-4
    finally:
        ac.remove(pipe.unet)
    # The phases are different graphs: a test that compared one graph twice would not see this.
    assert (outputs["prune-less"] - outputs["pruned"]).abs().max().item() > 1e-3


def test_sampling_switches_sessions_at_the_manifest_boundaries(built, pipe, reference, exported):
    _, manifest, _ = built
    unet = exported()
    sessions = {name: 0 for name in unet.engines}
    for name, engine in unet.engines.items():
        infer = engine.infer

        def counted(feed, name=name, infer=infer):
            sessions[name] += 1
            return infer(feed)

        engine.infer = counted
    image = _sample(pipe)
    assert sessions == {p.name: p.stop - p.start for p in manifest.phases} == {"prune-less": 1, "pruned": 3}
    assert [(c.step, c.phase) for c in unet.calls] == reference[1]
    assert np.abs(image - reference[0]).max() <= 1e-4


def test_phases_store_weights_once(built):
    directory, manifest, _ = built
    param_bytes = sum(p.numel() * 4 for p in build_unet("tiny").parameters())
    weights = (directory / WEIGHTS).stat().st_size
    graphs = [directory / p.onnx.file for p in manifest.phases]
    # Every parameter is in weights.bin once (tied or folded copies may add a little, not a second set).
    assert param_bytes * 0.95 <= weights <= param_bytes * 1.05
    one_phase = weights + graphs[0].stat().st_size
    all_phases = weights + sum(g.stat().st_size for g in graphs)
    assert all_phases <= 1.1 * one_phase
    placements = []
    for graph in graphs:
        model = onnx.load(str(graph), load_external_data=False)
        places = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
                  if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {p["location"] for p in places.values()} == {WEIGHTS}
        placements.append(places)
    shared = placements[0].keys() & placements[1].keys()
    assert len(shared) >= 0.95 * len(placements[0])
    assert all(placements[0][name] == placements[1][name] for name in shared)
    # In memory: both sessions are handed the same mapped buffers, with or without the CPU cache.
    for cpu_cache in (True, False):
        unet = load(directory, cpu_cache=cpu_cache)
        first, second = unet.engines.values()
        assert first.shared is second.shared
        for engine in (first, second):
            names = set(external_initializers(onnx.load(str(engine.path), load_external_data=False)))
            assert names and names <= set(first.shared.values)


def test_cpu_cache_holds_each_optimised_weight_once_and_is_reused(built, tmp_path):
    directory, manifest, _ = built
    messages = []
    paths, shared = optimize_for_cpu(directory, manifest, cache=tmp_path / "cache", log=messages.append)
    assert len(messages) == 1 and set(paths) == {p.name for p in manifest.phases}
    graphs = [onnx.load(str(path), load_external_data=False) for path in paths.values()]
    ops = {n.domain for g in graphs for n in g.graph.node}
    assert "com.microsoft.nchwc" in ops or "com.microsoft" in ops  # ONNX Runtime's own fused / blocked ops
    names = [set(external_initializers(g)) for g in graphs]
    # The blocked convolution weights ONNX Runtime wrote for each phase are one set, on disk once.
    assert len(names[0] & names[1]) >= 0.95 * len(names[0])
    pooled = shared.path.stat().st_size
    assert sum(a.nbytes for a in shared.arrays.values()) <= pooled <= 1.05 * (directory / WEIGHTS).stat().st_size
    again, _ = optimize_for_cpu(directory, manifest, cache=tmp_path / "cache", log=messages.append)
    assert again == paths and len(messages) == 1  # a cache hit: nothing optimised again
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_an_altered_cpu_cache_is_made_again(built, tmp_path):
    directory, manifest, _ = built
    messages = []
    paths, shared = optimize_for_cpu(directory, manifest, cache=tmp_path / "cache", log=messages.append)
    feed = example_inputs(manifest.phases[0].inputs, seed=6)
    expected = OrtEngine(paths["pruned"], shared, optimized=True).infer(feed)["latent"]
    del shared
    pooled = paths["pruned"].parent / WEIGHTS
    data = bytearray(pooled.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pooled.write_bytes(bytes(data))
    paths, shared = optimize_for_cpu(directory, manifest, cache=tmp_path / "cache", log=messages.append)
    assert len(messages) == 3 and "altered or incomplete" in messages[1]
    again = OrtEngine(paths["pruned"], shared, optimized=True).infer(feed)["latent"]
    assert torch.equal(again, expected)


def test_cpu_cache_goes_to_the_user_cache_where_the_build_is_not_writable(copy_of, monkeypatch, tmp_path):
    manifest = read_manifest(copy_of)
    shutil.rmtree(copy_of / CPU_CACHE, ignore_errors=True)
    (copy_of / CPU_CACHE).write_text("not a folder")  # mkdir there fails, as in a read-only build
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    paths, _ = optimize_for_cpu(copy_of, manifest)
    assert all(str(path).startswith(str(tmp_path / "user" / "atedm-compile" / CPU_CACHE)) for path in paths.values())


def test_cpu_cache_matches_sessions_that_optimise_at_load(built):
    directory, manifest, _ = built
    feed = example_inputs(manifest.phases[0].inputs, seed=5)
    cached, plain = load(directory), load(directory, cpu_cache=False)
    for phase in manifest.phases:
        a = cached.engines[phase.name].infer(feed)["latent"]
        b = plain.engines[phase.name].infer(feed)["latent"]
        assert (a - b).abs().max().item() <= 1e-4


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
    job = _Build(CONFIG, copy_of, lambda _: None)
    assert {s.name: s.skip() is None for s in job.steps() if s.name.startswith("export ONNX")} == {
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
    job = _Build(CONFIG, copy_of, messages.append)
    assert any("not reused" in m for m in messages)
    exports = [s for s in job.steps() if s.name.startswith("export ONNX")]
    assert exports and all(s.skip() is None for s in exports)


def test_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and was not made by atedm-compile"):
        build(CONFIG, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("change, message", [
    (dict(steps=5), "5 sampling steps were asked for.*built for 4 steps"),
    (dict(height=128, width=128), r"sample \(2, 4, 16, 16\) \(expected \(2, 4, 32, 32\)\)"),
    (dict(guidance_scale=1.0), r"sample \(1, 4, 32, 32\) \(expected \(2, 4, 32, 32\)\).*batch 2"),
])
def test_mismatched_request_names_expected_and_given(pipe, exported, change, message):
    exported()
    with pytest.raises(ValueError, match=message):
        _sample(pipe, **change)


def test_opt_in_fallback_warns_and_runs_pytorch(pipe, exported):
    # 2 steps (the build has 4): the PyTorch runner's atedm schedule for 2 steps is 1 + 1.
    ac.apply(pipe, "atedm")
    reference = _sample(pipe, steps=2)
    ac.remove(pipe)
    unet = exported(fallback=pipe.unet, on_mismatch="fallback")
    with pytest.warns(UserWarning, match="2 sampling steps.*falling back to the PyTorch runner"):
        image = _sample(pipe, steps=2)
    assert [c.phase for c in unet.calls] == ["prune-less (pytorch)", "pruned (pytorch)"]
    assert np.array_equal(image, reference)
    ac.remove(unet.fallback)


def test_cli_check_and_run(built, tmp_path, capsys):
    from atedm_compile.cli import main

    assert main(["check", str(built[0])]) == 0
    out = capsys.readouterr().out
    assert "lint ok" in out and "TensorRT vs ONNX Runtime: skipped" in out and "check passed" in out
    assert main(["run", str(built[0]), "--steps", "5", "--out", str(tmp_path / "x.png")]) == 2
    assert "steps: built 4, given 5" in capsys.readouterr().err
    assert main(["run", str(built[0]), "--out", str(tmp_path / "image.png")]) == 0
    out = capsys.readouterr().out
    assert "prune-less: steps 0-0, 1 calls" in out and "pruned: steps 1-3, 3 calls" in out
    assert (tmp_path / "image.png").stat().st_size > 0


def test_a_scheduler_swapped_in_after_attach_is_followed(built, pipe, reference, exported):
    from diffusers import EulerDiscreteScheduler

    unet = exported()
    old = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(old.config)
    try:
        image = _sample(pipe)
    finally:
        pipe.scheduler = old
    assert [(c.step, c.phase) for c in unet.calls] == reference[1]
    assert np.abs(image - reference[0]).max() <= 1e-4


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
    job = _Build(CONFIG, copy_of, messages.append)
    job.close()
    assert any(m.startswith("previous manifest not reused") for m in messages)
    exports = [s for s in job.steps() if s.name.startswith("export ONNX")]
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


def test_weights_do_not_grow_when_the_same_tensors_are_written_twice(tmp_path):
    from atedm_compile.export.onnx import WeightStore, content_key

    arrays = [np.full((64, 64), i, dtype=np.float32) for i in range(3)]
    tensors = [(content_key(a), f"unet.w{i}", a) for i, a in enumerate(arrays)]
    first = WeightStore(tmp_path / WEIGHTS)
    first.add(tensors)
    size = (tmp_path / WEIGHTS).stat().st_size
    # A second writer that does not know the first's index (as two builds racing without a lock did).
    WeightStore(tmp_path / WEIGHTS).add(tensors)
    assert (tmp_path / WEIGHTS).stat().st_size == size
    first.add(tensors)
    assert (tmp_path / WEIGHTS).stat().st_size == size
    data = np.fromfile(tmp_path / WEIGHTS, dtype=np.uint8)
    for key, _, array in tensors:
        entry = first.index[key]
        assert np.array_equal(data[entry["offset"]:entry["offset"] + entry["length"]].view(np.float32),
                              array.reshape(-1))


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


def test_tool_made_weight_names_never_clash_across_phase_graphs(tmp_path):
    # ONNX Runtime's optimiser names the tensors it writes per session (reorder_token_7): in another
    # phase's graph the same name can be an activation (what made fp16 builds fail to load on the CPU).
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from atedm_compile.export.onnx import WeightStore, share_weights

    weight = np.arange(512, dtype=np.float32)

    def graph(weight_name, hidden_name):
        nodes = [helper.make_node("Add", ["x", weight_name], [hidden_name]),
                 helper.make_node("Relu", [hidden_name], ["y"])]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [512]) for n in ("x", "y")]
        return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:],
                                                   [numpy_helper.from_array(weight, weight_name)]))

    store = WeightStore(tmp_path / WEIGHTS)
    first = share_weights(graph("reorder_token_1", "hidden"), store)
    second = share_weights(graph("reorder_token_9", "reorder_token_1"), store)
    x = np.linspace(-300, 300, 512, dtype=np.float32)
    for i, model in enumerate((first, second)):
        onnx.save(model, str(tmp_path / f"{i}.onnx"))
        y = ort.InferenceSession(str(tmp_path / f"{i}.onnx")).run(None, {"x": x})[0]
        assert np.array_equal(y, np.maximum(x + weight, 0))
    assert len(store.index) == 1 and next(iter(store.index.values()))["name"].startswith("shared::")
