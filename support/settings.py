"""
Settings machinery: flat `key -> value` settings built in layers, each value remembering where it
came from, checked, and shown by `python train.py --help`. The settings themselves are declared once,
with their meaning, in train.py (TrainConfig), model.py (GPTConfig) and families.py (FamilyConfig,
GPTConfig's subclass); train.py's `setup` lists the layers in order. Nothing here touches a file but
the config files it reads.

    layered = Layered(declared(TrainConfig, FamilyConfig))     # every key, its declared default
    layered.apply("CPU preset", {...})                          # keys the user did not set
    cfg, model_cfg = layered.build(TrainConfig, FamilyConfig)   # checked; widths left at 0 derived
    print(layered.explain(notes(TrainConfig, GPTConfig, FamilyConfig)))  # value, origin, meaning of each
"""

import ast
import difflib
import inspect
import os
import re
import types
from dataclasses import asdict, fields

from support.rundir import UserError


def declared(*classes):
    """Every key --key=value accepts, with its declared default."""
    return {f.name: f.default for cls in classes for f in fields(cls)}


def notes(*classes):
    """Each setting's trailing comment where it is declared."""
    text = "".join(inspect.getsource(cls) for cls in classes)
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\w+)\s*:\s*\w+\s*=[^#\n]*#\s*(.*)$", text, re.M)}


def read_config_file(path):
    """The settings a config file assigns (a Python file of `key = value` lines)."""
    if not os.path.exists(path):
        raise UserError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a directory")
    try:
        code = compile(open(path, encoding="utf-8").read(), path, "exec")
    except SyntaxError as err:
        raise UserError(f"config file {path} line {err.lineno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {path} ({err})") from None
    scope = {}
    try:
        exec(code, {}, scope)
    except Exception as err:  # the user's code: report its line, not our traceback
        tb, line = err.__traceback__, "?"
        while tb is not None:
            line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else line
            tb = tb.tb_next
        raise UserError(f"config file {path} line {line} raised {type(err).__name__}: {err}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_")
            and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def coerce(key, value, defaults, origin):
    """value as the type of the setting's default (an int is accepted for a float)."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see python train.py --help"
        raise UserError(f"unknown setting '{key}' ({origin}); {hint}")
    want = type(defaults[key])
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise UserError(f"setting '{key}' expects {want.__name__}, got {value!r} ({origin})")
    return value


def parse_args(argv, defaults):
    """Config files, then --key=value -> [(origin, {key: value})] in the order they apply."""
    bare = [a for a in argv if a.startswith("--") and "=" not in a]
    if bare:  # checked first: `--n_layer 4` would otherwise read 4 as a config file
        raise UserError(f"expected --key=value, got '{bare[0]}'")
    layers = [(path, read_config_file(path)) for path in argv if not path.startswith("--")]
    cli = {}
    for arg in (a for a in argv if a.startswith("--")):
        key, _, raw = arg[2:].partition("=")
        try:
            cli[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            cli[key] = raw  # a bare word is a string
    layers.append(("command line", cli))
    return [(origin, {k: coerce(k, v, defaults, origin) for k, v in values.items()}) for origin, values in layers]


class Layered:
    """Flat settings with the origin of every value."""

    def __init__(self, defaults, origin="default"):
        self.defaults, self.values = defaults, dict(defaults)
        self.origin = {k: origin for k in defaults}
        self.explicit = set()   # keys set by a config file or the command line

    def apply(self, origin, values, explicit=False):
        """Set `values`; a layer that is not explicit leaves the keys the user set alone."""
        for key, value in values.items():
            if explicit or key not in self.explicit:
                self.values[key] = coerce(key, value, self.defaults, origin)
                self.origin[key] = origin
                self.explicit |= {key} if explicit else set()
        return self

    def build(self, *classes):
        """The dataclasses from the values (their checks run; ValueError becomes a UserError); a width
        that a class derives (0 = derived) is recorded with origin 'derived'."""
        try:
            built = [cls(**{f.name: self.values[f.name] for f in fields(cls)}) for cls in classes]
        except ValueError as err:
            raise UserError(str(err)) from None
        for obj in built:
            for key, value in asdict(obj).items():
                if value != self.values[key]:
                    self.values[key], self.origin[key] = value, "derived"
        return built

    def explain(self, meanings):
        """One line a setting: --key=value, where the value came from, what the setting is."""
        width = max(len(f"--{k}={v!r}") for k, v in self.values.items()) + 2
        return "\n".join(f"  {f'--{k}={v!r}':<{width}} {f'[{self.origin[k]}]':<24} {meanings.get(k, '')}"
                         for k, v in self.values.items())


class Finished(UserError):
    """Resuming a run that already took its max_iters steps: nothing to train."""


def resume_settings(settings, ckpt, path, model_keys, resumable):
    """On resume the checkpoint's settings replace the defaults; an explicit value that differs is
    refused unless its key is `resumable` (it would silently continue another experiment)."""
    saved = saved_settings(ckpt, settings.defaults, path, model_keys)
    settings.apply("checkpoint", saved)
    conflicts = [k for k in sorted(settings.explicit) if k not in resumable and settings.values[k] != saved.get(k)]
    if conflicts:
        raise UserError(f"resuming keeps the checkpoint's settings, but "
                        f"{', '.join(f'--{k}={settings.values[k]!r}' for k in conflicts)} differ from it "
                        f"({', '.join(f'{k}={saved.get(k)!r}' for k in conflicts)}); settings that may change on "
                        f"resume: {', '.join(resumable)}")
    if settings.values["max_iters"] <= ckpt["iter_num"]:
        raise Finished(f"the checkpoint is at iter {ckpt['iter_num']} and max_iters={settings.values['max_iters']}: "
                       f"nothing to train (give a larger --max_iters)")


def saved_settings(ckpt, defaults, path, model_keys):
    """The settings stored in a checkpoint, checked like the command line (model_args wins)."""
    config, model_args = ckpt["config"], ckpt["model_args"]
    if not isinstance(config, dict) or not isinstance(model_args, dict):
        raise UserError(f"checkpoint {path} has no settings (config/model_args are not dicts)")
    unknown = sorted(set(model_args) - set(model_keys))
    if unknown:
        raise UserError(f"checkpoint {path} has model settings this version does not know: {', '.join(unknown)}")
    merged = {k: v for k, v in config.items() if k in defaults}  # settings retired since are ignored
    merged.update(model_args)
    return {k: coerce(k, v, defaults, path) for k, v in merged.items()}
