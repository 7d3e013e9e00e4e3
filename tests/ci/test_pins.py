"""CI is pinned on purpose: .ci/constraints.txt pins every package the package and its test extras install,
.ci/run runs README's test command verbatim, and the committed proof/cards match the PINNED transformers (a new
transformers release changes nothing until the pin is moved and the cards refreshed)."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = "move the pin on purpose and regenerate with `python -m hf_fusedce.cards --refresh`"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    return {_name(line): line.split("==", 1)[1].strip() for line in lines if "==" in line and not line.startswith("#")}


def readme_test_command() -> str:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if "python -m pytest" in line]
    assert lines, "README states no test command"
    return lines[0].split("#", 1)[0].strip()


def test_every_dependency_and_test_extra_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    missing = [r for r in wanted if _name(r) not in pins()]
    assert not missing, f"not pinned in .ci/constraints.txt: {missing}"
    assert pins()["trl"] == "1.16.0"


def test_ci_runs_readmes_test_command_with_the_pins():
    command = readme_test_command()
    assert "-c .ci/constraints.txt" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_cards_match_the_pinned_transformers():
    from hf_fusedce import cards
    assert cards.load()["transformers"] == pins()["transformers"], f"cards proven with another transformers: {FIX}"

