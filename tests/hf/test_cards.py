"""model_cards/ is generated: it must equal what the generator writes now from the committed proof results,
and those results must match the current quirk table and (with the pinned transformers installed, as in CI) its
families. The pin itself is checked in tests/ci/test_pins.py."""
import pytest
import transformers

from hf_fusedce import cards
from hf_fusedce.hf import heads, proof

FIX = "regenerate with `python -m hf_fusedce.cards --refresh`"


def test_cards_match_the_generator():
    doc = cards.load()
    wanted = cards.render_all(doc)
    on_disk = {p.name: p.read_text() for p in cards.CARDS_DIR.glob("*.md")}
    assert on_disk == wanted, f"model_cards/*.md are stale: {FIX}"


def test_results_match_installed_transformers_and_table():
    doc = cards.load()
    if doc["transformers"] != transformers.__version__:
        pytest.skip(f"transformers {transformers.__version__} installed; the cards are for the pinned "
                    f"{doc['transformers']} (CI installs the pin)")
    by_type = {r["model_type"]: r for r in doc["results"]}
    assert set(by_type) == set(proof.fused_types()), f"families added or removed: {FIX}"
    for model_type, r in by_type.items():
        spec = heads.HEADS.get(model_type)
        assert r["quirks"] == (spec.quirks() if spec else None), f"{model_type}: table changed since the proof: {FIX}"
        if r["status"] == "refused":
            assert spec is None


def test_enough_families_proven():
    proven = {r["model_type"] for r in cards.load()["results"] if r["status"] == "proven"}
    assert len(proven) >= 100


def test_docs_models_page_matches_the_generator():
    """docs/models.md is generated from the same proof as the cards (`python -m hf_fusedce.cards` writes both)."""
    assert cards.DOCS_PAGE.read_text() == cards.render_docs_page(cards.load()), f"docs/models.md is stale: {FIX}"
