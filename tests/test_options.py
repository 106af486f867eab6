"""The option table: one declaration per option, from which the parser, the checks and the RunConfig come."""

import dataclasses

import pytest

import main
from config import RunConfig
from conftest import kit, quick
from runner.options import OPTIONS, build_parser, to_config


def spec_fields() -> set[str]:
    inner = {f"{f.name}.{g.name}" for f in dataclasses.fields(RunConfig) if f.default_factory is not dataclasses.MISSING
             for g in dataclasses.fields(f.default_factory)}
    return inner | {f.name for f in dataclasses.fields(RunConfig)}


def test_every_option_fills_a_field_of_the_run_config_and_flags_are_unique():
    assert all(o.to in spec_fields() for o in OPTIONS)
    flags = [f for o in OPTIONS for f in (o.flag, *o.aliases)]
    assert len(flags) == len(set(flags))


def test_a_bare_command_line_gives_the_defaults_of_config_py():
    config = to_config(build_parser().parse_args(["--mode", "baseline"]), [])
    assert dataclasses.replace(config, command_line=()) == RunConfig(mode="baseline")


def test_every_option_reaches_its_field():
    argv = ["--mode", "importance", "--model", "m", "--num-remove", "3", "--metric", "angular", "--no-speed",
            "--seed", "7", "--protocol", "disjoint"]
    config = to_config(build_parser().parse_args(argv), argv)
    assert (config.data.model, config.select.num_remove, config.select.rule) == ("m", 3, "angular")
    assert config.speed.enabled is False and config.seed == config.heal.seed == 7
    assert config.windows.protocol == "disjoint"


def test_an_option_the_mode_ignores_is_an_error_or_for_older_ones_a_warning(model_dir, text_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--mode", "sequential", "--metric", "bi"])
    assert exit_info.value.code == 2 and "--metric is only used by --mode importance" in capsys.readouterr().err
    assert kit(model_dir, text_file, "--mode", "baseline", "--calib-tokens", "64", "--quiet", *quick(200)) == 0
    assert "--calib-tokens is only used by" in capsys.readouterr().err


def test_help_states_each_default_once_from_config_py():
    text = build_parser().format_help()
    assert "(default: 16384)" in text and "(default: 4)" in text  # --calib-tokens, --beam-width
