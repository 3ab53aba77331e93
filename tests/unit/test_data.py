"""Data: tokenizers, streams (.npy and zarr), samples, shuffling, sharding, resumable positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ttt.data import ByteTokenizer, DataError, Samples, TrainBatches, open_dataset, validation_batches
from ttt.data.corpus import prepare
from ttt.data.loader import split_tokens
from ttt.data.streams import TokenStream, write_dataset
from ttt.data.tokenizer import load_tokenizer


def stream(n: int) -> TokenStream:
    return TokenStream("train", np.arange(n, dtype=np.uint16))


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("héllo → ok")
    assert max(ids) < 256 and tok.bos_token_id == 256 and tok.vocab_size == 257
    assert tok.decode([tok.bos_token_id, *ids]) == "héllo → ok"


def test_samples_overlap_by_one_token():
    samples = Samples(stream(100), seq_len=10)
    assert len(samples) == 9  # ⌊(N − 1) / T⌋
    assert samples[0].tolist() == list(range(11))
    assert samples[1][0] == samples[0][-1] == 10
    inputs, targets = split_tokens(torch.from_numpy(np.stack([samples[3]])), vocab_size=257)
    assert inputs[0, 1:].tolist() == targets[0, :-1].tolist()


def test_shuffle_is_deterministic_per_seed_and_covers_each_epoch():
    samples = Samples(stream(1001), seq_len=10)  # 100 samples
    a, b, c = (TrainBatches(samples, 10, seed) for seed in (0, 0, 1))
    assert a.indices(3) == b.indices(3) and a.indices(3) != c.indices(3)
    epoch = sorted(i for pos in range(10) for i in a.indices(pos))
    assert epoch == list(range(100))
    assert sorted(i for pos in range(10, 20) for i in a.indices(pos)) == list(range(100))
    assert [a.indices(p) for p in range(10)] != [a.indices(p) for p in range(10, 20)]


def test_ranks_split_the_same_global_batch():
    samples = Samples(stream(1001), seq_len=10)
    whole = TrainBatches(samples, 8, seed=3)
    shards = [TrainBatches(samples, 8, seed=3, rank=r, world_size=4) for r in range(4)]
    for position in (0, 5, 13):  # 13 crosses into the second epoch
        assert [i for s in shards for i in s.indices(position)] == whole.indices(position)
    assert shards[1].batch(2).shape == (2, 11)


def test_position_is_all_resume_needs():
    samples = Samples(stream(1001), seq_len=10)
    first = TrainBatches(samples, 4, seed=0)
    later = TrainBatches(samples, 4, seed=0)
    assert torch.equal(first.batch(7), later.batch(7))


def test_too_short_streams_are_refused():
    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        TrainBatches(Samples(stream(50), seq_len=10), 8, seed=0)
    with pytest.raises(DataError, match="shorter than one sample of 11 tokens"):
        validation_batches(Samples(stream(5), seq_len=10), 4, 2)
    with pytest.raises(DataError, match="not divisible by 3 workers"):
        TrainBatches(Samples(stream(1001), seq_len=10), 8, seed=0, world_size=3)


def test_validation_batches_are_ordered_and_sharded():
    samples = Samples(stream(1001), seq_len=10)
    batches = validation_batches(samples, count=5, batch_size=2)
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert batches[0][1, 0] == 10
    assert sum(b.shape[0] for b in validation_batches(samples, 5, 2, rank=1, world_size=2)) == 2


def test_out_of_vocabulary_ids_are_a_data_error():
    with pytest.raises(DataError, match="token id 300 is outside the model's vocabulary of 257"):
        split_tokens(torch.tensor([[1, 300, 2]]), vocab_size=257)


def test_prepare_holds_out_every_nth_document(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(10):
        (docs / f"{i:02d}.txt").write_text(f"document {i}\n" * 3)
    meta = prepare([str(docs)], str(tmp_path / "ds"), ByteTokenizer(), val_every=5)
    assert (meta["documents_train"], meta["documents_val"]) == (8, 2)
    data = open_dataset(str(tmp_path / "ds"))
    val = ByteTokenizer().decode(data.split("val")[0 : len(data.split("val"))].tolist())
    assert "document 4" in val and "document 9" in val and "document 3" not in val
    train = data.split("train")[0:20]
    assert train[0] == 256  # BOS before every document
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["vocab_size"] == 257


def test_prepare_replaces_an_earlier_dataset_but_never_other_files(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"document {i}\n")
    prepare([str(docs)], str(tmp_path / "ds"), ByteTokenizer(), val_every=2)
    (docs / "4.txt").write_text("document 4\n")
    assert prepare([str(docs)], str(tmp_path / "ds"), ByteTokenizer(), val_every=2)["documents_train"] == 3
    with pytest.raises(DataError, match=r"--output: .* not a prepared dataset"):
        prepare([str(docs)], str(docs), ByteTokenizer(), val_every=2)  # would delete the sources
    assert sorted(p.name for p in docs.iterdir()) == [f"{i}.txt" for i in range(5)]
    with pytest.raises(DataError, match="is a file"):
        prepare([str(docs)], str(docs / "0.txt"), ByteTokenizer(), val_every=2)
    assert (docs / "0.txt").read_text() == "document 0\n"


def test_prepare_refuses_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "nope")], str(tmp_path / "ds"), ByteTokenizer())
    (tmp_path / "one.txt").write_text("only one")
    with pytest.raises(DataError, match="at least two documents"):
        prepare([str(tmp_path / "one.txt")], str(tmp_path / "ds"), ByteTokenizer())


def test_zarr_streams_read_like_npy(tmp_path):
    zarr = pytest.importorskip("zarr")  # a declared dependency: present in every install
    tokens = np.arange(500, dtype=np.uint32) % 257
    (tmp_path / "ds").mkdir()
    array = zarr.open(
        str(tmp_path / "ds" / "train"), mode="w", shape=tokens.shape, dtype=tokens.dtype, chunks=(64,)
    )
    array[:] = tokens
    write_dataset(tmp_path / "npy", {"train": tokens}, {})
    from_zarr, from_npy = (open_dataset(str(tmp_path / d)).split("train") for d in ("ds", "npy"))
    assert len(from_zarr) == len(from_npy) == 500
    assert np.array_equal(from_zarr[100:200], from_npy[100:200])


def test_missing_splits_and_datasets_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "none"))
    write_dataset(tmp_path / "ds", {"train": np.arange(10, dtype=np.uint16)}, {})
    with pytest.raises(DataError, match="has no 'val' stream"):
        open_dataset(str(tmp_path / "ds")).split("val")
    with pytest.raises(DataError, match="unknown bundled corpus"):
        open_dataset("bundled:wikipedia")


def test_hugging_face_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|begin_of_text|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path))
    assert (hf.vocab_size, hf.bos_token_id) == (4, 0)
    assert hf.encode("hello world hello") == [2, 3, 2]
    with pytest.raises(ValueError, match="not a token"):
        load_tokenizer(str(tmp_path), bos_token="<s>")
    with pytest.raises(ValueError, match="no tokenizer file"):
        load_tokenizer(str(tmp_path / "missing"))
