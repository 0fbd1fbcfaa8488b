"""The README's paper-to-code table names code that exists: every name in its code column resolves to a module,
class, function or attribute of matnet, and every snake_case name in its paper column is a MatNetConfig field
(or a method of the models)."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

import matnet

README = Path(__file__).resolve().parents[1] / "README.md"
NAMESPACES = ("matnet", "matnet.modules", "matnet.model", "matnet.conditional")


def _table_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    assert "## The model" in text, "README.md has no '## The model' section (the paper-to-code table)"
    text = text.split("## The model", 1)[1]
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 2 and not set(cells[0]) <= set("-: ") and cells[0] != "paper":
            rows.append((cells[0], cells[1]))
    return rows


def _instances() -> dict[type, object]:
    cfg = matnet.MatNetConfig.preset("tiny")
    return {matnet.MatNet: matnet.MatNet(cfg), matnet.ConditionalMatNet: matnet.ConditionalMatNet(cfg)}


def _lookup(obj: object, attr: str, instances: dict[type, object]) -> object:
    if hasattr(obj, attr):
        return getattr(obj, attr)
    inst = instances.get(obj) if isinstance(obj, type) else None  # nn.Module children exist on instances only
    if inst is not None and hasattr(inst, attr):
        return getattr(inst, attr)
    raise AttributeError(f"{obj!r} has no {attr!r}")


def _resolve(name: str, context: object, instances: dict[type, object]) -> object:
    if name.startswith("."):  # `.iwae_nll` after `ConditionalMatNet.forward`: the same class
        return _lookup(context, name[1:], instances)
    head, *rest = name.split(".")
    obj = None
    if head == "matnet":
        obj, path = matnet, "matnet"
        while rest and not hasattr(obj, rest[0]):  # a submodule not imported by matnet/__init__
            path += "." + rest.pop(0)
            obj = importlib.import_module(path)
    else:
        for ns in NAMESPACES:
            mod = importlib.import_module(ns)
            if hasattr(mod, head):
                obj = getattr(mod, head)
                break
        if obj is None:
            if head == "ops":
                obj = importlib.import_module("matnet.ops")
            elif context is None:
                raise AttributeError(f"{head!r} is in none of {NAMESPACES}")
            else:  # `bu_down` after `MatNet.bu`: an attribute of the cell's class
                obj = _lookup(context, head, instances)
    for attr in rest:
        obj = _lookup(obj, attr, instances)
    return obj


def _resolves(name: str, instances: dict[type, object]) -> bool:
    try:
        _resolve(name, None, instances)
        return True
    except AttributeError:
        return False


def test_the_table_has_every_equation_of_the_paper():
    rows = _table_rows()
    eqs = set()
    for paper, _ in rows:
        for group in re.findall(r"Eq\. ([\d ,-]+)", paper):
            for part in filter(None, (p.strip() for p in group.split(","))):
                lo, _, hi = part.partition("-")
                eqs.update(range(int(lo), int(hi or lo) + 1))
    assert eqs >= set(range(1, 14)), f"no row for Eq. {sorted(set(range(1, 14)) - eqs)}"


@pytest.mark.parametrize("paper, code", _table_rows(), ids=lambda s: s[:40])
def test_every_name_in_the_table_exists(paper, code):
    instances = _instances()
    fields = {f.name for f in dataclasses.fields(matnet.MatNetConfig)}
    for token in re.findall(r"`([^`]+)`", paper):
        name = token.split("=")[0]
        if re.fullmatch(r"[a-z]+(_[a-z0-9]+)+", name):  # prior_refit_step, iwae_nll, prior="gmm" (no `x^k`)
            assert name in fields or any(hasattr(c, name) for c in instances) or _resolves(name, instances), \
                f"{token!r} in the paper column is neither a MatNetConfig field nor matnet code"
    context = None
    for token in re.findall(r"`([^`]+)`", code):
        if "=" in token:
            assert token.split("=")[0] in fields, f"{token!r} is not a MatNetConfig field"
            continue
        obj = _resolve(token, context, instances)
        if isinstance(obj, type):
            context = obj
        elif "." in token and not token.startswith("."):
            owner = _resolve(token.rsplit(".", 1)[0], context, instances)
            context = owner if isinstance(owner, type) else context
