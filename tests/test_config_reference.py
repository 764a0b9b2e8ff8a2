"""docs/configuration.md cannot drift from the code.

* the committed file equals what ``bastion config-reference`` generates from
  ``bastion.config.CONFIG_KEYS``;
* CONFIG_KEYS names exactly the keys the parser accepts, table by table (the parser is
  asked: it lists its known keys when it meets an unknown one);
* every literal default in CONFIG_KEYS is the parser's default: a file that writes every
  default out parses to the same configuration as one that leaves them out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from bastion.config import CONFIG_KEYS, CONFIG_SECTIONS, REQUIRED, parse_config
from bastion.config_reference import parser_keys, reference_keys, render

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
FIX = "regenerate it with `bastion config-reference -o docs/configuration.md`"


def test_committed_reference_is_the_generated_one() -> None:
    assert DOC.read_text() == render(), f"docs/configuration.md is out of date with bastion/config.py: {FIX}"


def test_cli_prints_the_reference(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "bastion.cli", "config-reference"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == render()
    module = subprocess.run([sys.executable, "-m", "bastion.config_reference", "-o", str(tmp_path / "c.md")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert module.returncode == 0, module.stderr
    assert (tmp_path / "c.md").read_text() == render()


def test_reference_names_exactly_the_keys_the_parser_accepts() -> None:
    parser, table = parser_keys(), reference_keys()
    assert "" in parser and "gateway" in parser, parser  # the probe reached the parser's checks
    drift = []
    for section in sorted(parser.keys() | table.keys()):
        only_parser = parser.get(section, set()) - table.get(section, set())
        only_table = table.get(section, set()) - parser.get(section, set())
        where = section or "(top level)"
        if only_parser:
            drift.append(f"{where}: the parser accepts {sorted(only_parser)}, missing from CONFIG_KEYS / "
                         "CONFIG_SECTIONS in bastion/config.py")
        if only_table:
            drift.append(f"{where}: CONFIG_KEYS documents {sorted(only_table)}, which the parser refuses")
    assert not drift, "\n".join(drift) + f"\n(then {FIX})"


def test_every_section_has_a_heading_and_every_key_a_description() -> None:
    sections = {s.name for s in CONFIG_SECTIONS}
    for key in CONFIG_KEYS:
        assert key.section in sections, key.key
        assert key.doc.strip() and key.type.strip(), key.key
    assert len({k.key for k in CONFIG_KEYS}) == len(CONFIG_KEYS), "a key is listed twice"


# -- defaults ----------------------------------------------------------------------------------

# The least each table needs to parse, and nothing that has a default.
MINIMAL: dict[str, Any] = {
    "gateway": {}, "recording": {}, "ssh": {}, "state": {}, "approval_defaults": {}, "limits": {}, "mcp": {},
    "roles": {"operators": {}, "auditors": {}},
    "oidc": [{"issuer": "https://issuer.example", "audience": "guarita"}],
    "targets": [{"name": "web", "host": "web.internal", "logins": ["deploy"],
                 "host_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey"], "credential": "ca"}],
    "access": [{"subjects": ["*"]}],
    "clusters": [{"name": "prod", "in_cluster": True}],
    "approvals": [{"pattern": "rm -rf", "approvers": ["sre"]}],
    "webhooks": [{"url": "https://hooks.example/guarita"}],
    "masking": {"detectors": {"cpf": {}}, "custom": [{"name": "matricula", "pattern": "MAT-[0-9]{6}"}],
                "rules": [{"apply": "both"}]},
}


# Writing these out changes another key's default (documented there): left out.
CONDITIONAL = {"access[].clusters"}  # its presence makes access[].targets default to []


def _node(raw: dict[str, Any], section: str) -> dict[str, Any]:
    node: Any = raw
    for part in section.replace("<name>", "cpf").split("."):
        node = node[part[:-2]][0] if part.endswith("[]") else node[part]
    return node


def test_documented_defaults_are_the_parsers_defaults(tmp_path: Path) -> None:
    import copy

    known = {s.name for s in CONFIG_SECTIONS}
    minimal = {k: v for k, v in MINIMAL.items() if k in {name.split(".")[0].removesuffix("[]") for name in known}}
    explicit = copy.deepcopy(minimal)
    written = []
    for key in CONFIG_KEYS:
        if key.default in (None, REQUIRED) or key.default_text is not None or key.key in CONDITIONAL:
            continue
        node = _node(explicit, key.section)
        if key.name in node:  # the minimal entry sets it already
            continue
        node[key.name] = key.default
        written.append(key.key)
    assert len(written) > 40, written
    assert parse_config(explicit, tmp_path) == parse_config(minimal, tmp_path), (
        "a default in CONFIG_KEYS differs from the parser's; the keys written out were: " + ", ".join(written))
