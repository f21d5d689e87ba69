"""Option ranges (fdcache.options): declared once, checked in the config classes and at the top
of the library calls, so the CLI and the Python API refuse the same values, naming the option
as typed, before any work. The API takes the CLI's names. Docs name only options that exist."""

import math
import re
from pathlib import Path

import pytest
import typer

import fdcache
from fdcache.cli.app import app
from fdcache.config import FinetuneConfig, TrainConfig
from fdcache.distill.extract import ExtractConfig
from fdcache.errors import ConfigError, FdcacheError
from fdcache.options import RANGES, flag_of
from fdcache.tools.bench import BenchConfig
from fdcache.tune.evaluate import evaluate_run
from fdcache.tune.finetune import make_config

ROOT = Path(__file__).resolve().parents[1]


def train_cfg(**kw):
    return TrainConfig(out="run", cache="s.zarr", steps=1, **kw)


def finetune_cfg(**kw):
    return make_config("ft-clip-vit-b16", out="run", data="images", steps=1, **kw)


@pytest.mark.parametrize("make", [train_cfg, finetune_cfg])
@pytest.mark.parametrize("field,value", [("ema_decay", 5.0), ("weight_decay", -1.0), ("warmup_epochs", -3.0),
                                         ("clip_grad", -1.0)])
def test_float_options_out_of_range_are_refused_naming_the_option(make, field, value):
    with pytest.raises(ConfigError, match=re.escape(f"({flag_of(field)})")):
        make(**{field: value})


@pytest.mark.parametrize("make", [train_cfg, finetune_cfg])
@pytest.mark.parametrize("field,value,flag", [("base_lr", -1.0, "--lr"), ("base_lr", math.nan, "--lr"),
                                              ("drop_path", 1.5, "--drop-path")])
def test_values_the_optimizer_or_torch_would_choke_on_are_refused_first(make, field, value, flag):
    with pytest.raises(ConfigError, match=f"\\({flag}\\)"):
        make(**{field: value})


@pytest.mark.parametrize("make", [train_cfg, finetune_cfg,
                                  lambda **kw: ExtractConfig(data="d", out="o", teacher="t", **kw),
                                  lambda **kw: BenchConfig(student="s", teacher="t", **kw)])
def test_resolution_has_an_upper_bound(make):
    with pytest.raises(ConfigError, match=r"100000 is out of range \(--resolution\): give an integer from 16 to 2048"):
        make(resolution=100000)


def test_eval_checks_its_options_before_loading_anything(tmp_path):
    with pytest.raises(ConfigError, match="--resolution"):
        evaluate_run([str(tmp_path)], model="no-such-model-is-loaded", resolution=100000)


def test_every_numeric_config_field_has_a_documented_range():
    from dataclasses import fields

    for cls in (TrainConfig, FinetuneConfig, ExtractConfig, BenchConfig):
        for f in fields(cls):
            if re.search(r"\b(int|float)\b", str(f.type)) and f.name not in ("level",):
                assert f.name in RANGES, f"{cls.__name__}.{f.name} has no range in fdcache.options.RANGES"


def readme_range_rows() -> list[str]:
    """The README's "Option ranges" table as fdcache.options.RANGES and the CLI define it."""
    on_cli = set().union(*_command_options().values())
    return [f"| `{name}` | {f'`{flag_of(name)}`' if flag_of(name) in on_cli else '(Python API only)'} | {rng} |"
            for name, rng in RANGES.items()]


def test_the_readme_lists_every_range_as_checked():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Option ranges"):]
    missing = [row for row in readme_range_rows() if row not in table]
    assert not missing, "\n".join(missing)


def test_the_api_takes_the_clis_option_names(monkeypatch):
    import fdcache.distill.train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda cfg: seen.setdefault("cfg", cfg))
    fdcache.train(out="run", cache="s.zarr", steps=1, threads=1, lr=1e-3, student_arg=["depth=2", "patch_size=8"])
    cfg = seen["cfg"]
    assert cfg.num_threads == 1 and cfg.base_lr == 1e-3 and cfg.student_overrides == {"depth": 2, "patch_size": 8}
    seen.clear()
    fdcache.train(out="run", cache="s.zarr", steps=1, num_threads=2, base_lr=2e-3)  # the config's names too
    assert seen["cfg"].num_threads == 2 and seen["cfg"].base_lr == 2e-3
    with pytest.raises(fdcache.errors.FdcacheError, match="same option"):
        fdcache.train(out="run", cache="s.zarr", steps=1, lr=1e-3, base_lr=1e-3)


def test_the_finetune_api_takes_the_clis_names_too():
    from fdcache.api import _fields

    cfg = make_config("ft-clip-vit-b16", out="run", data="images", **_fields({"lr": 1e-3, "reprob": 0.1}))
    assert cfg.base_lr == 1e-3 and cfg.re_prob == 0.1


def _command_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {name: {o for p in c.params for o in [*p.opts, *getattr(p, "secondary_opts", [])]} | {"--help"}
            for name, c in group.commands.items()}


def test_docs_and_docstrings_name_only_options_their_command_has():
    options = _command_options()
    mention = re.compile(r"fdcache (" + "|".join(options) + r")\b([^`\n]*)")
    files = [*(ROOT / "fdcache").rglob("*.py"), *(ROOT / "cli").rglob("*.py"), ROOT / "README.md",
             *(ROOT / "docs").glob("*.md")]
    wrong = []
    for f in files:
        for m in mention.finditer(f.read_text()):
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2)):
                if flag not in options[m.group(1)]:
                    wrong.append(f"{f.relative_to(ROOT)}: fdcache {m.group(1)} {flag}")
    assert not wrong, wrong


@pytest.mark.parametrize("field, value, option", [("codec", "int3", "--codec"), ("compressor", "lz4", "--compressor"),
                                                  ("policy", "foo", "--views")])
def test_a_bad_codec_compressor_or_view_name_names_its_own_option(field, value, option):
    from fdcache.distill.extract import ExtractConfig

    with pytest.raises(ConfigError, match=f"\\({option}\\)") as e:
        ExtractConfig(data="d", out="o", teacher="t", **{field: value})
    others = {"--codec", "--compressor", "--views"} - {option}
    assert not any(o in str(e.value) for o in others), e.value  # that option only


def test_the_api_names_both_spellings_of_one_option_as_given():
    import fdcache

    with pytest.raises(FdcacheError, match="^lr and base_lr are the same option"):
        fdcache.train(out="o", cache="c", lr=1e-3, base_lr=2e-3)
