"""Figures in README.md and docs/ that describe the current code agree with the files a command writes: the pins
(.ci/constraints.txt), the proof counts (hf_fusedce/data/*proof_results.json, written by `python -m
hf_fusedce.cards --refresh` and its encoder twin), the defaults (the code) and the headline table (the bench
results.json it links, rendered by hf_fusedce.bench.headline)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from hf_fusedce.bench import headline

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DATA = ROOT / "hf_fusedce" / "data"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


def _row(text: str, first_cell: str) -> str:
    """The README 'What is supported' row that starts with this cell."""
    match = re.search(rf"^\| {re.escape(first_cell)} \|(.*)$", text, re.M)
    assert match, f"README has no '| {first_cell} |' row"
    return match.group(1)


# ------------------------------------------------------------------ the headline table
def _headline_sections():
    """(file, text, results.json) for each page carrying the headline table: the 'Measured:' caption line and the
    results.md link before it."""
    for path in (ROOT / "README.md", ROOT / "docs" / "benchmarks.md"):
        text = path.read_text()
        caption = text.index("\nMeasured: N=")
        link = re.findall(r"\]\(([^)]*model_cards/benchmarks/[^)]*/results\.md)\)", text[:caption])[-1]
        results = (path.parent / link).resolve().with_name("results.json")
        yield path.name, text[caption + 1:], results


SECTIONS = list(_headline_sections())


@pytest.mark.parametrize("page, text, results", SECTIONS, ids=[page for page, _, _ in SECTIONS])
def test_headline_table_is_its_results_file(page, text, results):
    doc = json.loads(results.read_text())
    lines = text.splitlines()
    assert lines[0] == f"Measured: {headline.caption(doc)}.", f"{page}: caption differs from {results}"
    want = headline.table(doc)
    got = lines[2:2 + len(want)]
    assert got == want, f"{page}: the table differs from {results} (re-render it with hf_fusedce.bench.headline)"


def test_headline_rendering_follows_the_records(tmp_path):
    """The snippet follows the records it is given: a changed time, budget or memory changes the table."""
    doc = json.loads(SECTIONS[0][2].read_text())
    before = headline.table(doc)
    ours = next(r for r in doc["records"] if r.get("kind") == "ours")
    ours["fwd_bwd_ms"] += 1000
    ours["strategy"] = "chunked, grads in forward, backend=torch, chunk budget: CPU cost-model pick per shape"
    after = headline.table(doc)
    changed = [b for a, b in zip(before, after) if a != b]
    assert len(changed) == 1 and "picked per shape by the CPU plan" in changed[0]
    assert f"**{ours['fwd_bwd_ms']:.0f} ms**" in changed[0]


def test_readme_states_the_command_that_refreshes_the_headline():
    command = re.search(r"`(hf-fusedce bench [^`]*--n 4096[^`]*)`", README)
    assert command and "--shapes 512x32000" in command.group(1) and "--out " in command.group(1)
    assert "headline.md" in README


# ------------------------------------------------------------------ pins
def test_release_row_names_the_pinned_transformers():
    pins = _pins()
    row = _row(README, "releases")
    stated = re.search(r"pinned versions \(transformers ([\d.]+)", row)
    assert stated and stated.group(1) == pins["transformers"], (row, pins["transformers"])


def test_install_page_names_the_pinned_versions():
    pins = _pins()
    text = (ROOT / "docs" / "install.md").read_text()
    tested = text[text.index("Tested:"):text.index("(CI pins them all")]
    for name in ("torch", "transformers", "trl", "peft", "accelerate"):
        if name in pins:
            assert f"{name} {pins[name]}" in tested, f"docs/install.md: {name} is pinned at {pins[name]}"


def test_releases_table_pinned_column_is_the_constraints():
    pins = _pins()
    text = (ROOT / "docs" / "releases.md").read_text()
    for name, pinned in re.findall(r"^\| ([a-z-]+) \| ([\d.]+)", text, re.M):
        if name in pins:
            assert pinned == pins[name], f"docs/releases.md says {name} {pinned}, .ci/constraints.txt {pins[name]}"


# ------------------------------------------------------------------ proof counts
def _causal_and_multimodal():
    from transformers.models.auto import modeling_auto as auto

    doc = json.loads((DATA / "proof_results.json").read_text())
    causal = [r for r in doc["results"] if r["model_type"] in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    multi = set(auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) | set(auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)
    return doc, causal, [r for r in doc["results"] if r["model_type"] in multi]


def test_supported_rows_count_the_proof():
    doc, causal, multimodal = _causal_and_multimodal()
    count = Counter(r["status"] for r in causal)
    row = _row(README, "causal LMs")
    assert f"transformers {'.'.join(doc['transformers'].split('.')[:2])}" in row
    assert (f"{count['proven']} proven equal to stock" in row and f"{count['skipped']} skipped" in row
            and f"{count['refused']} refused" in row and f"{count['failed']} failing" in row), (row, count)

    assert _failing(causal) in row, (row, _failing(causal))

    batch = Counter("image" if "image" in r["variants"] else "audio" if "audio" in r["variants"] else r["status"]
                    for r in multimodal)
    row = _row(README, "vision / audio LMs")
    assert f"the {len(multimodal)} types" in row
    assert (f"{batch['image']} proven exact on an image batch" in row and f"{batch['audio']} on an audio batch" in row
            and f"{batch['proven']} on text only" in row and f"{batch['skipped']} skipped" in row
            and f"{batch['refused']} refused" in row), (row, batch)

    encoder = json.loads((DATA / "encoder_proof_results.json").read_text())["results"]
    count = Counter(r["status"] for r in encoder)
    row = _row(README, "encoder-decoder, masked LM")
    assert (f"the {len(encoder)} types" in row and f"{count['proven']} proven exact" in row
            and f"{count['refused']} refused" in row), (row, count)


def test_patching_page_counts_the_proof():
    doc, causal, _ = _causal_and_multimodal()
    count = Counter(r["status"] for r in causal)
    text = " ".join((ROOT / "docs" / "patching.md").read_text().split())
    want = (f"With transformers {'.'.join(doc['transformers'].split('.')[:2])} (causal-LM mapping): "
            f"{count['proven']} families proven, {count['skipped']} skipped")
    assert want in text, want
    assert f"{count['refused']} refused with the reason, {_failing(causal)}" in text


def _failing(causal: list[dict]) -> str:
    """"N failing at <worst rel err>", or "0 failing" when the proof has no failure."""
    errs = [float(re.search(r"rel err ([\d.e+-]+)", r["reason"]).group(1)) for r in causal if r["status"] == "failed"]
    return re.sub(r"e-0(\d)", r"e-\1", f"{len(errs)} failing at {max(errs):.1e}") if errs else "0 failing"


def test_release_totals_are_the_proof():
    doc = json.loads((DATA / "proof_results.json").read_text())
    count = Counter(r["status"] for r in doc["results"])
    totals = (f"Totals on {doc['transformers']}: {count['proven']} proven, {count['skipped']} skipped, "
              f"{count['refused']} refused, {count['failed']} failed")
    assert totals in (ROOT / "docs" / "releases.md").read_text()


# ------------------------------------------------------------------ defaults
def test_stated_chunk_defaults_are_the_code():
    """A 'default' chunk budget named in README/docs is the code's: the CE op's on CPU is the CPU plan's pick (no
    constant), the other ops' the fixed default."""
    from hf_fusedce.ops.planning.chunking import DEFAULT_BUDGET_BYTES

    fixed = DEFAULT_BUDGET_BYTES["cpu"] >> 20
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for match in re.finditer(r"default (\d+) MiB chunks|(\d+) MiB default\b", page.read_text()):
            mib = int(match.group(1) or match.group(2))
            assert match.group(1) is None, f"{page.name}: '{match.group(0)}': the CE op's CPU default is the plan's pick"
            assert mib == fixed, f"{page.name}: '{match.group(0)}' but the fixed default is {fixed} MiB"


def test_op_docstring_names_the_cpu_cap():
    """The op's help (shown by help() and the docs) names the CPU plan's cap on the chunk."""
    from hf_fusedce import fused_linear_cross_entropy
    from hf_fusedce.ops.planning.cpu_plan import MAX_BUDGET_BYTES

    assert f"CPU <= {MAX_BUDGET_BYTES >> 20} MiB" in " ".join(fused_linear_cross_entropy.__doc__.split())
