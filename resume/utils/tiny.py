"""Tiny tokenizers built offline from a word list, for random-initialised test models."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from resume.utils.lexicon import lexicon

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    words = lexicon(0) + list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    return [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)] + ["</think> <think> summary"]


def wordpiece_tokenizer(save_dir: str | Path, vocab_size: int = 1000):
    """A BERT-style WordPiece tokenizer (lowercase, [CLS]/[SEP]) over the toy lexicon.

    The vocabulary is written out, not trained: `tokenizers`' WordPiece trainer orders tied
    pieces differently from run to run, which would make tiny test models irreproducible.
    Every character also exists as a piece, so any text tokenizes without [UNK].
    """
    from transformers import BertTokenizerFast

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    words = sorted(set(lexicon(0)) | {"think", "summary"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    vocab = list(dict.fromkeys(vocab))[: max(vocab_size, 5 + 2 * len(chars))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(save_dir))
    return fast


def bpe_chat_tokenizer(save_dir: str | Path, vocab_size: int = 600):
    """A byte-level BPE tokenizer with a ChatML template (SmolLM2/Qwen style) for tiny causal LMs."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(save_dir))
    return fast
