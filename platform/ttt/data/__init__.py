"""Data: tokenizers, token-stream datasets (.npy / zarr, local or s3://), sampling and batching."""

from ttt.data.loader import Samples, TrainBatches, split_tokens, validation_batches
from ttt.data.streams import DataError, Dataset, TokenStream, open_dataset
from ttt.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "Dataset",
    "Samples",
    "TokenStream",
    "TrainBatches",
    "load_tokenizer",
    "open_dataset",
    "split_tokens",
    "validation_batches",
]
