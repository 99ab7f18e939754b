"""
Settings from config files and the command line, for train.py, sample.py and finetune.py.

    python train.py config/quickstart.py --batch_size=16 --learning_rate=3e-4

A script keeps its settings as plain globals with defaults, then calls
    globals().update(configure(settings_of(globals()), sys.argv[1:]))
Each argument is either a config file -- plain Python that assigns some of those globals -- or
--key=value (--flag alone sets a boolean to True), applied in order, so later ones win. Values are Python
literals (parsed with ast.literal_eval; anything that is not a literal is taken as a string) and must have
the default's type (an int is accepted where a float is expected; None only where the default is None).
An unknown key is an error that names the closest ones. UPPER_CASE globals are a script's constants, not
settings. --help (or -h) prints the script's docstring and every setting with its default and its comment,
read from the script's own settings block, and exits.
"""
import ast
import difflib
import inspect
import io
import os
import shutil
import sys
import textwrap
import tokenize

SETTING_TYPES = (bool, int, float, str, tuple, list, type(None))


class ConfigError(ValueError):
    pass


def settings_of(namespace: dict) -> dict:
    """The configurable globals of a script: public, not UPPER_CASE, names bound to plain values."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, SETTING_TYPES)}


def _assignments(namespace: dict, path: str) -> dict:
    """The settings a config file assigns: its public names, less its imports, functions and constants."""
    settings = {}
    for key, value in namespace.items():
        if key.startswith("_") or key.isupper() or inspect.ismodule(value) or callable(value):
            continue
        if not isinstance(value, SETTING_TYPES):
            raise ConfigError(f"in {path}: {key} is a {type(value).__name__}; a setting is a bool, int, float, "
                              "str, tuple, list or None")
        settings[key] = value
    return settings


def require_at_least(minimum, **settings):
    """A ConfigError naming the first of these settings below minimum: 1 for a count or an interval, 0 for
    a number of iterations."""
    for key, value in settings.items():
        if value < minimum:
            raise ConfigError(f"{key}={value!r} must be {'positive' if minimum == 1 else f'{minimum} or more'}")


def _unknown_key(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _checked(key, value, default):
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{key} cannot be None (its default is {default!r})")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{key} must be {type(default).__name__} like its default {default!r}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _parse_value(text: str):
    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)
    except Exception:  # ValueError, SyntaxError, TypeError ({[1]: 2}), RecursionError, MemoryError
        return text  # a bare word, e.g. --device=cuda


def _command_line_form(value) -> str:
    return value if isinstance(value, str) and value else repr(value)


def help_text(script_path: str, defaults: dict) -> str:
    """The usage line, the script's docstring, then each setting as --key=default and its comment, in the
    groups of the script's settings block: the `# --- settings` ruler to the next `# ---` ruler, where a
    comment line of its own starts a group and one indented after the `#` continues the setting above it."""
    with open(script_path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    assigned = {node.lineno: node.targets[0].id for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in defaults}
    lines = source.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("# --- settings")), 1)
    end = next((i + 1 for i, line in enumerate(lines) if i + 1 > start and line.startswith("# ---")), len(lines))
    groups, described = [("settings", [])], set()  # [(title, [[key, comment], ...])]
    for lineno in range(start + 1, end):
        comment = comments.get(lineno, "")
        if lineno in assigned:
            key = assigned[lineno]
            groups[-1][1].append([key, comment.lstrip("#").strip()])
            described.add(key)
        elif comment and lines[lineno - 1].lstrip() == lines[lineno - 1]:  # a comment line of its own
            if comment.startswith("#  ") and groups[-1][1]:
                groups[-1][1][-1][1] += " " + comment.lstrip("#").strip()
            else:
                groups.append((comment.lstrip("#").strip(), []))
    rest = [[key, ""] for key in defaults if key not in described]  # set elsewhere in the script
    groups.append(("other", rest))

    name = os.path.basename(script_path)
    width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    out = [f"usage: {name} [-h] [CONFIG.py ...] [--key=value ...]", "", (ast.get_docstring(tree, clean=False) or "").strip()]
    for title, entries in groups:
        if not entries:
            continue
        out += ["", f"{title}:"]
        for key, comment in entries:
            left = f"  --{key}={_command_line_form(defaults[key])}"
            if not comment:
                out.append(left)
            elif len(left) <= 32:
                out += textwrap.wrap(comment, width, initial_indent=left.ljust(34), subsequent_indent=" " * 34)
            else:
                out += [left] + textwrap.wrap(comment, width, initial_indent=" " * 34, subsequent_indent=" " * 34)
    return "\n".join(out) + "\n"


def configure(defaults: dict, argv, script_path: str = "") -> dict:
    """Apply config files and --key=value overrides in argv to defaults; return all settings. With -h or
    --help in argv, print help_text(script_path, defaults) and exit 0."""
    if "-h" in argv or "--help" in argv:
        if not script_path:
            raise ConfigError("--help: this program has no help text")
        sys.stdout.write(help_text(script_path, defaults))
        raise SystemExit(0)
    settings = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (arguments are config files or --key=value)")
            namespace = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in _assignments(namespace, arg).items():
                if key not in settings:
                    raise ConfigError(f"in {arg}: " + str(_unknown_key(key, settings)))
                settings[key] = _checked(key, value, defaults[key])
        else:
            key, sep, text = arg[2:].partition("=")
            if key not in settings:
                raise _unknown_key(key, settings)
            if not sep:
                if not isinstance(defaults[key], bool):
                    raise ConfigError(f"expected --{key}=value, got {arg!r}")
                text = "True"  # --show_probs is --show_probs=True
            value = _parse_value(text)
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # --out_dir=2024 is the string "2024"
            settings[key] = _checked(key, value, defaults[key])
    return settings
