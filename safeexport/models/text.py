"""BERT and RoBERTa classifiers through transformers, and their tokenizers.

A model is built from a transformers config (a small default size, or the config of a local
pretrained folder) and takes one int64 tensor of token ids; the attention mask is derived from
the padding id inside the model, so an exported file has a single input.
"""

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safeexport.errors import ConfigError

SMALL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 256}


def _classes(arch: str):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    return {"bert": (BertConfig, BertForSequenceClassification),
            "roberta": (RobertaConfig, RobertaForSequenceClassification)}[arch]


class TextClassifier(nn.Module):
    """A transformers sequence classifier behind ``logits = model(input_ids)``."""

    def __init__(self, arch: str, config: dict, pad_id: int) -> None:
        super().__init__()
        config_cls, model_cls = _classes(arch)
        self.arch, self.pad_id = arch, pad_id
        self.model = model_cls(config_cls.from_dict(config))

    def load_pretrained(self, folder: str) -> None:
        """Replace the weights by those of a local pretrained folder (the classifier head,
        absent there, keeps its fresh initialisation)."""
        _, model_cls = _classes(self.arch)
        try:
            self.model = model_cls.from_pretrained(folder, config=self.model.config,
                                                   local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--pretrained {folder}: cannot load {self.arch} weights ({e})") \
                from e

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits


def text_config(arch: str, vocab_size: int, num_classes: int, max_length: int, pad_id: int,
                pretrained: str | None) -> dict:
    """The transformers config as a JSON dict: the pretrained folder's, or a small one."""
    config_cls, _ = _classes(arch)
    if pretrained:
        try:
            cfg = config_cls.from_pretrained(pretrained, num_labels=num_classes,
                                             local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--pretrained {pretrained}: no {arch} config there ({e})") from e
    else:
        extra = {"type_vocab_size": 1} if arch == "roberta" else {}
        # RoBERTa's positions start after the padding id, so it needs pad_id + 1 extra slots.
        cfg = config_cls(vocab_size=vocab_size, num_labels=num_classes, pad_token_id=pad_id,
                         max_position_embeddings=max_length + pad_id + 2, **SMALL, **extra)
    return json.loads(cfg.to_json_string())


# ---------------------------------------------------------------- tokenizers

def train_tokenizer(arch: str, texts: list[str], vocab_size: int = 8000):
    """A WordPiece (BERT) or byte-level BPE (RoBERTa) tokenizer trained on ``texts``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    if arch == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                            show_progress=False)
        tok.train_from_iterator(texts, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        pad = "[PAD]"
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
        pad = "<pad>"
    tok.add_special_tokens([pad])
    tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
    return tok


def pretrained_tokenizer(folder: str):
    """The fast tokenizer saved in a local pretrained folder, as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"--pretrained {folder}: no tokenizer.json there (save the tokenizer "
                          "with a fast tokenizer's save_pretrained)")
    return Tokenizer.from_file(str(path))


def pad_id_of(tok) -> int:
    """The padding token id the tokenizer pads with."""
    if tok.padding is None:
        raise ConfigError("the tokenizer has no padding token")
    return int(tok.padding["pad_id"])


def encode(tok, texts, max_length: int) -> np.ndarray:
    """Token ids, truncated and padded to ``max_length``, as int64 N×max_length."""
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=pad_id_of(tok), pad_token=tok.padding["pad_token"],
                       length=max_length)
    return np.array([e.ids for e in tok.encode_batch(list(texts))], dtype=np.int64)
