"""The README's examples stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from imgprep.cli import build_parser
from imgprep.config import load_config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_config_example_parses(tmp_path: Path) -> None:
    block = re.search(r"## Configuration.*?```yaml\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    example = tmp_path / "imgprep.yaml"
    example.write_text(block.group(1))
    config = load_config(example)
    assert config.compression == "zstd"
    assert config.timeouts.prepare == 300
    assert set(config.hosts) == {"cn1"}
    assert config.serve.listen == "127.0.0.1:8480"


def test_every_create_flag_in_the_readme_exists() -> None:
    usage = re.search(r"```\nimgprep create (.*?)\nimgprep jobs", README.read_text(), re.S)
    assert usage is not None
    documented = set(re.findall(r"--[a-z][a-z-]+", usage.group(1)))
    parser: Any = build_parser()
    create = parser._subparsers._group_actions[0].choices["create"]
    known = {opt for action in create._actions for opt in action.option_strings}
    assert documented, "the README documents the create flags"
    assert documented <= known, documented - known
