"""Model.fit's frostline options are typed keywords; the cache options travel as one
CacheOptions object, unchanged, from Model.fit, two_phase and the CLI to the runner."""

from __future__ import annotations

import inspect
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.app import cli
from frostline.engine import trainer as trainer_mod
from frostline.engine.fit_options import FitOptions

KERAS = [
    "x",
    "y",
    "batch_size",
    "epochs",
    "verbose",
    "callbacks",
    "validation_split",
    "validation_data",
    "shuffle",
    "class_weight",
    "sample_weight",
    "initial_epoch",
    "steps_per_epoch",
    "validation_steps",
    "validation_batch_size",
    "validation_freq",
]


def small_model() -> fl.Model:
    torch.manual_seed(0)
    model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    model.layers[0].trainable = False
    model.compile(optimizer="sgd", loss="mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    return x, np.zeros((16, 2), np.float32)


@pytest.fixture
def received(monkeypatch) -> list[FitOptions]:
    """The FitOptions each Trainer.fit gets."""
    seen: list[FitOptions] = []
    real = trainer_mod.Trainer.fit

    def spy(self, x=None, y=None, options=None):
        seen.append(options)
        return real(self, x, y, options)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", spy)
    return seen


def test_every_fit_option_is_a_typed_keyword_with_the_engine_defaults():
    params = inspect.signature(fl.Model.fit).parameters
    ours = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    engine = [f.name for f in fields(FitOptions) if f.name not in KERAS]
    cache = list(fl.CacheOptions.names())
    assert sorted(ours) == sorted(engine + cache)
    assert all(params[n].annotation is not inspect.Parameter.empty for n in ours)
    default = fl.CacheOptions()
    for name in cache:
        assert params[name].default == getattr(default, name), name
    for f in fields(FitOptions):
        if f.name in ours and f.name not in ("unfreeze_next", "cache_options"):
            assert params[f.name].default == f.default, f.name
    assert list(params)[: len(KERAS) + 1] == ["self", *KERAS]  # Keras's order, positional


def test_an_unknown_keyword_is_a_type_error_naming_the_valid_ones():
    model = small_model()
    with pytest.raises(TypeError) as err:
        model.fit(*data(), cache_memory=1 << 20, verbose=0)
    text = str(err.value)
    assert "'cache_memory' (did you mean 'cache_memory_bytes'?)" in text
    assert "fit takes: x, y, batch_size" in text and "cache_options" in text
    with pytest.raises(TypeError, match="'colour'; fit takes: x, y"):
        model.fit(*data(), colour="blue", verbose=0)


def test_cache_options_arrive_at_the_runner_unchanged(received):
    opts = fl.CacheOptions(cache_memory_bytes=1 << 20, cache_dtype=torch.float16)
    model = small_model()
    model.fit(*data(), epochs=1, verbose=0, cache_options=opts)
    assert received[-1].cache_options is opts
    assert model._trainer.runner.options is opts
    assert model.cache_status["train"].cached


def test_cache_keywords_make_one_options_object():
    model = small_model()
    model.fit(*data(), epochs=1, verbose=0, cache=False, cache_memory_bytes=1 << 20)
    options = model._trainer.runner.options
    assert options == fl.CacheOptions(cache=False, cache_memory_bytes=1 << 20)
    assert str(model.cache_status["train"]) == "off (cache=False)"


def test_cache_options_and_cache_keywords_together_are_refused():
    model = small_model()
    with pytest.raises(TypeError, match="not both \\(got cache_options and cache\\)"):
        model.fit(*data(), verbose=0, cache=False, cache_options=fl.CacheOptions())
    with pytest.raises(TypeError, match="cache_options must be a CacheOptions, got dict"):
        model.fit(*data(), verbose=0, cache_options={"cache": False})


@pytest.mark.parametrize(
    ("keyword", "value", "error", "says"),
    [
        ("cache_memory_bytes", "big", ValueError, "cache_memory_bytes must be an int >= 0"),
        ("cache_memory_bytes", -5, ValueError, "got -5"),
        ("cache_memory_bytes", True, ValueError, "got True"),
        ("cache_dtype", "float16", TypeError, "floating-point torch.dtype"),
        ("cache_dtype", torch.int8, TypeError, "got torch.int8"),
        ("cache_dir", 3, TypeError, "cache_dir must be None, a str or an os.PathLike"),
    ],
)
def test_a_bad_cache_option_is_refused_before_training(keyword, value, error, says):
    model = small_model()
    before = [p.detach().clone() for p in model.module.parameters()]
    with pytest.raises(error, match=says):
        model.fit(*data(), epochs=1, verbose=0, **{keyword: value})
    with pytest.raises(error, match=says):
        fl.CacheOptions(**{keyword: value})
    assert all(torch.equal(a, b) for a, b in zip(before, model.module.parameters()))


def test_good_cache_options_are_kept_as_given(tmp_path):
    opts = fl.CacheOptions(cache_memory_bytes=0, cache_dtype=torch.bfloat16, cache_dir=tmp_path)
    assert (opts.cache_memory_bytes, opts.cache_dtype, opts.cache_dir) == (
        0,
        torch.bfloat16,
        tmp_path,
    )
    assert fl.CacheOptions(cache_dir=str(tmp_path)).cache_dir == str(tmp_path)


def two_phase_model() -> tuple[fl.Model, fl.Model]:
    torch.manual_seed(0)
    base = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), name="base")
    return fl.Sequential([base, nn.ReLU(), nn.Linear(8, 2)]), base


@pytest.mark.parametrize("how", ["keywords", "object"])
def test_two_phase_gives_both_fits_one_options_object(received, how):
    model, base = two_phase_model()
    x, _ = data()
    y = np.arange(16) % 2
    opts = fl.CacheOptions(cache_memory_bytes=1 << 20)
    kwargs = {"cache_memory_bytes": 1 << 20} if how == "keywords" else {"cache_options": opts}
    fl.recipes.two_phase(
        model, base, x, y, loss="sparse_categorical_crossentropy", verbose=0, **kwargs
    )
    first, second = (o.cache_options for o in received)
    assert first is second and first == opts
    if how == "object":
        assert first is opts
    assert model._trainer.runner.options is first


FACTORY = """
from torch import nn

def build(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, num_classes))
"""


def test_the_cli_builds_one_options_object_for_both_phases(tmp_path, monkeypatch, capsys, received):
    (tmp_path / "keywords_factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    x = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(16) % 2)
    argv = ["fit", "d.npz", "--model", "keywords_factory:build", "--epochs1", "1"]
    argv += ["--epochs2", "1", "--unfreeze-last", "1", "--out", str(tmp_path / "run")]
    try:
        code = cli.main(argv)
    finally:
        sys.modules.pop("keywords_factory", None)  # another test's factory may share a name
    assert code == 0, capsys.readouterr().err
    assert len(received) == 2
    first, second = (o.cache_options for o in received)
    assert first is second and first == fl.CacheOptions()
