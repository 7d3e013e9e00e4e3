"""The README and docs/ as tested text: every code block runs (or says why it cannot), every relative link names
a file that exists (and a heading that exists, for `page.md#anchor`), every page is in mkdocs.yml's nav, and the
README stays a front door (<= 160 lines).

A block's marker is the HTML comment on the line above its fence:
    <!-- doc-test: setup=NAME -->       run it after SETUPS[NAME] defined the names it uses (model, hidden, ...)
    <!-- doc-test: skip (reason) -->    not run; the reason says why and which test covers it instead
A python block without a marker runs in an empty namespace; any other language needs a skip."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README_MAX_LINES = 160
MARKER = re.compile(r"^<!--\s*doc-test:\s*(?:setup=(?P<setup>[\w-]+)|skip\s*\((?P<reason>.+)\))\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    setup: str | None
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARKER.match(prev)
        out.append(Block(path, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                         mark and mark.group("setup"), mark and mark.group("reason")))
        i = end + 1
    return out


ALL_BLOCKS = [b for p in pages() for b in blocks(p)]
RUN = [b for b in ALL_BLOCKS if b.skip is None and b.lang == "python"]


# ---- set-ups: the names a block uses, built tiny and offline ------------------------------------------------------
def _op_inputs(tmp_path):
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 50, (2, 5), generator=g)
    targets[0, :2] = -100
    return {"hidden": torch.randn(2, 5, 16, generator=g, requires_grad=True),
            "weight": torch.randn(50, 16, generator=g, requires_grad=True), "targets": targets}


def _tiny_checkpoint(tmp_path):
    from hf_fusedce.testing import tiny_batch, tiny_llama

    tiny_llama(97, 32).save_pretrained(tmp_path / "ckpt")
    return {"path": str(tmp_path / "ckpt"), "ids": tiny_batch(97)[0]}


def _trainer(tmp_path):
    import datasets
    from transformers import TrainingArguments

    from hf_fusedce.testing import tiny_batch, tiny_llama

    ids, labels = tiny_batch(97, batch=8, seq=16)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)

    def collator(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}

    return {"model": tiny_llama(97, 32), "training_args": args, "ds": ds, "collator": collator}


def _sft(tmp_path):
    from trl import SFTConfig

    from hf_fusedce.demo import build_tiny_llama, load_demo_tokenizer
    from hf_fusedce.demo.data import load_sft_dataset

    tok = load_demo_tokenizer()
    model = build_tiny_llama(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, max_position=128)
    ds = load_sft_dataset().select(range(8))
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, max_length=64,
                       report_to=[], save_strategy="no", bf16=False, use_cpu=True, disable_tqdm=True)
    return {"model": model, "tok": tok, "ds": ds, "sft_config": config}


def _distill(tmp_path):
    g = torch.Generator().manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.lm_head = torch.nn.Linear(dim, 64, bias=False)

    torch.manual_seed(0)
    student, teacher = LM(16), LM(24).requires_grad_(False)
    return {"student": student, "teacher": teacher, "targets": torch.randint(0, 64, (2, 5), generator=g),
            "student_hidden": torch.randn(2, 5, 16, generator=g, requires_grad=True),
            "teacher_hidden": torch.randn(2, 5, 24, generator=g)}


def _liger_llama(tmp_path, cleanup):
    """A tiny Llama; Liger swaps names of transformers' modeling_llama module: they are put back afterwards."""
    from transformers.models.llama import modeling_llama

    from hf_fusedce.testing import tiny_llama

    saved = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.forward

    def restore():
        for name in [n for n in vars(modeling_llama) if n not in saved]:
            delattr(modeling_llama, name)
        for name, value in saved.items():
            setattr(modeling_llama, name, value)
        modeling_llama.LlamaForCausalLM.forward = forward

    cleanup(restore)
    return {"model": tiny_llama(97, 32)}


SETUPS = {"op_inputs": _op_inputs, "tiny_checkpoint": _tiny_checkpoint, "trainer": _trainer, "sft": _sft,
          "distill": _distill, "liger_llama": _liger_llama}
NEEDS_CLEANUP = {"liger_llama"}


# ---- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_code_block_runs(block, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace = {"__name__": "__doc_block__"}
    if block.setup is not None:
        assert block.setup in SETUPS, f"{block.id}: unknown set-up {block.setup!r}; known: {sorted(SETUPS)}"
        extra = (request.addfinalizer,) if block.setup in NEEDS_CLEANUP else ()
        namespace.update(SETUPS[block.setup](tmp_path, *extra))
    exec(compile(block.code, block.id, "exec"), namespace)  # noqa: S102 - the documentation's own code


def test_blocks_not_run_say_why():
    assert len(RUN) >= 8, "the docs' runnable blocks were not found"
    for b in ALL_BLOCKS:
        if b.skip is not None:
            assert len(b.skip.strip()) >= 10, f"{b.id}: a skipped block names its reason"
        else:
            assert b.lang == "python", f"{b.id}: a {b.lang or 'plain'} block is not run: mark it " \
                                       "<!-- doc-test: skip (reason) --> or make it a python block"


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs links to): lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_\[\]]|\]\([^)]*\)", "", heading).lower()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text)).strip("-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target!r}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.relative_to(ROOT)}: link to {target!r}: no such heading"


def test_every_docs_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for x in node:
                yield from walk(x)
        elif isinstance(node, dict):
            for x in node.values():
                yield from walk(x)

    nav = sorted(walk(config["nav"]))
    on_disk = sorted(str(p.relative_to(DOCS)) for p in pages()[1:])
    assert nav == on_disk, "mkdocs.yml's nav and docs/*.md differ"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/"


def test_mkdocs_build_is_strict_and_clean(tmp_path):
    """The docs build itself (CI's docs step runs it after installing the docs extra)."""
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip('mkdocs not installed: pip install -e ".[docs]" -c .ci/constraints.txt -c .ci/constraints-docs.txt')
    exe = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    proc = subprocess.run([exe, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
