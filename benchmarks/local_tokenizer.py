"""The small byte-level BPE tokenizer of the locally made benchmark and test checkpoints (trained on a fixed
text in a fraction of a second; nothing is downloaded)."""
from __future__ import annotations

TEXT = (
    "The quick brown fox jumps over the lazy dog. A small cat sat by the warm fire and looked at the rain. "
    "Tom took the red ball to the park, and he was happy. Café, naïve, 日本語 and 🙂 are here too. "
) * 20

VOCAB = 320

#: A ChatML-like template over the tokenizer's own special tokens: each turn is ``<s>ROLE\nCONTENT</s>\n``.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_tokenizer(out_dir: str, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on TEXT, saved as a transformers fast tokenizer (with
    ``chat_template``, None for none)."""
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
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast
