"""A configuration field that is also a command-line option: :func:`option` declares both at once.

A field declared with :func:`option` carries, besides its type and default, the facts ``--help`` shows (its
help text, its flag, the closed set of values it takes) and, where the command line says it another way, how
the field's value is read from the parsed flags. ``cli.py`` derives the click options of ``turboboa
quantize``/``run`` from :func:`cli_options` and builds the configuration back with
:meth:`OptionGroup.from_options`; nothing else lists the options."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

OPTION = "turboboa.option"  # the key of a field's metadata that holds its Option

G = TypeVar("G", bound="OptionGroup")


@dataclass(frozen=True)
class Option:
    """The command-line side of a configuration field.

    ``help``: what the option means (its ``--help`` text). ``flag``: its flag when it is not ``--<field-name>``;
    for a boolean either a pair ``--on/--off`` or one flag that turns the field away from its default
    (``--no-dx`` turns ``use_dx`` off, ``--sym`` turns ``sym`` on). ``choices``: the closed set of values it
    takes, if it has one. ``metavar``: the name of its value in ``--help``. ``read``: for a flag whose value is
    not the field's own: the field's value from every parsed flag (keyed by :attr:`CliOption.param`); such a
    flag defaults to None, not given."""

    help: str
    flag: str = ""
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    read: Callable[[Mapping[str, Any]], Any] | None = None


def option(default: Any, help: str, *, flag: str = "", choices: Sequence[str] = (), metavar: str | None = None,
           read: Callable[[Mapping[str, Any]], Any] | None = None) -> Any:
    """A field of a configuration dataclass with default ``default`` that is also the command-line option
    described by the other arguments (:class:`Option`)."""
    return dataclasses.field(default=default,
                             metadata={OPTION: Option(help, flag, tuple(choices), metavar, read)})


@dataclass(frozen=True)
class CliOption:
    """A configuration field as the command line takes it: ``name`` (the field), its declaration ``option``,
    ``type`` (of its value, or of each value of a ``multiple`` one, a tuple field) and ``default`` (the
    field's)."""

    name: str
    option: Option
    type: type
    default: Any
    multiple: bool = False

    @property
    def help(self) -> str:
        return self.option.help

    @property
    def flags(self) -> str:
        """``--flag``, or ``--on/--off`` for a boolean pair."""
        return self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def param(self) -> str:
        """The name of the parsed value: the (first) flag's, as click names it (``--no-dx``: ``no_dx``)."""
        return self.flags.split("/")[0].lstrip("-").replace("-", "_")

    @property
    def is_switch(self) -> bool:
        """A single flag that turns a boolean field away from its default."""
        return self.type is bool and "/" not in self.flags

    @property
    def shows_default(self) -> bool:
        """Whether ``--help`` shows the default: not for a switch, a flag read another way (its default is
        "not given") or an empty default."""
        return not self.is_switch and self.option.read is None and self.default not in (None, "", ())

    def value(self, given: Mapping[str, Any]) -> Any:
        """The field's value from the parsed flags ``given``."""
        if self.option.read is not None:
            return self.option.read(given)
        value = given[self.param]
        if self.is_switch:
            return (not self.default) if value else self.default
        return tuple(value) if self.multiple else value


def _value_type(hint: Any) -> tuple[type, bool]:
    """The type of a field's value on the command line, and whether the option repeats: ``int | None`` is
    ``int``, ``tuple[str, ...]`` a repeatable ``str``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def cli_options(cls: type) -> list[CliOption]:
    """The command-line options of the configuration dataclass ``cls``: each field declared with
    :func:`option`, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if OPTION in f.metadata:
            value_type, multiple = _value_type(hints[f.name])
            out.append(CliOption(f.name, f.metadata[OPTION], value_type, f.default, multiple))
    return out


@dataclass(frozen=True)
class OptionGroup:
    """Base of the configuration groups (:mod:`turboboa.configs`): frozen dataclasses whose fields are declared
    with :func:`option`. Each group's ``__post_init__`` calls ``super().__post_init__()`` first, then checks
    (and normalizes) its own fields, so a configuration made of several groups checks each field once, in
    the order of its fields."""

    def __post_init__(self) -> None:
        """The end of the chain of checks."""

    @classmethod
    def of(cls: type[G], config: OptionGroup) -> G:
        """This group with its fields taken from ``config``, a configuration that holds them (a
        :class:`~turboboa.config.QuantConfig`)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_options(cls: type[G], given: Mapping[str, Any]) -> G:
        """This configuration from parsed command-line flags ``given`` (keyed by :attr:`CliOption.param`):
        every field read from its option."""
        return cls(**{o.name: o.value(given) for o in cli_options(cls)})
