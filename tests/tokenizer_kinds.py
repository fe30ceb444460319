"""Small real tokenizers of the three families cross-tokenizer alignment meets, trained in milliseconds on a fixed
corpus: byte-level BPE (GPT-2 / Llama 3 / SmolLM), SentencePiece-style BPE with the Metaspace marker (Gemma, Llama 2)
and uncased WordPiece (BERT)."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The café served crème brûlée to everyone who asked nicely.",
    "Unbelievable results appeared when the students distilled the teacher.",
    "Emoji like 🙂 and 🚀 show up in chat logs, with naïve résumés.",
    "  Leading spaces, tabs\tand newlines\nare part of the text.",
    "Distillation transfers knowledge from a large teacher to a small student model.",
    "Tokenizers disagree about where words end: unbelievably, unbelievable, believe.",
] * 4


def _wrap(tokenizer: Tokenizer, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


@lru_cache(maxsize=None)
def byte_bpe(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return _wrap(tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@lru_cache(maxsize=None)
def sentencepiece_bpe(vocab_size: int = 360) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return _wrap(tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@lru_cache(maxsize=None)
def wordpiece_uncased(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[SEP]"],
                                        show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return _wrap(tokenizer, unk_token="[UNK]", pad_token="[PAD]", sep_token="[SEP]", eos_token="[SEP]")


KINDS = {"byte_bpe": byte_bpe, "sentencepiece": sentencepiece_bpe, "wordpiece": wordpiece_uncased}
