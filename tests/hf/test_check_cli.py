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
