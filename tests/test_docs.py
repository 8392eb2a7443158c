"""The README's flag table (section "## Flags") against config.py: every flag is in it, it names no flag that
does not exist, and its defaults are the real ones.

Rows are `| flags | default | meaning |`. The flag cell names one or more flags (`--user_col` `--item_col`, a
`--no-X` or an alias beside its flag); the default cell gives one default for all of them, or one per flag
separated by " / " (`on / off`). A default cell is read as:
  a number, or a `backticked` value   the field's default (a list as its items joined by spaces); a field
                                      whose default is None is compared with what build_config([]) resolves
                                      it to (--loss: `bce`); a `<template>` (`runs/<data>_...`) is filled in
                                      at run time: the default must be None
  (env `NAME`), env `NAME`, ...       the field's environment variable(s), in the flags' order; the value
                                      before it is the field's fallback (`.cache`), relative to the repository
  on / off                            True / False
  empty, none                         no value: None, an empty list or an empty string
  a word of WORDS                     a default decided at run time: compared with what WORDS says it is
Anything else fails, so a new way of writing a default must be added here, with what it is compared with.
"""
import dataclasses
import os
import re

import pytest

import config
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
WORDS = {  # defaults given in words: the field's default they stand for
    "detect": None,    # --data_format, --user_col ...: detected from the file
    "by loss": None,   # --similarity: cosine for infonce, dot otherwise (build_config)
    "all": None,       # --item_feature_ids, --positive_actions, ...: every feature / action in the data
    "pre-norm": True,  # --norm_first
}
NOTHING = ("", "none")
ENV = re.compile(r"\(?env ((?:`[A-Z][A-Z0-9_]*`(?:, )?)+)\)?")


def flag_rows():
    """[(line number, flag cell, default cell, whole row)] of the table under "## Flags"."""
    with open(README) as f:
        lines = f.read().splitlines()
    start = lines.index("## Flags")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows = []
    for n in range(start, end):
        line = lines[n]
        if line.startswith("| `--"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == 3, f"README.md:{n + 1}: a flag row has 3 cells: {line}"
            rows.append((n + 1, cells[0], cells[1], line))
    assert len(rows) > 40, "the flag table was not found under '## Flags'"
    return rows, lines[start:end]


@pytest.fixture(scope="module")
def parser_flags():
    """{option string: argparse action} of main.py's parser."""
    return {o: a for a in config.build_parser()._actions for o in a.option_strings if a.dest != "help"}


def named(cell):
    return re.findall(r"`(--[A-Za-z][\w-]*)", cell)


def row_dests(cell, parser_flags):
    """The config fields a flag cell names, in order (a --no-X or an alias is its flag's field)."""
    dests = []
    for f in named(cell):
        dest = parser_flags[f].dest if f in parser_flags else f  # an unknown flag: the next test names it
        if dest not in dests:
            dests.append(dest)
    return dests


def test_every_flag_is_in_the_table_once(parser_flags):
    rows, _ = flag_rows()
    listed = [d for _, cell, _, _ in rows for d in row_dests(cell, parser_flags)]
    dests = {a.dest for a in parser_flags.values()}
    assert not dests - set(listed), f"flags missing from README.md's flag table: {sorted(dests - set(listed))}"
    twice = sorted({d for d in listed if listed.count(d) > 1})
    assert not twice, f"flags in more than one row of README.md's flag table: {twice}"
    sections = {f.name for cls in config.SECTIONS.values() for f in dataclasses.fields(cls) if f.metadata}
    assert sections | {"config", "use_infonce"} == dests  # what the parser is made of, as the docstring says


def test_every_flag_the_table_names_exists(parser_flags):
    _, section = flag_rows()
    table = [line for line in section if line.startswith("|")]
    unknown = sorted({f for line in table for f in re.findall(r"(--[A-Za-z][\w-]*)", line)} - set(parser_flags))
    assert not unknown, f"README.md's flag table names flags that do not exist: {unknown}"


def expected_default(dest, parser_flags):
    field = config.FIELDS.get(dest)
    if field is not None:
        return field.default
    return next(a.default for a in parser_flags.values() if a.dest == dest)  # --config, --use_infonce


def shown(value):
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_default(dest, text, parser_flags, resolved, env=False):
    """None if `text` states `dest`'s default, else what is wrong. `env`: the cell named the flag's environment
    variable, so a value before it is the field's fallback."""
    default = expected_default(dest, parser_flags)
    meta = config.FIELDS[dest].metadata if dest in config.FIELDS else {}
    if env and "fallback" in meta:
        default = os.path.relpath(meta["fallback"], config.ROOT)
    if text in NOTHING:
        return None if default in (None, (), "") else f"no default given, config.py has {default!r}"
    if text in ("on", "off"):
        return None if default is (text == "on") else f"{text}, config.py has {default!r}"
    if text in WORDS:
        return None if default == WORDS[text] else f"{text!r} means {WORDS[text]!r}, config.py has {default!r}"
    value = re.fullmatch(r"`([^`]*)`", text)
    if value and "<" in value[1]:  # a template the run fills in
        return None if default is None else f"a template, config.py has {default!r}"
    if default is None:
        default = resolved.get(dest)
    if value:
        return None if shown(default) == value[1] else f"{text}, config.py has {default!r}"
    try:
        number = float(text)
    except ValueError:
        return f"{text!r} is no default this test can read (see its docstring)"
    ok = isinstance(default, (int, float)) and not isinstance(default, bool) and number == default
    return None if ok else f"{text}, config.py has {default!r}"


def test_the_table_gives_the_real_defaults(parser_flags, monkeypatch):
    for name in ("SASREC_CACHE_DIR", "TRAIN_LOG_PATH", "TRAIN_TF_EVENTS_PATH", "TRAIN_CKPT_PATH"):
        monkeypatch.delenv(name, raising=False)
    resolved = config.build_config([]).flat()
    rows, _ = flag_rows()
    wrong = []
    for line, cell, default, _ in rows:
        dests = row_dests(cell, parser_flags)
        parts = default.split(" / ")
        if len(dests) > 1 and len(parts) == len(dests):  # one default per flag
            groups = [[dest] for dest in dests]
        else:  # one for all
            groups, parts = [dests], [default]
        for group, text in zip(groups, parts, strict=True):
            env = ENV.search(text)
            if env:
                names = re.findall(r"`(\w+)`", env[1])
                have = [config.FIELDS[dest].metadata.get("env") for dest in group]
                if names != have:
                    wrong.append(f"README.md:{line}: environment variables {names}, config.py has {have}")
                text = ENV.sub("", text).strip().removeprefix("else ").strip()
            for dest in group:
                if dest.startswith("--"):
                    continue  # no such flag: test_every_flag_the_table_names_exists names it
                problem = check_default(dest, text, parser_flags, resolved, env=bool(env))
                if problem:
                    wrong.append(f"README.md:{line} --{dest}: {problem}")
    assert not wrong, "\n".join(wrong)


def test_readme_stays_under_300_lines():
    with open(README) as f:
        assert len(f.read().splitlines()) < 300
