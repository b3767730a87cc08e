import numpy as np
import pytest
import torch

from safeexport.data.base import ArrayDataset
from safeexport.errors import ConfigError
from safeexport.models import MODELS, build_model, check_compatible, image_kwargs
from safeexport.models.text import encode, pad_id_of, text_config, train_tokenizer

TEXTS = ["stocks fell on wall street", "the team won the final match", "new chip doubles speed",
         "election results announced today", "shares rally as profits rise",
         "striker scores twice in derby"] * 4


def test_registry_names():
    assert MODELS.names() == ["cnn", "mlp", "alexnet", "vgg16", "resnet18", "bert", "roberta"]
    with pytest.raises(ConfigError, match="known: cnn, mlp"):
        MODELS.get("lenet")


@pytest.mark.parametrize("name", ["cnn", "mlp", "alexnet", "vgg16", "resnet18"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 13, 21)])
def test_image_models_take_any_size_and_channels(name, shape):
    x = np.random.default_rng(0).integers(0, 255, (6, *shape), dtype=np.uint8)
    ds = ArrayDataset("t", "image", x, np.arange(6) % 3, 3)
    model = build_model(name, image_kwargs(name, ds, np.arange(6))).eval()
    out = model(torch.from_numpy(x).float() / 255)
    assert out.shape == (2 * 3, 3) and torch.isfinite(out).all()


def test_mlp_on_tabular_and_compatibility_errors():
    ds = ArrayDataset("t", "tabular", np.zeros((4, 600), np.float32), np.arange(4), 100)
    m = build_model("mlp", image_kwargs("mlp", ds, np.arange(4)))
    assert [p.shape[0] for n, p in m.named_parameters() if n.endswith("weight")] == [
        1024, 512, 256, 128, 100]
    with pytest.raises(ConfigError, match="takes image data but purchase100 is tabular.*mlp"):
        check_compatible("vgg16", "tabular", "purchase100")
    with pytest.raises(ConfigError, match="bert, roberta"):
        check_compatible("cnn", "text", "agnews")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_text_models_with_a_tokenizer_trained_on_the_data(arch):
    tok = train_tokenizer(arch, TEXTS, vocab_size=400)
    ids = encode(tok, TEXTS[:3], 16)
    pad = pad_id_of(tok)
    assert ids.shape == (3, 16) and (ids[:, -1] == pad).all()
    cfg = text_config(arch, tok.get_vocab_size(), 4, 16, pad, None)
    model = build_model(arch, {"config": cfg, "pad_id": pad}).eval()
    out = model(torch.from_numpy(ids))
    assert out.shape == (3, 4)
    # padding is masked out: extra padding does not change the logits
    shorter = encode(tok, TEXTS[:3], 12)  # same texts, less padding
    assert torch.allclose(model(torch.from_numpy(shorter)), out, atol=1e-5)


def test_pretrained_folder_is_loaded(tmp_path):
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = train_tokenizer("bert", TEXTS, vocab_size=200)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    from safeexport.models.text import pretrained_tokenizer

    loaded_tok = pretrained_tokenizer(str(tmp_path))
    config = text_config("bert", loaded_tok.get_vocab_size(), 4, 16, pad_id_of(tok), str(tmp_path))
    assert config["hidden_size"] == 32 and len(config["id2label"]) == 4
    model = build_model("bert", {"config": config, "pad_id": 0})
    model.load_pretrained(str(tmp_path))
    ref = BertModel.from_pretrained(tmp_path)
    assert torch.equal(model.model.bert.embeddings.word_embeddings.weight,
                       ref.embeddings.word_embeddings.weight)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        pretrained_tokenizer(str(tmp_path / "nothing"))


@pytest.mark.parametrize("name", ["cnn", "vgg16", "resnet18"])
def test_folding_batchnorm_keeps_the_eval_function_and_rebuilds(name):
    """Pr-DP's private phase starts from the pruned model itself: every BatchNorm after a
    convolution is folded into it with its running statistics (eval outputs unchanged, zeros
    of a mask kept), and model.json's norm rebuilds the same modules for the saved weights."""
    from safeexport.models import build_from_spec, fold_batchnorm

    kwargs = {"in_channels": 3, "num_classes": 4, "input_size": [16, 16],
              "mean": [0.5] * 3, "std": [0.25] * 3, "width": 0.25}
    torch.manual_seed(0)
    model = build_model(name, kwargs)
    for m in model.modules():  # statistics and affine parameters far from their defaults
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first.weight.data[0] = 0.0
    x = torch.rand(8, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        before = model(x)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == n_bn > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.count_nonzero(first.weight[0]) == 0
    rebuilt = build_from_spec({"name": name, "kwargs": kwargs, "norm": "bn-folded"})
    rebuilt.load_state_dict(model.state_dict())  # strict: same modules, same keys
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
