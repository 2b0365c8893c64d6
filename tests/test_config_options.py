"""Every option declared once: the QuantConfig fields, their groups, the flags the command derives from them,
and the flat dict a QDIR stores."""

from __future__ import annotations

import dataclasses
import json

import click
import pytest

import cli
from turboboa.config import QDIR_KEYS, QuantConfig
from turboboa.configs import (
    ActivationConfig,
    CalibrationConfig,
    GridConfig,
    MethodConfig,
    PaddingConfig,
    RotationConfig,
)
from turboboa.configs.option import OPTION, cli_options
from turboboa.configs.solvers import METHOD_CONFIGS
from turboboa.errors import UserError

from .conftest import assert_one_line_error, run_main

GROUPS = (MethodConfig, GridConfig, PaddingConfig, *METHOD_CONFIGS.values(), RotationConfig, ActivationConfig,
          CalibrationConfig)
COMMAND_OPTIONS = {"device", "act_scope", "resume"}  # quantize options that are no QuantConfig field


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def command_params(name: str) -> dict[str, click.Option]:
    """The options of ``turboboa NAME`` by parameter name."""
    return {p.name: p for p in cli.app.commands[name].params if isinstance(p, click.Option)}


def parse(*args: str) -> dict:
    """The parsed parameters of ``turboboa quantize ARGS -o Q``."""
    command = cli.app.commands["quantize"]
    with command.make_context("quantize", [*args, "-o", "Q"]) as ctx:
        return dict(ctx.params)


def test_every_field_is_declared_once_in_one_group() -> None:
    """QuantConfig has no field of its own: each is one group's, declared with option(), and the groups
    together are exactly QuantConfig's fields."""
    fields = field_names(QuantConfig)
    assert fields == set().union(*(field_names(g) for g in GROUPS))
    assert all(OPTION in f.metadata for f in dataclasses.fields(QuantConfig))
    own = set(QuantConfig.__dict__.get("__annotations__", {}))
    assert not own


@pytest.mark.parametrize("command", ["quantize", "run"])
def test_every_field_is_one_option_of_the_command_with_its_declared_help_and_default(command) -> None:
    params = command_params(command)
    options = cli_options(QuantConfig)
    assert len(options) == len(field_names(QuantConfig))
    names = [opt.param for opt in options]
    assert len(set(names)) == len(names)  # one flag per field, no flag for two
    flags = [f for p in params.values() for f in (*p.opts, *p.secondary_opts)]
    assert len(set(flags)) == len(flags)
    assert COMMAND_OPTIONS <= set(params) and not COMMAND_OPTIONS & set(names)
    defaults = parse()
    for opt in options:
        param = params[opt.param]
        assert param.help == opt.help, opt.name
        assert "/".join((*param.opts, *param.secondary_opts)) == opt.flags, opt.name
        assert bool(param.show_default) == opt.shows_default, opt.name
        assert defaults[opt.param] == (False if opt.is_switch else None if opt.option.read else opt.default), opt.name
        if opt.option.choices:
            assert tuple(param.type.choices) == opt.option.choices, opt.name


def test_quantize_help_shows_the_declared_help_and_defaults(capsys) -> None:
    help_text = run_main("quantize", "--help", capsys=capsys).stdout
    text, bare = " ".join(help_text.split()), "".join(help_text.split())  # bare: wrapped at hyphens too
    for opt in cli_options(QuantConfig):
        assert f"{opt.flags.split('/')[0]} " in text, opt.name
        assert "".join(opt.help.split()) in bare, opt.name
    assert "--damp FLOAT damping, share of mean diag [default: 0.05]" in text
    assert "--method [rtn|gptq|boa|turboboa]" in text and "[default: turboboa]" in text


def test_the_command_line_without_options_is_the_default_config() -> None:
    assert cli.quant_config(parse()) == QuantConfig()


def test_every_flag_sets_its_field() -> None:
    """Each boolean flag and each choice reaches its field; flags named unlike their field included."""
    default = QuantConfig()
    for opt in cli_options(QuantConfig):
        if opt.type is bool:
            flag = opt.flags if opt.is_switch else opt.flags.split("/")[1]
            assert getattr(cli.quant_config(parse(flag)), opt.name) is (not opt.default), opt.name
        for choice in opt.option.choices:
            if choice != opt.default:
                assert getattr(cli.quant_config(parse(opt.flags, choice)), opt.name) == choice, opt.name
    cfg = cli.quant_config(parse("--damp", "0.2", "--format", "Q4_K", "--tensor-format", "*.q_proj=q8_0",
                                 "--tensor-format", "*.k_proj=q6_k", "--kv-bits", "8", "--act-bits", "4"))
    assert (cfg.percdamp, cfg.format, cfg.tensor_formats) == (0.2, "q4_k", ("*.q_proj=q8_0", "*.k_proj=q6_k"))
    assert (cfg.kv_bits, cfg.dyn_act_bits) == (8, 4) and default.kv_bits == default.dyn_act_bits == 16


@pytest.mark.parametrize("args,dyn_bits,static_bits", [
    ((), 16, None), (("--act-bits", "4"), 4, None), (("--act-bits", "8"), 16, 8),
    (("--act-bits", "8", "--act-scope", "token"), 8, None), (("--act-bits", "8", "--kv-bits", "8"), 8, None),
    (("--act-bits", "16", "--act-scope", "graph"), 16, 16),
])
def test_act_bits_is_per_token_or_static_by_the_scope(args, dyn_bits, static_bits) -> None:
    params = parse(*args)
    assert cli.quant_config(params).dyn_act_bits == dyn_bits and cli.activation_scheme(params)[1] == static_bits


def test_a_value_outside_a_closed_set_is_one_line(capsys) -> None:
    assert_one_line_error(run_main("quantize", "--method", "sgd", "-o", "Q", capsys=capsys), "--method", "sgd")
    with pytest.raises(UserError, match="unknown method 'sgd'"):
        QuantConfig(method="sgd")  # the Python API checks what click.Choice checks on the command line


def test_the_qdir_dict_is_flat_in_its_fixed_order_and_loads_back() -> None:
    cfg = QuantConfig(method="gptq", format="q4_k", tensor_formats=["*.q_proj=q8_0"], kv_bits=8, act_order=False)
    d = cfg.to_dict()
    assert tuple(d)[:len(QDIR_KEYS)] == QDIR_KEYS and set(d) == field_names(QuantConfig)  # new fields follow
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == cfg
    older = {k: v for k, v in d.items() if k != "block_size"} | {"a_retired_option": 1}
    assert QuantConfig.from_dict(older) == cfg


def test_each_group_checks_its_own_fields() -> None:
    with pytest.raises(UserError, match="--damp -1"):
        METHOD_CONFIGS["gptq"](percdamp=-1)
    with pytest.raises(UserError, match="--rows"):
        METHOD_CONFIGS["turboboa"](rows=0)
    with pytest.raises(UserError, match="--pad-to 33"):
        PaddingConfig(pad_to=33)
    with pytest.raises(UserError, match="--nsamples"):
        CalibrationConfig(nsamples=0)
    with pytest.raises(UserError, match="--online-rotate 'up'"):
        RotationConfig(online_rotate="up")
    assert RotationConfig(online_rotate="qk,down").online_rotate == "down,qk"
    assert GridConfig(format="LPBQ4").group_size == 32
