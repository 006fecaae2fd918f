"""``atedm-compile evaluate``: captions, budgets, metrics, and the whole command on the shipped toy
model with small random feature networks, alone and under ``torchrun --nproc_per_node 2`` (gloo)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from atedm_compile.shapes import synthetic
from atedm_compile.cli import main
from atedm_compile.evaluate import EvaluateConfig, Metrics, evaluate, read_captions
from atedm_compile.evaluate import metrics as metrics_module
from atedm_compile.evaluate.metrics import MissingMetricDependency, frechet_distance, load_metrics, paper_metrics
from atedm_compile.evaluate.plan import plan_budgets
from atedm_compile.evaluate.run import reference_image

ROOT = Path(__file__).resolve().parents[1]
TOY_METRICS = f"{Path(__file__).with_name('evaluate_toy_metrics.py')}:toy_metrics"


# -- captions ----------------------------------------------------------------------------------

def test_caption_lines_skip_blank_lines(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a red square\n\n  a blue   circle \n")
    assert [c.text for c in read_captions(path)] == ["a red square", "a blue circle"]


def test_coco_captions_keep_one_per_image(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "000007.jpg"}, {"id": 3, "file_name": "000003.jpg"}],
            "annotations": [{"id": 20, "image_id": 7, "caption": "a dog on a sofa"},
                            {"id": 11, "image_id": 7, "caption": "A brown dog\n sleeping. "},
                            {"id": 12, "image_id": 3, "caption": "two birds"},
                            {"id": 30, "image_id": 3, "caption": "birds on grass"}]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(coco))
    captions = read_captions(path)
    assert [(c.image_id, c.text, c.file_name) for c in captions] == [
        (3, "two birds", "000003.jpg"), (7, "A brown dog sleeping.", "000007.jpg")]


def test_a_byte_order_mark_is_no_part_of_the_first_caption(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes("a red square\na blue circle\n".encode("utf-8-sig"))
    assert [c.text for c in read_captions(path)] == ["a red square", "a blue circle"]
    coco = tmp_path / "captions.json"
    coco.write_bytes(json.dumps({"annotations": [{"image_id": 1, "caption": "a dog"}]}).encode("utf-8-sig"))
    assert [c.text for c in read_captions(coco)] == ["a dog"]


def test_coco_image_ids_of_both_kinds_sort_integers_first(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"annotations": [{"id": "b", "image_id": "x", "caption": "a string id"},
                                                {"id": 2, "image_id": 5, "caption": "an integer id"},
                                                {"id": 1, "image_id": "x", "caption": "another caption of x"}]}))
    assert [(c.image_id, c.text) for c in read_captions(path)] == [(5, "an integer id"), ("x", "another caption of x")]
    path.write_text(json.dumps({"annotations": [{"image_id": [1], "caption": "a list for an id"}]}))
    with pytest.raises(ValueError, match=r"annotation 0 has image_id \[1\], neither an integer nor a string"):
        read_captions(path)


@pytest.mark.parametrize("content, message", [
    ("\n\n", "holds no caption"),
    ('{"images": []}', "not COCO captions"),
    ("{not json", "not valid JSON"),
])
def test_bad_captions_files_are_named(tmp_path, content, message):
    path = tmp_path / ("captions.json" if content.startswith("{") else "captions.txt")
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_captions(path)


def test_a_captions_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"a red square\na blue \xff circle\n")
    with pytest.raises(ValueError, match=r"captions.txt' is not UTF-8 text: line 2 holds byte 0xff"):
        read_captions(path)


# -- metrics -----------------------------------------------------------------------------------

def test_frechet_distance_matches_its_closed_form():
    # Covariances sharing their eigenvectors commute: tr (S_a S_b)^(1/2) = sum sqrt(a_i b_i).
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = rng.uniform(0.5, 2.0, 4), rng.uniform(0.5, 2.0, 4)
    mu_a, mu_b = rng.normal(size=4), rng.normal(size=4)
    value, implementation = frechet_distance(mu_a, rotation @ np.diag(a) @ rotation.T,
                                             mu_b, rotation @ np.diag(b) @ rotation.T)
    expected = ((mu_a - mu_b) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert value == pytest.approx(expected, rel=1e-9)
    assert implementation == ("clean-fid" if importlib.util.find_spec("cleanfid") else
                              "atedm_compile.evaluate.image_metrics (clean-fid absent)")


@pytest.mark.skipif(importlib.util.find_spec("cleanfid") is not None or importlib.util.find_spec("open_clip") is not None,
                    reason="checks the message shown where the metric libraries are absent")
def test_missing_metric_libraries_and_weights_are_named(tmp_path):
    with pytest.raises(MissingMetricDependency) as raised:
        paper_metrics("cpu", inception=tmp_path / "inception-2015-12-05.pt")
    message = str(raised.value)
    for part in ("clean-fid", "open_clip_torch", "pip install -c constraints/eval.txt -e '.[eval]'",
                 str(tmp_path / "inception-2015-12-05.pt")):
        assert part in message


def test_open_clip_weights_are_looked_up_in_the_hub_cache(monkeypatch):
    class FakeOpenClip:  # the two look-ups open_clip_weights makes
        @staticmethod
        def get_pretrained_cfg(model, tag):
            return {"hf_hub": "laion/CLIP-ViT-g-14-laion2B-s34B-b88K/", "mean": (0.5,)} if tag == "known" else {}

        @staticmethod
        def list_pretrained_tags_by_model(model):
            return ["known"]

    cached = {("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", "open_clip_pytorch_model.bin"): "/cache/model.bin"}
    monkeypatch.setattr(metrics_module, "_hub_file", lambda repo, name: cached.get((repo, name)))
    path, config, _ = metrics_module.open_clip_weights(FakeOpenClip, "ViT-g-14", "known")
    assert path == "/cache/model.bin" and config["mean"] == (0.5,)
    cached.clear()
    path, _, looked = metrics_module.open_clip_weights(FakeOpenClip, "ViT-g-14", "known")
    assert path is None and "open_clip_model.safetensors or open_clip_pytorch_model.bin" in looked
    with pytest.raises(ValueError, match="tags for 'ViT-g-14': \\['known'\\]"):
        metrics_module.open_clip_weights(FakeOpenClip, "ViT-g-14", "unknown")


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "module:function"),
    ("atedm_compile.no_such_module:f", "cannot import"),
    ("atedm_compile.evaluate.metrics:no_such_function", "has no function"),
    ("/no/such/file.py:f", "no file"),
])
def test_bad_metrics_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        load_metrics(spec)


def test_reference_images_are_center_cropped_to_the_generated_shape(tmp_path):
    wide = np.zeros((40, 100, 3), np.uint8)
    wide[:, 30:70] = 255  # a white centre square between black side bands
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = reference_image(tmp_path / "wide.png", 20, 20)
    assert image.shape == (20, 20, 3)
    assert image.min() == 255  # the side bands were cropped away


# -- budgets -----------------------------------------------------------------------------------

def test_keep_ratio_budgets_cost_what_flops_counts():
    from atedm_compile.flops import count_phases
    from atedm_compile.models import build_unet
    from atedm_compile.schedule import make_schedule

    unet = build_unet("tiny-shapes", device="meta")
    size = dict(height=64, width=64, vae_factor=4)
    plan = plan_budgets(unet, ["full", "atedm"], keep_ratios=[0.5], steps=4, **size)
    entry = plan["budgets"][0]
    expected = count_phases(unet, make_schedule("atedm", 4, keep_ratio=0.5), **size)
    assert entry["label"] == "keep0.5" and entry["atedm_keep_ratio"] == 0.5
    assert entry["methods"]["atedm"]["tmacs"] == expected.average_tmacs
    assert entry["methods"]["atedm"]["share"] == expected.average_tmacs / expected.full_tmacs < 1
    assert plan["full_tmacs"] == expected.full_tmacs


def test_methods_that_prune_alike_meet_atedm_with_their_own_work_counted():
    from atedm_compile.flops import count_phases
    from atedm_compile.models import build_unet
    from atedm_compile.schedule import make_schedule
    from atedm_compile.config import DEFAULT_PRUNING

    from atedm_compile.evaluate.plan import METHODS, Method

    unet = build_unet("tiny-shapes", device="meta")
    size = dict(height=64, width=64, vae_factor=4)
    # The default's pruning on AT-EDM's own schedule (the default method runs atedm-level2, whose
    # level-2 blocks keep more: it keeps fewer tokens elsewhere for that too).
    table = {**METHODS, "default": Method("default pruning", "atedm", DEFAULT_PRUNING)}
    entry = plan_budgets(unet, ["atedm", "default", "random"], keep_ratios=[0.5], steps=4, tolerance=0.05,
                         table=table, **size)["budgets"][0]
    atedm, default, random = (entry["methods"][m] for m in ("atedm", "default", "random"))
    # Random scores cost nothing: it runs at AT-EDM's keep ratio. The default's key cosines cost more
    # than the paper's copy: it keeps fewer tokens, as many as AT-EDM's MACs allow.
    assert random["keep_ratio"] == 0.5 and random["tmacs"] == atedm["tmacs"]
    assert random["tmacs_with_scoring"] < atedm["tmacs_with_scoring"]
    assert default["keep_ratio"] < 0.5 and not default["capped"]
    assert default["tmacs_with_scoring"] <= atedm["tmacs_with_scoring"] * (1 + 1e-9)
    at_atedms_keep = count_phases(unet, make_schedule("atedm", 4, keep_ratio=0.5), DEFAULT_PRUNING, **size)
    assert at_atedms_keep.average_tmacs_with_scoring > atedm["tmacs_with_scoring"]
    assert default["share_with_scoring"] == default["tmacs_with_scoring"] / count_phases(
        unet, make_schedule("none", 4), **size).full_tmacs
    assert (METHODS["default"].preset, METHODS["default"].config) == ("atedm-level2", DEFAULT_PRUNING)


def test_a_table_of_ones_own_methods_with_a_cap_by_another_method():
    # The benchmark's route (benchmarks/quality.py): its own table of Methods; "capped_by" holds a
    # method to another's MACs as well as AT-EDM's.
    from atedm_compile.config import DEFAULT_PRUNING, PAPER_PRUNING, ToMeConfig
    from atedm_compile.evaluate.plan import Method
    from atedm_compile.models import build_unet

    table = {"paper": Method("paper", "atedm", PAPER_PRUNING), "tome": Method("ToMe", "atedm", ToMeConfig(), "matched"),
             "ours at ToMe's": Method("ours", "atedm", DEFAULT_PRUNING, capped_by="tome")}
    unet = build_unet("tiny-shapes", device="meta")
    size = dict(height=64, width=64, vae_factor=4)
    entry = plan_budgets(unet, list(table), keep_ratios=[0.5], steps=4, tolerance=0.05, table=table,
                         **size)["budgets"][0]
    paper, tome, ours = (entry["methods"][m] for m in table)
    assert paper["keep_ratio"] == 0.5 and paper["tmacs_with_scoring"] * (1 + 1e-9) == entry["limit_tmacs_with_scoring"]
    assert ours["tmacs_with_scoring"] <= min(paper["tmacs_with_scoring"], tome["tmacs_with_scoring"]) * (1 + 1e-9)
    with pytest.raises(ValueError, match=r"method \"ours at ToMe's\" is held to the MACs of 'tome' too: plan 'tome' before it"):
        plan_budgets(unet, ["paper", "ours at ToMe's"], keep_ratios=[0.5], steps=4, table=table, **size)
    with pytest.raises(ValueError, match=r"keep='solve' is not allowed; choose one of \['full', 'budget', 'matched'\]"):
        Method("x", "atedm", PAPER_PRUNING, "solve")


@pytest.mark.slow  # about 30 s: tiny-shapes-xl, the one shipped model where ToMe cannot reach a budget
def test_above_budget_holds_a_method_to_the_capping_methods_macs_alone():
    # "At ToMe's MACs" where ToMe's largest merge ratio costs more than the budget (SD-XL's 2.9 on
    # tiny-shapes-xl): held to ToMe's MACs alone, so above the budget and with more tokens kept.
    from atedm_compile.config import DEFAULT_PRUNING, PAPER_PRUNING, ToMeConfig
    from atedm_compile.evaluate.plan import Method
    from atedm_compile.models import build_unet

    table = {"paper": Method("paper", "uniform", PAPER_PRUNING), "tome": Method("ToMe", "uniform", ToMeConfig(), "matched"),
             "ours": Method("ours", "uniform", DEFAULT_PRUNING, capped_by="tome"),
             "ours above": Method("ours", "uniform", DEFAULT_PRUNING, capped_by="tome", above_budget=True)}
    entry = plan_budgets(build_unet("tiny-shapes-xl", device="meta"), list(table), keep_ratios=[0.06], steps=1,
                         tolerance=0.1, table=table, height=128, width=128, vae_factor=4)["budgets"][0]
    paper, tome, ours, above = (entry["methods"][m]["tmacs_with_scoring"] for m in table)
    assert entry["methods"]["tome"]["capped"] and tome > paper
    assert ours <= paper * (1 + 1e-9)
    assert paper < above <= tome * (1 + 1e-9)
    assert entry["methods"]["ours above"]["keep_ratio"] > entry["methods"]["ours"]["keep_ratio"]


def test_unknown_method_is_refused():
    from atedm_compile.models import build_unet

    with pytest.raises(ValueError, match=r"methods \['cheap'\] not known; choose from \['full', 'atedm', 'default'"):
        plan_budgets(build_unet("tiny-shapes", device="meta"), ["atedm", "cheap"], keep_ratios=[0.5], steps=4)


def test_a_budget_not_below_the_full_models_cost_is_refused():
    # Solved, it was keep 1.0: "pruned" rows that were the full model's, said nowhere.
    from atedm_compile.models import build_unet

    unet = build_unet("tiny-shapes", device="meta")
    full = plan_budgets(unet, ["full"], steps=2, height=64, width=64, vae_factor=4)["full_tmacs"]
    with pytest.raises(ValueError, match=r"budget 1 TMACs is not below the full model's 0.0003394 TMACs per U-Net "
                                         r"call at 64x64 px: nothing to prune"):
        plan_budgets(unet, ["atedm"], budgets=[1.0], steps=2, height=64, width=64, vae_factor=4)
    with pytest.raises(ValueError, match="not below the full model's"):
        plan_budgets(unet, ["atedm"], budgets=[full], steps=2, height=64, width=64, vae_factor=4)


def test_the_plan_key_does_not_depend_on_pythons_hash_seed():
    # diffusers lists the config keys left at their defaults in set order, which the hash seed
    # changes: in the key, every new process solved the plan again (328 s for SD-XL).
    from atedm_compile.evaluate.records import _plan_key
    from atedm_compile.models import unet_config

    config = EvaluateConfig("tiny-shapes", "c.txt", "out", methods=["full", "atedm"], keep_ratios=[0.5])
    unet = unet_config("tiny-shapes")
    defaults = ["dropout", "conv_in_kernel", "mid_block_type", "upcast_attention"]
    keys = [_plan_key(config, {**unet, "_use_default_values": order, "_class_name": "UNet2DConditionModel"}, {})
            for order in (defaults, defaults[::-1])]
    assert keys[0] == keys[1] == _plan_key(config, unet, {})
    assert _plan_key(config, {**unet, "dropout": 0.5}, {}) != keys[0]


def test_the_plan_key_changes_with_a_methods_definition(monkeypatch):
    # A plan solved for a method under its old definition (default on atedm, before atedm-level2)
    # is not reused for the new one.
    import dataclasses

    from atedm_compile.evaluate import plan
    from atedm_compile.evaluate.records import _plan_key

    config = EvaluateConfig("tiny-shapes", "c.txt", "out", methods=["full", "default"], keep_ratios=[0.5])
    before = _plan_key(config, {}, {})
    monkeypatch.setitem(plan.METHODS, "default", dataclasses.replace(plan.METHODS["default"], preset="atedm"))
    assert _plan_key(config, {}, {}) != before


@pytest.mark.slow
def test_budgets_solve_atedm_and_match_tome():
    from atedm_compile.flops import count_phases
    from atedm_compile.models import build_unet
    from atedm_compile.schedule import make_schedule

    unet = build_unet("tiny-shapes", device="meta")
    size = dict(height=64, width=64, vae_factor=4)
    budget = count_phases(unet, make_schedule("uniform", 1, keep_ratio=0.5), **size).average_tmacs
    plan = plan_budgets(unet, ["full", "atedm", "tome"], budgets=[budget], steps=2, tolerance=0.1, **size)
    entry = plan["budgets"][0]
    assert entry["pruned_phase_tmacs"] <= budget and 0.4 <= entry["atedm_keep_ratio"] <= 1.0
    atedm, tome = entry["methods"]["atedm"], entry["methods"]["tome"]
    assert atedm["keep_ratio"] == entry["atedm_keep_ratio"]
    assert tome["tmacs_with_scoring"] <= atedm["tmacs_with_scoring"] == entry["limit_tmacs_with_scoring"] / (1 + 1e-9)
    assert not tome["capped"] and 0.25 <= tome["keep_ratio"] < 1.0
    assert plan["full_tmacs"] > atedm["tmacs"]


# -- the command -------------------------------------------------------------------------------

COMMON = ["--model", "tiny-shapes", "--methods", "full", "atedm", "--keep-ratios", "0.5", "--steps", "2",
          "--batch", "2", "--metrics", TOY_METRICS]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five captions of the synthetic shapes and a reference folder of six rendered images."""
    folder = tmp_path_factory.mktemp("evaluate-data")
    images, _, captions, _ = synthetic.make_dataset(6, seed=5, size=64)
    (folder / "reference").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / "reference" / f"{i}.png")
    (folder / "captions.txt").write_text("\n".join(captions[:5]) + "\n")
    return folder


def _args(data, out):
    return ["evaluate", *COMMON, "--captions", str(data / "captions.txt"), "--reference", str(data / "reference"),
            "--out", str(out)]


@pytest.fixture(scope="module")
def two_runs(data, tmp_path_factory):
    """The same evaluation by one process (here) and by two ranks under torchrun."""
    alone, ranks = tmp_path_factory.mktemp("alone"), tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")  # torchrun's default too
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "atedm_compile.cli", *_args(data, ranks)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert main(_args(data, alone)) == 0  # conftest: one thread, as each rank has
    return alone, ranks, result.stdout


def test_one_process_and_two_ranks_give_the_same_results(two_runs):
    alone, ranks, stdout = two_runs
    assert "ranks: 2" in stdout and "images: 10 generated" in stdout
    assert (alone / "results.txt").read_text() == (ranks / "results.txt").read_text()
    assert json.loads((alone / "results.json").read_text()) == json.loads((ranks / "results.json").read_text())
    for run in ("full-g7", "atedm-keep0.5-g7"):
        names = sorted(p.name for p in (ranks / "images" / run).glob("*.png"))
        assert names == [f"{i:06d}.png" for i in range(5)]  # every caption once, under a stable name
        for name in names:
            assert (alone / "images" / run / name).read_bytes() == (ranks / "images" / run / name).read_bytes()


@pytest.mark.slow
def test_ranks_started_by_slurms_env_launch_give_torchruns_bytes(two_runs, data, tmp_path):
    # srun starting every rank with RANK / WORLD_SIZE (no torchrun) sets no OMP_NUM_THREADS: each
    # rank took every core, and its sums rounded otherwise than torchrun's one thread.
    import socket

    _, ranks, _ = two_runs
    out = tmp_path / "out"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", TRANSFORMERS_VERBOSITY="error")
    processes = [subprocess.Popen([sys.executable, "-m", "atedm_compile.cli", *_args(data, out)], cwd=ROOT,
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for r in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [r[1].decode()[-2000:] for r in results]
    for png in (ranks / "images").rglob("*.png"):
        assert (out / png.relative_to(ranks)).read_bytes() == png.read_bytes(), png
    assert json.loads((out / "results.json").read_text()) == json.loads((ranks / "results.json").read_text())


def test_a_plan_solved_under_other_rules_is_solved_again(two_runs, data, tmp_path):
    from atedm_compile.evaluate.plan import PLANNER_VERSION

    out = tmp_path / "out"
    shutil.copytree(two_runs[0], out)
    saved = json.loads((out / "plan.json").read_text())
    assert saved["key"]["planner"] == PLANNER_VERSION
    saved["key"]["planner"] = PLANNER_VERSION - 1  # an earlier release's plan, with a keep ratio of its own
    saved["plan"]["budgets"][0]["methods"]["atedm"]["keep_ratio"] = 0.123
    (out / "plan.json").write_text(json.dumps(saved))
    assert main(_args(data, out)) == 0
    again = json.loads((out / "plan.json").read_text())
    assert again["key"]["planner"] == PLANNER_VERSION
    assert again["plan"]["budgets"][0]["methods"]["atedm"]["keep_ratio"] == 0.5


def test_results_hold_every_number(two_runs, data):
    alone, _, _ = two_runs
    record = json.loads((alone / "results.json").read_text())
    rows = {row["run"]: row for row in record["rows"]}
    assert set(rows) == {"full-g7", "atedm-keep0.5-g7"}
    assert rows["atedm-keep0.5-g7"]["keep_ratio"] == 0.5 and rows["atedm-keep0.5-g7"]["share"] < 1.0
    # The metrics, recomputed here from the written images and the reference folder.
    toy = load_metrics(TOY_METRICS)("cpu")
    captions = (data / "captions.txt").read_text().splitlines()
    reference = np.stack([np.asarray(Image.open(data / "reference" / f"{i}.png")) for i in range(6)])
    for run, row in rows.items():
        images = np.stack([np.asarray(Image.open(alone / "images" / run / f"{i:06d}.png")) for i in range(5)])
        clip = np.concatenate([toy.clip_score(images[i:i + 2], captions[i:i + 2]) for i in range(0, 5, 2)])
        features = np.concatenate([toy.fid_features(images[i:i + 2]) for i in range(0, 5, 2)])
        ref = np.concatenate([toy.fid_features(reference[i:i + 2]) for i in range(0, 6, 2)])
        assert record["clip_scores"][run] == pytest.approx(clip.tolist(), abs=1e-6)
        assert row["clip_score"] == pytest.approx(float(clip.mean()), abs=1e-6)
        assert row["fid"] == pytest.approx(synthetic.frechet_distance(features, ref), rel=1e-4)
        assert row["images"] == 5
    assert rows["full-g7"]["fid"] != rows["atedm-keep0.5-g7"]["fid"]
    with Image.open(alone / "curves.png") as curves:
        assert curves.size == (900, 600)


def test_rerun_resumes_without_generating(two_runs, data, capsys):
    _, ranks, _ = two_runs
    made = [*(ranks / "images").rglob("*.png"), *(ranks / "features").rglob("*.safetensors")]
    before = {p: p.stat().st_mtime_ns for p in made}
    expected = (ranks / "results.json").read_text()
    assert main(_args(data, ranks)) == 0  # one process resuming what two ranks made
    assert "images: 0 generated, 0 read back; features of 10 images reused, 0 reference" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((ranks / "results.json").read_text()) == json.loads(expected)


def test_rerun_redoes_only_what_is_missing(two_runs, data, tmp_path, capsys):
    alone, _, _ = two_runs
    out = tmp_path / "out"
    shutil.copytree(alone, out)
    (out / "features" / "full-g7" / "000002.safetensors").unlink()  # caption 4: features from its image
    (out / "features" / "atedm-keep0.5-g7" / "000001.safetensors").unlink()  # captions 2, 3: images and features
    (out / "images" / "atedm-keep0.5-g7" / "000002.png").unlink()
    kept = (out / "images" / "atedm-keep0.5-g7" / "000003.png").stat().st_mtime_ns
    assert main(_args(data, out)) == 0
    assert (out / "images" / "atedm-keep0.5-g7" / "000003.png").stat().st_mtime_ns == kept  # written once
    assert "images: 2 generated, 1 read back; features of 7 images reused" in capsys.readouterr().out
    assert (out / "images" / "atedm-keep0.5-g7" / "000002.png").read_bytes() == \
        (alone / "images" / "atedm-keep0.5-g7" / "000002.png").read_bytes()
    assert json.loads((out / "results.json").read_text()) == json.loads((alone / "results.json").read_text())


def test_images_of_another_run_are_not_read_back(two_runs, data, tmp_path, capsys):
    # A plan solved again (another keep ratio) keeps the run's name: its old images must not pass.
    alone, _, _ = two_runs
    out = tmp_path / "out"
    shutil.copytree(alone, out)
    png = out / "images" / "atedm-keep0.5-g7" / "000001.png"
    Image.open(png).save(png)  # the same pixels, no longer saying which run made them
    stale = out / "images" / "atedm-keep0.5-g7" / "000000.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("atedm-compile run", "another run")
    Image.open(stale).save(stale, pnginfo=info)
    (out / "features" / "atedm-keep0.5-g7" / "000000.safetensors").unlink()  # captions 0, 1
    assert main(_args(data, out)) == 0
    assert "images: 2 generated, 0 read back; features of 8 images reused" in capsys.readouterr().out
    for name in ("000000.png", "000001.png"):
        assert (out / "images" / "atedm-keep0.5-g7" / name).read_bytes() == \
            (alone / "images" / "atedm-keep0.5-g7" / name).read_bytes()
    assert json.loads((out / "results.json").read_text()) == json.loads((alone / "results.json").read_text())


def test_reference_statistics_file_gives_the_same_fid(two_runs, data, tmp_path):
    alone, _, _ = two_runs
    out = tmp_path / "out"
    shutil.copytree(alone, out)
    (out / "reference.npz").unlink()
    args = _args(data, out)
    args[args.index("--reference"):args.index("--reference") + 2] = ["--reference-stats", str(alone / "reference.npz")]
    assert main(args) == 0
    def fids(folder):
        return [row["fid"] for row in json.loads((folder / "results.json").read_text())["rows"]]

    assert fids(out) == fids(alone)


def test_other_settings_in_the_same_folder_are_refused(two_runs, data, capsys):
    alone, _, _ = two_runs
    args = _args(data, alone)
    args[args.index("--steps") + 1] = "3"
    assert main(args) == 2
    assert "steps" in capsys.readouterr().err


def test_a_reference_folder_of_other_images_with_the_same_names_and_sizes_is_measured_anew(data, tmp_path):
    # Features were keyed by file names and sizes: FID 0.65 against a folder whose true FID is 108.84.
    metrics = Metrics("mean colour", lambda images: images.reshape(len(images), -1, 3).mean(1),
                      lambda images, captions: np.ones(len(images)))
    folders = {}
    for name, colours in (("bright", [(250, 240, 230), (200, 210, 220), (230, 200, 250)]),
                          ("dark", [(10, 20, 30), (40, 10, 20), (20, 50, 10)])):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i, colour in enumerate(colours):  # BMP: the same size for the same pixel count
            Image.new("RGB", (64, 64), colour).save(folders[name] / f"{i}.bmp")
    assert [p.stat().st_size for p in sorted(folders["bright"].iterdir())] == \
        [p.stat().st_size for p in sorted(folders["dark"].iterdir())]

    def fid(reference, out):
        record = evaluate(EvaluateConfig("tiny-shapes", data / "captions.txt", out, methods=["full"], steps=1,
                                         images=2, batch=2, reference=reference), metrics)
        return record["rows"][0]["fid"]

    shared = tmp_path / "shared"
    bright, dark = fid(folders["bright"], shared), fid(folders["dark"], shared)
    assert dark == fid(folders["dark"], tmp_path / "fresh") != bright
    assert json.loads((shared / "results.json").read_text())["settings"]["reference"]["path"] == str(folders["dark"])


def test_a_rerun_that_would_drop_rows_is_refused(two_runs, data, tmp_path, capsys):
    # A rerun with fewer guidance scales or images rewrote results.json and results.txt with less.
    alone, _, _ = two_runs
    out = tmp_path / "out"
    shutil.copytree(alone, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for change, message in ((["--images", "4"], "holds its rows of 5 images, which this run (4 images) would drop"),
                            (["--methods", "full"], "holds the rows ['atedm-keep0.5-g7'] of 5 images"),
                            (["--guidance", "5"], "holds the rows ['full-g7', 'atedm-keep0.5-g7'] of 5 images")):
        assert main(_args(data, out) + change) == 2  # the last --methods, --guidance, --images counts
        err = capsys.readouterr().err
        assert message in err and "or use another --out" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("change, message", [
    (["--methods", "full", "atedm", "--keep-ratios"], "need budgets"),
    (["--images", "9"], "holds only 5 captions"),
    (["--images", "1"], "images=1 must be an integer >= 2"),
    (["--guidance", "0"], "each in (0, 100]"),
    (["--keep-ratios", "1.5"], "outside (0, 1]"),
    (["--reference", "/no/such/folder"], "is not a folder"),
])
def test_bad_arguments_exit_2_with_a_message(data, tmp_path, capsys, change, message):
    args = _args(data, tmp_path / "out")
    if change[-1] == "--keep-ratios":  # drop the keep ratios altogether
        position = args.index("--keep-ratios")
        del args[position:position + 2]
    else:
        args += change
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()


@pytest.mark.parametrize("change, message", [
    (["--device", "cuda"], "is not available here"),
    (["--height", "65536"], "needs at least"),
    (["--out-file"], "exists and is not a folder"),
    (["--stats", b""], "is not an .npz of FID statistics"),
    (["--stats", b"a caption\n"], "is not an .npz of FID statistics"),
    (["--stats", "mu-only"], "not mu and sigma"),
    (["--budgets", "1"], "is not below the full model's"),
    (["--budgets", "1e-9"], "TMACs is below what preset 'uniform' reaches"),
])
def test_bad_inputs_are_said_before_anything_is_written(data, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    args = _args(data, out)
    if change[0] == "--out-file":
        out.write_text("not a folder")
    elif change[0] == "--stats":
        stats = tmp_path / "stats.npz"
        if change[1] == "mu-only":
            np.savez(stats, mu=np.zeros(3))
        else:
            stats.write_bytes(change[1])
        position = args.index("--reference")
        args[position:position + 2] = ["--reference-stats", str(stats)]
    else:
        args += change
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.is_dir() or not any(out.iterdir())


def test_a_metrics_factory_must_make_metrics(data, tmp_path):
    config = EvaluateConfig("tiny-shapes", data / "captions.txt", tmp_path / "out", methods=["full"], steps=1,
                            images=2, batch=2, reference=data / "reference")
    with pytest.raises(ValueError, match="the metrics factory 'make' returned int, not an atedm_compile.evaluate.Metrics"):
        def make(device):
            return 42
        evaluate(config, make)
    assert not (tmp_path / "out").exists()


def test_a_folder_left_before_its_first_image_takes_new_settings(data, tmp_path):
    # An earlier run that stopped before making an image left only its records: they hold nothing
    # to keep, so other settings are no reason to refuse the folder.
    out = tmp_path / "out"
    (out / "images" / "full-g5").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"model": "tiny", "steps": 9}))
    (out / "captions.json").write_text(json.dumps([{"index": 0, "caption": "another caption"}]))
    (out / "images" / "full-g5" / "run.json").write_text(json.dumps({"method": "other"}))
    metrics = Metrics("mean colour", lambda images: images.reshape(len(images), -1, 3).mean(1),
                      lambda images, captions: np.ones(len(images)))
    record = evaluate(EvaluateConfig("tiny-shapes", data / "captions.txt", out, methods=["full"], steps=1, images=2,
                                     batch=2, reference=data / "reference"), metrics)
    assert record["rows"][0]["images"] == 2
    assert json.loads((out / "settings.json").read_text())["steps"] == 1


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "float16", "auto"])
def test_dtype_takes_generates_names_and_torchs(data, tmp_path, dtype):
    EvaluateConfig("tiny-shapes", data / "captions.txt", tmp_path, methods=["full"], reference=data / "reference",
                   dtype=dtype).check()


def test_bad_dtype_is_named(data, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"dtype 'half': choose auto or one of \['fp32', 'fp16', 'bf16'\]"):
        EvaluateConfig("tiny-shapes", data / "captions.txt", tmp_path, methods=["full"],
                       reference=data / "reference", dtype="half").check()
    with pytest.raises(SystemExit) as exit:
        main(_args(data, tmp_path / "out") + ["--dtype", "half"])
    assert exit.value.code == 2
    assert "invalid choice: 'half' (choose from 'auto', 'fp32', 'fp16', 'bf16')" in capsys.readouterr().err


def test_python_api_takes_a_metrics_object(data, tmp_path):
    calls = []

    def mean_colour(images):
        calls.append(len(images))
        return images.reshape(len(images), -1, 3).mean(1)

    metrics = Metrics("mean colour", mean_colour, lambda images, captions: np.ones(len(images)))
    record = evaluate(EvaluateConfig("tiny-shapes", data / "captions.txt", tmp_path, methods=["full"], steps=1,
                                     images=3, batch=3, reference=data / "reference"), metrics)
    assert [row["clip_score"] for row in record["rows"]] == [1.0]
    assert calls == [3, 3, 3]  # the reference folder in chunks of 3 (6 images), then the 3 generated


# -- the paper's metrics, where this machine has them ------------------------------------------

def _paper_metrics_or_skip():
    for package, module in (("clean-fid", "cleanfid"), ("open_clip_torch", "open_clip")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{package} is not installed (pip install -c constraints/eval.txt -e '.[eval]')")
    try:
        return paper_metrics("cpu")
    except MissingMetricDependency as missing:
        pytest.skip(str(missing))


def test_paper_metrics_on_real_weights(data, tmp_path):
    metrics = _paper_metrics_or_skip()
    images = np.stack([np.asarray(Image.open(data / "reference" / f"{i}.png")) for i in range(2)])
    assert metrics.fid_features(images).shape == (2, 2048)
    scores = metrics.clip_score(images, ["a red square", "a blue circle"])
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1)
    model = os.environ.get("ATEDM_EVAL_MODEL", "tiny-shapes")  # a real pipeline folder, where one is cached
    record = evaluate(EvaluateConfig(model, data / "captions.txt", tmp_path, methods=["full", "atedm"],
                                     keep_ratios=[0.37], steps=2, images=4, batch=2, reference=data / "reference"),
                      metrics)
    assert record["settings"]["frechet_distance"] == "clean-fid"
    assert all(-1 <= row["clip_score"] <= 1 and np.isfinite(row["fid"]) for row in record["rows"])
