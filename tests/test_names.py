"""Every set of names in one list (safeexport/names.py): each registry holds exactly its list,
the command line offers exactly the configs' choices, and every config field a user may set
has its flag with the config's default, so a name or a field added in one place only fails
here (or at import)."""

import dataclasses

import click
import pytest

from commands.cli import main
from commands.cli.options import flag_name
from compressor.config import CompressConfig
from device_eval.config import EvalConfig
from exporters.config import ExportConfig
from safeexport import names
from safeexport.errors import ConfigError
from safeexport.registry import Registry


def _registries():
    from compressor.baselines import METHODS
    from compressor.regularizers import REGULARIZERS
    from compressor.strategies import GROW, PRUNE
    from device_eval import adb  # noqa: F401 - registers the phone's runtime
    from exporters.run import FORMATS
    from safeexport.attacks import ATTACKS
    from safeexport.attacks.threshold import THRESHOLD_ATTACKS
    from safeexport.data import DATASETS
    from safeexport.executors import EXECUTORS
    from safeexport.models import MODELS
    from safeexport.runtimes import RUNTIMES

    return [(METHODS.names(), names.BASELINES), (REGULARIZERS.names(), names.REGULARIZERS),
            (PRUNE.names(), names.PRUNE), (GROW.names(), names.GROW),
            (FORMATS.names(), names.FORMATS), (ATTACKS.names(), names.ATTACKS),
            (list(THRESHOLD_ATTACKS), names.THRESHOLD_ATTACKS),
            (DATASETS.names(), names.DATASETS), (EXECUTORS.names(), names.EXECUTORS),
            (MODELS.names(), names.MODELS), (RUNTIMES.names(), names.RUNTIMES[1:])]


def test_every_registry_holds_exactly_its_list():
    for registered, listed in _registries():
        assert tuple(registered) == listed


def test_a_registry_that_differs_from_its_list_refuses_to_load():
    reg = Registry("format")
    reg.register("onnx", object())
    with pytest.raises(RuntimeError, match=r"registered formats \['onnx'\] differ from"):
        reg.check(names.FORMATS)
    reg.register("tflite", object())
    reg.check(names.FORMATS)


# command -> (config, fields that command does not take, and why)
COMMANDS = {
    "compress": (CompressConfig, {}),
    "study": (CompressConfig, {"method": "a study's methods are --compare's"}),
    "export": (ExportConfig, {}),
    "evaluate": (EvalConfig, {}),
}


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands[command].params}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_has_its_flag_with_the_configs_default_and_choices(command):
    cls, skipped = COMMANDS[command]
    params = _params(command)
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            assert f.name not in params
            continue
        p = params[f.name]
        assert flag_name(f.name) in p.opts, (command, f.name, p.opts)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        # what the command passes on when the flag is not given is the config's default
        assert p.process_value(click.Context(main.commands[command]),
                               p.get_default(click.Context(main.commands[command]))) \
            == default, (command, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and not isinstance(default, list):
            assert list(p.type.choices) == [str(c) for c in choices], (command, f.name)


def test_every_choice_the_command_line_offers_is_a_list_of_names():
    lists = {tuple(map(str, v)) for k, v in vars(names).items()
             if k.isupper() and isinstance(v, tuple)}
    lists |= {("auto", *v) for v in lists}
    for command in main.commands.values():
        for p in command.params:
            if isinstance(p.type, click.Choice):
                assert tuple(p.type.choices) in lists, (command.name, p.name)


@pytest.mark.parametrize("cls", [CompressConfig, ExportConfig, EvalConfig])
def test_a_name_outside_its_list_is_refused_naming_the_list(cls):
    for name, choices in cls.choices().items():
        default = getattr(cls(), name)
        bad = ["nonesuch"] if isinstance(default, list) else "nonesuch"
        with pytest.raises(ConfigError, match=f"unknown {name.replace('_', ' ')} 'nonesuch'; "
                                              f"known: {', '.join(map(str, choices))}"):
            cls(**{name: bad})


def test_an_unknown_bit_width_is_refused_with_options_that_compare_it():
    # fine-tuning and asymmetric levels check the bit width: an unknown one is named, not
    # compared with 8
    with pytest.raises(ConfigError, match="unknown bits 'nonesuch'"):
        ExportConfig(bits="nonesuch", levels="asymmetric", finetune_epochs=3)


def test_the_help_names_every_dataset_model_and_method():
    text = {p.name: p.help for p in main.commands["compress"].params}
    assert all(d in text["dataset"] for d in names.DATASETS)
    assert all(m in text["model"] for m in names.MODELS)
    compare = _params("study")["methods"].help
    assert all(m in compare for m in names.METHODS)
