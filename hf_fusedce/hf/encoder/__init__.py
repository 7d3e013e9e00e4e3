"""Encoder-decoder (seq2seq, speech seq2seq) and masked-LM heads: their table (`heads`) and proof (`proof`)."""
