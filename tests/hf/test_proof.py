"""The proof: patched vs stock loss and EVERY parameter gradient (float32, rel err <= 1e-5), tied and untied
heads, ignored tokens, num_items_in_batch, a padded batch with attention_mask, training mode, every quirk forced
to a non-trivial value, image batches for the multimodal types proven with them. CI proves the required
families (REQUIRED: the common ones and one of each quirk); every family of the installed transformers is
proven on demand (`pytest -m slow -k test_every_family`, `hf-fusedce check --all`,
`python -m hf_fusedce.cards --refresh`). Families the proof cannot build are skipped with the reason."""
import pytest

from hf_fusedce.hf import proof
from hf_fusedce.hf.heads import HEADS, REFUSED
from hf_fusedce.hf.multimodal_batches import BATCHES

TYPES = sorted(proof.fused_types())
MUST_PROVE = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
              "cohere", "granite", "olmo2", "gpt2", "gpt_neox", "falcon_h1", "minicpm3"]
# One family per quirk of the table besides the common ones: soft cap, scale, divide, z-loss, MoE aux, unshifted
# Vision- and audio-language families proven in CI on an image / audio batch (the others: tests/hf/test_multimodal.py
# -m slow, `hf-fusedce check --all`)
MEDIA_REQUIRED = ["gemma3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "internvl", "idefics3",
                  "smolvlm", "paligemma", "mistral3", "llama4", "qwen2_audio", "voxtral",
                  # the other families Liger-Kernel 0.8.5 patches (its "pixtral": tests/hf/test_multimodal.py)
                  "qwen3_vl_moe", "mllama", "glm4v", "glm4v_moe", "muse_glimmer"]
REQUIRED = sorted({*MUST_PROVE, *MEDIA_REQUIRED, "recurrent_gemma", "hyperclovax", "granitemoe", "bamba",
                   "jetmoe", "bart", "reformer", "mamba", "rwkv", "llama4_text"})
# In the table (plain head) but float32 rounding in the model body exceeds 1e-5 and the stock model cannot
# run in float64: not counted as proven.
KNOWN_NUMERICS = {"deepseek_v4": "hc_fn mixing amplifies float32 rounding; stock rejects float64 (grouped mm)"}


@pytest.mark.parametrize("model_type", REQUIRED)
def test_family(model_type):
    check_family(model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(set(TYPES) - set(REQUIRED)))
def test_every_family(model_type):
    check_family(model_type)


def check_family(model_type):
    res = proof.prove(model_type)
    if res.status == "refused":
        assert model_type in REFUSED or model_type not in HEADS
        pytest.skip(f"refused: {res.reason}")
    if res.status == "skipped":
        assert model_type not in MUST_PROVE, res.reason
        pytest.skip(res.reason)
    if model_type in KNOWN_NUMERICS and res.status == "failed":
        pytest.xfail(KNOWN_NUMERICS[model_type])
    assert res.status == "proven", res.reason
    assert res.variants
    assert "padded" in res.variants or "padded batch not proven" in res.reason  # attention_mask, padding
    if model_type in BATCHES:  # a media batch is built for it: it must be proven on it
        assert BATCHES[model_type].kind in res.variants, res.reason
    elif model_type in proof.media_types():
        assert "proven on text only" in res.reason  # listed with the reason, never silently text-only


def test_multimodal_types_fused_with_media_are_those_proven_with_media():
    """The forward fuses image / audio inputs of exactly the types whose committed proof includes such a batch,
    and every type with a media batch builder is recorded proven on it."""
    assert proof.media_proven_types() == {t for t in BATCHES if t in proof.fused_types()}


def test_every_mapping_type_is_in_the_table_or_refused():
    """A new transformers family is not silently trained: it must be added to the table (and proven)."""
    unknown = [t for t in TYPES if t not in HEADS and t not in REFUSED]
    assert not unknown, f"model types neither in HEADS nor REFUSED: {unknown}"


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "mixtral", "qwen3"])
def test_greedy_generate_is_identical(model_type):
    assert proof.generate_equal(model_type)
