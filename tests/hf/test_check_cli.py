"""`hf-fusedce check` runs the same proof: by model type, and on a local checkpoint with its tokenizer."""
from hf_fusedce.cli.main import main


def test_check_model_type(capsys):
    assert main(["check", "--model-type", "llama", "--model-type", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "proven   llama" in out and "2 proven" in out


def test_check_refused_type_is_reported(capsys):
    assert main(["check", "--model-type", "musicgen"]) == 0
    assert "refused" in capsys.readouterr().out


def test_check_local_checkpoint(tmp_path, capsys, tiny_llama):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path)
    tiny_llama(tie=True).save_pretrained(tmp_path)
    assert main(["check", "--model", str(tmp_path), "--seq-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "proven   llama" in out and "tied" in out


def _tiny_qwen2(tie: bool = False):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))


def _check_one(path, capsys) -> tuple[int, str]:
    code = main(["check", "--model", str(path), "--seq-len", "12"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return code, lines[0]


def test_check_checkpoint_saved_without_tokenizer_files(tmp_path, capsys):
    """transformers 5.x builds an empty tokenizer (one special token) from such a folder: the model's own ids
    are drawn instead."""
    _tiny_qwen2().save_pretrained(tmp_path)
    assert not any("token" in p.name for p in tmp_path.iterdir())
    code, line = _check_one(tmp_path, capsys)
    assert code == 0 and line.startswith("proven   qwen2") and "model ids" in line, line


def test_check_sharded_bf16_checkpoint(tmp_path, capsys):
    import torch
    _tiny_qwen2(tie=True).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    code, line = _check_one(tmp_path, capsys)
    assert code == 0 and line.startswith("proven   qwen2") and "tied" in line, line


def test_check_what_cannot_load_says_why_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 97}')
    code, line = _check_one(tmp_path, capsys)
    assert code == 1 and line.startswith("refused") and "cannot load" in line and "AutoModelForCausalLM" in line
    code, line = _check_one(tmp_path / "missing", capsys)
    assert code == 1 and line.startswith("refused") and "no checkpoint folder" in line
