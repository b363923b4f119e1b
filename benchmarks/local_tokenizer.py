"""The small byte-level BPE tokenizer of the locally made benchmark and test checkpoints (trained on a fixed
text in a fraction of a second; nothing is downloaded)."""
from __future__ import annotations

TEXT = (
    "The quick brown fox jumps over the lazy dog. A small cat sat by the warm fire and looked at the rain. "
    "Tom took the red ball to the park, and he was happy. Café, naïve, 日本語 and 🙂 are here too. "
) * 20

VOCAB = 320


def make_tokenizer(out_dir: str):
    """A byte-level BPE tokenizer trained on TEXT, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast
