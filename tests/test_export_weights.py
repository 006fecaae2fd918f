"""The weights of a build: stored once for all phases (``weights.bin``), written once per content,
and optimised once per machine for ONNX Runtime on the CPU (the CPU cache).
"""

import shutil

import numpy as np
import onnx
import torch

from atedm_compile.export import load
from atedm_compile.export.manifest import WEIGHTS, read_manifest
from atedm_compile.export.onnx import example_inputs, external_initializers
from atedm_compile.export.onnxruntime import CPU_CACHE, OrtEngine, optimize_for_cpu
from atedm_compile.models import build_unet


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
        # An IR version and opset every supported onnxruntime reads (make_model's default is the
        # newest this onnx writes, which an older onnxruntime refuses).
        return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:],
                                                   [numpy_helper.from_array(weight, weight_name)]),
                                 ir_version=8, opset_imports=[helper.make_opsetid("", 17)])

    store = WeightStore(tmp_path / WEIGHTS)
    first = share_weights(graph("reorder_token_1", "hidden"), store)
    second = share_weights(graph("reorder_token_9", "reorder_token_1"), store)
    x = np.linspace(-300, 300, 512, dtype=np.float32)
    for i, model in enumerate((first, second)):
        onnx.save(model, str(tmp_path / f"{i}.onnx"))
        y = ort.InferenceSession(str(tmp_path / f"{i}.onnx")).run(None, {"x": x})[0]
        assert np.array_equal(y, np.maximum(x + weight, 0))
    assert len(store.index) == 1 and next(iter(store.index.values()))["name"].startswith("shared::")
