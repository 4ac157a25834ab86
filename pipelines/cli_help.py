"""How both CLIs show their options in `--help`: click's conventions, the same in every command.

typer 0.29 writes a required argument as `{store}` in the usage line, every value type as `<str>` /
`<list[str]>` and even a plain flag (`--fresh`, `--help`) as `<bool>`. `HelpCommand` (passed as
`cls=` to every `@app.command`) shows instead: arguments as upper-case names (`STORE`, optional ones
as `[STORE]`), values as TEXT / INTEGER / FLOAT, and flags with no value. Only the help text changes;
parsing is typer's own.
"""
from __future__ import annotations

from typer.core import TyperArgument, TyperCommand, TyperOption

_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN"}


def _value_metavar(param: TyperOption) -> str:
    """TEXT / INTEGER / FLOAT for a typed option ("" for a flag: it takes no value)."""
    if param.is_flag or param.is_bool_flag:
        return ""
    annotation = param.type_descriptor.annotation
    args = getattr(annotation, "__args__", None)
    name = getattr(args[0] if args else annotation, "__name__", "TEXT")
    return _TYPE_NAMES.get(name, name.upper())


def _set_metavars(params) -> None:
    for param in params:
        if param.metavar is not None:
            continue
        if isinstance(param, TyperArgument):
            param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx: None  # the name says it; no `<str>` beside it
        elif isinstance(param, TyperOption):
            param.metavar = _value_metavar(param)


class HelpCommand(TyperCommand):
    """A typer command whose help reads like click's: `STORE`, `TEXT`, flags without `<bool>`.

    `set_keys` maps flags a command does not take (timm's `--weight-decay`, ...) to the config key that
    `--set` takes instead; an unknown option among them gets that hint in its error.
    """

    set_keys: dict[str, str] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _set_metavars(self.params)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _set_metavars([option])
        return option

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        from typer._click.exceptions import NoSuchOption

        try:
            return super().parse_args(ctx, list(args))
        except NoSuchOption as e:
            name, _, inline = e.option_name.partition("=")
            key = self.set_keys.get(name)
            if key is not None:
                typed = [a.partition("=")[2] for a in args if a.startswith(name + "=")]
                value = inline or next(iter(typed), None) or next(
                    (args[i + 1] for i, a in enumerate(args[:-1]) if a == name), "VALUE")
                e.message = f"{e.message}; this command takes it as --set {key}={value}"
            raise

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or param.name.upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces
