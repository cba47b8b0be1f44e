"""The validation prompts: a JSONL file, one prompt a line, {"id": unique name, "chat": whether it goes through the
chat template, "text": the prompt, "kind": optional label}. The shipped set is data/validate_prompts.jsonl; a team
gating a model for its own domain points steps.validate.prompts at its own."""
from __future__ import annotations

import json
from pathlib import Path

from quantgate.paths import DATA_DIR

DEFAULT = DATA_DIR / "validate_prompts.jsonl"
ALLOWED = '{"id": "...", "chat": true|false, "text": "...", "kind": "..." (optional)}'


def problem(line: str) -> str | None:
    """What is wrong with one line of the file, or None."""
    try:
        prompt = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg})"
    if not isinstance(prompt, dict):
        return "not a JSON object"
    for field, kind in (("id", str), ("chat", bool), ("text", str)):
        if not isinstance(prompt.get(field), kind) or prompt.get(field) == "":
            return f"'{field}' is {'missing' if field not in prompt else repr(prompt[field])}"
    unknown = set(prompt) - {"id", "chat", "text", "kind"}
    return f"unknown field(s) {sorted(unknown)}" if unknown else None


def read(path: Path = DEFAULT) -> list[dict]:
    """The prompts of `path`, checked: a ValueError names the line and the field at fault and what is allowed."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    prompts, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if why := problem(line):
            raise ValueError(f"{path} line {number}: {why}; each line is {ALLOWED}")
        prompt = json.loads(line)
        if prompt["id"] in seen:
            raise ValueError(f"{path} line {number}: id '{prompt['id']}' already used; ids are unique")
        seen.add(prompt["id"])
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts; each line is {ALLOWED}")
    return prompts
