"""``models.resolve_model``: one answer to what a model name is, for every command."""

import json

import pytest
import torch

from atedm_compile import models
from atedm_compile.export.build import model_identity
from atedm_compile.files import sha256_file, sha256_json
from atedm_compile.models import (TINY_SDXL_UNET, TINY_SHAPES, TINY_VAE, BuiltInModel, DiffusersModel, TrainedModel,
                                  resolve_model)


@pytest.mark.parametrize("name, kind", [("tiny", BuiltInModel), ("sdxl-base", BuiltInModel), ("tiny-sd15", BuiltInModel),
                                        ("tiny-shapes", TrainedModel), ("tiny-shapes-xl", TrainedModel),
                                        (str(TINY_SHAPES), TrainedModel), (TINY_SHAPES, TrainedModel),
                                        ("someone/some-pipeline", DiffusersModel)])
def test_each_way_of_naming_a_model_gives_its_kind(name, kind):
    assert type(resolve_model(name)) is kind


def test_a_built_in_config():
    source = resolve_model("tiny")
    assert source.unet_config() == TINY_SDXL_UNET and source.unet_config() is not models.UNET_CONFIGS["tiny"]
    assert source.vae_factor == 8 and source.has_pipeline
    assert source.pipeline_configs() == (TINY_SDXL_UNET, TINY_VAE)
    assert source.identity(3) == {"name": "tiny", "seed": 3, "drawn": "at-precision",
                                  "config_sha256": sha256_json(source.full_unet_config())}
    # The key of every tiny build made before the model source: existing builds stay current.
    assert source.identity(0)["config_sha256"] == TINY_CONFIG_SHA256


# tiny's config with its defaults spelled out, hashed as builds before resolve_model did (diffusers 0.42.1).
TINY_CONFIG_SHA256 = "adea60807a428fa3c5ebd00cbec3355f4a35492bebcbec88271aeed378759fc3"


def test_full_config_spells_out_the_constructor_defaults_and_drops_private_keys():
    config = resolve_model("tiny").full_unet_config()
    assert config["time_cond_proj_dim"] is None and config["block_out_channels"] == [32, 64, 128]
    assert not any(key.startswith("_") for key in config)


def test_a_bare_config_has_no_pipeline():
    source = resolve_model("sdxl-base")
    assert not source.has_pipeline and source.vae_factor == 8
    for call in (source.pipeline_configs, source.load_pipeline):
        with pytest.raises(ValueError, match=r"'sdxl-base' is a bare U-Net config .* sampling needs a pipeline: "
                                             r"tiny, tiny-shapes, tiny-shapes-xl"):
            call()


def test_a_trained_model_by_name_and_by_folder():
    by_name, by_folder = resolve_model("tiny-shapes"), resolve_model(str(TINY_SHAPES))
    config = json.loads((TINY_SHAPES / "config.json").read_text())
    files = {name: sha256_file(TINY_SHAPES / name) for name in ("config.json", "model.safetensors")}
    for source in (by_name, by_folder):
        assert source.unet_config() == config["unet"]
        assert source.vae_factor == 2 ** (len(config["vae"]["block_out_channels"]) - 1)
        assert source.pipeline_configs() == (config["unet"], config["vae"])
    assert by_name.identity()["name"] == "tiny-shapes" and by_name.identity()["files"] == files
    assert by_folder.identity()["name"] == str(TINY_SHAPES.resolve())


def test_a_diffusers_unet_folder(tmp_path):
    unet = models.build_unet({**TINY_SDXL_UNET, "block_out_channels": [16, 32, 64]})
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "vae").mkdir()
    (tmp_path / "pipe" / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8]}))
    source = resolve_model(str(tmp_path / "pipe"))
    assert source.unet_config()["block_out_channels"] == [16, 32, 64] and source.vae_factor == 4
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    assert source.identity()["files"] == {weights.name: sha256_file(weights)}
    assert source.identity()["name"] == str((tmp_path / "pipe").resolve())
    loaded = source.load_unet(dtype=torch.float16)
    assert loaded.dtype == torch.float16 and not loaded.training
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight.half())
    assert source.pipeline_configs()[1] == {"block_out_channels": [8, 8, 8]}
    # The U-Net folder itself is a model too (no VAE: the SD VAE's factor; no pipeline's configs).
    alone = resolve_model(str(tmp_path / "pipe" / "unet"))
    assert alone.vae_factor == 8 and alone.pipeline_configs() is None
    assert alone.unet_config()["block_out_channels"] == [16, 32, 64]


def test_build_identity_is_the_sources():
    identity, config, factor = model_identity("tiny-shapes", 0)
    source = resolve_model("tiny-shapes")
    assert (identity, config, factor) == (source.identity(0), source.full_unet_config(), source.vae_factor)


@pytest.mark.parametrize("name", ["", "  ", 3, None])
def test_what_names_no_model_is_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"model {name!r} is not a model name or path: give a config name "
                                         r"\(sd15, sd21, sdxl-base"):
        resolve_model(name)


def test_an_unknown_name_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown model config 'sdxl-huge': give a config name \(sd15, .*tiny-sd15\), "
                                         r"a trained model \(tiny-shapes, tiny-shapes-xl\) or the folder of one, or a "
                                         r"directory with a diffusers U-Net"):
        models.unet_config("sdxl-huge")
    assert resolve_model("sdxl-huge").pipeline_configs() is None  # perhaps a hub id: only loading can tell


def test_load_pipeline_draws_a_built_in_pipeline_from_its_seed():
    again = models.load_pipeline("tiny", seed=1).unet.conv_in.weight
    assert torch.equal(again, models.tiny_sdxl_pipeline(seed=1).unet.conv_in.weight)
    assert not torch.equal(again, models.tiny_sdxl_pipeline(seed=0).unet.conv_in.weight)
