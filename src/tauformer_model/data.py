"""Training data with no download: the Python standard library's own .py sources (or --data PATH).

Text is split into train/val by file (deterministic: a CRC32 of the file's relative path), encoded
once (bytes, vocab 256; or a BPE trained locally with the `tokenizers` package) and cached as
flat token files read through np.memmap. Each file is a document: the cache keeps, beside each split's
tokens, the offset where every document starts (``<split>.docs.npy``), so that a window knows the document
of each of its tokens (packed training, docs/math.md §Packed sequences). Batches are random windows drawn
with a torch.Generator that the trainer owns (its state is part of the checkpoint, so a resumed run draws
the same batches).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """A corpus the trainer cannot use (no text, a split too short); the message says what to change."""


VAL_EVERY = 20  # a file goes to val when crc32(relative path) % VAL_EVERY == 0 (about 5 %)
SEPARATOR = b"\n"  # between files; it opens the next document (as a BOS token would)
# Part of every cache entry's name: entries written before document offsets were kept have another name,
# so they are never read without them (the corpus is tokenised again into a new entry; the old one can go).
CACHE_FORMAT = 2


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "tauformer"


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_files(source: pathlib.Path | None) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """(root, files): the stdlib's .py files (site-packages excluded) or the files of ``source``."""
    if source is None:
        root = stdlib_root()
        files = [p for p in root.rglob("*.py")
                 if p.is_file() and p.relative_to(root).parts[0] not in ("site-packages", "dist-packages")]
    elif source.is_file():
        root, files = source.parent, [source]
    elif source.is_dir():
        root, files = source, [p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")]
    else:
        raise FileNotFoundError(f"--data {source}: no such file or folder")
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(root: pathlib.Path, files: list[pathlib.Path]) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    val = [p for p in files if zlib.crc32(p.relative_to(root).as_posix().encode()) % VAL_EVERY == 0]
    val_set = set(val)
    return [p for p in files if p not in val_set], val


def read_documents(files: list[pathlib.Path]) -> list[bytes]:
    """The files' bytes, one document each; binary files (with a NUL byte) are skipped."""
    return [data for data in (p.read_bytes() for p in files) if b"\0" not in data]


def cut_documents(documents: list[bytes], cut: int) -> tuple[list[bytes], list[bytes]]:
    """SEPARATOR.join(documents) cut at byte `cut`, as two lists of documents whose joins are the two parts
    (the document the cut falls in is split in two; a cut on a separator leaves the second part an empty
    first document, so that its text still starts with the separator)."""
    start = 0
    for i, doc in enumerate(documents):
        if cut <= start + len(doc):
            local = cut - start
            return documents[:i] + [doc[:local]], [doc[local:]] + documents[i + 1:]
        start += len(doc) + len(SEPARATOR)
    return list(documents), []


def joined_length(documents: list[bytes]) -> int:
    """len(SEPARATOR.join(documents))."""
    return sum(len(d) for d in documents) + len(SEPARATOR) * max(len(documents) - 1, 0)


def encode_documents(tok, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of SEPARATOR.join(documents), each document encoded alone (no token spans a boundary),
    and where each document starts (int64): document i > 0 starts at the separator before it."""
    if tok.kind == "byte":
        ids, lengths, sep = np.frombuffer(SEPARATOR.join(documents), np.uint8), [len(d) for d in documents], 1
    else:
        sep_ids = np.asarray(tok.encode(SEPARATOR), dtype=np.int64)
        encoded = [np.asarray(e, dtype=np.int64) for e in tok.encode_batch(documents)]
        parts = [part for i, e in enumerate(encoded) for part in ((sep_ids, e) if i else (e,))]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        lengths, sep = [len(e) for e in encoded], len(sep_ids)
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64) + sep)
    return ids, np.concatenate([[0], ends[:-1] - sep]).astype(np.int64)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: pathlib.Path) -> None:
        pass


class BPETokenizer:
    """A byte-level BPE of the `tokenizers` package, trained locally on the training text."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: bytes, vocab_size: int) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise DataError("--tokenizer bpe (the 30m preset's) needs the tokenizers package: "
                            "pip install 'tauformer[bpe]', or give --tokenizer byte") from None

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        chunk = 1 << 20
        s = text.decode("utf-8", errors="replace")
        tok.train_from_iterator((s[i:i + chunk] for i in range(0, len(s), chunk)), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: pathlib.Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[bytes]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch([t.decode("utf-8", errors="replace") for t in texts])]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, path: pathlib.Path) -> None:
        self.tok.save(str(path))


def load_tokenizer(kind: str, folder: pathlib.Path):
    """The tokenizer saved in ``folder`` (a checkpoint or a data cache entry)."""
    return ByteTokenizer() if kind == "byte" else BPETokenizer.load(folder / "tokenizer.json")


@dataclass
class Dataset:
    train: np.ndarray  # memmap of token ids
    val: np.ndarray
    tokenizer: object
    folder: pathlib.Path  # the cache entry
    train_docs: np.ndarray | None = None  # int64 start of every document in `train` (None: one document)
    val_docs: np.ndarray | None = None

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and y = x shifted by one, int64 on ``device``."""
        return self.windows(split, self.starts(split, batch_size, block_size, generator), block_size, device)

    def starts(self, split: str, n: int, block_size: int, generator: torch.Generator) -> list[int]:
        """n random window starts (data-parallel ranks draw a global batch alike and read their slice)."""
        return torch.randint(self.last_start(split, block_size) + 1, (n,), generator=generator).tolist()

    def evaluation_starts(self, split: str, n: int, block_size: int) -> list[int]:
        """n window starts spread evenly from the split's first token to its last window: the same text for
        every seed and every run, so val losses of different seeds compare on one text."""
        last = self.last_start(split, block_size)
        return [round(i * last / max(1, n - 1)) for i in range(n)]

    def last_start(self, split: str, block_size: int) -> int:
        """The last start of a window of block_size inputs and its shifted targets in ``split``."""
        data = self.train if split == "train" else self.val
        if len(data) <= block_size + 1:
            raise DataError(f"the {split} split of the corpus in {self.folder} has {len(data)} tokens; windows of "
                            f"--block-size {block_size} need at least {block_size + 2}: give --data more text "
                            f"or a smaller --block-size")
        return len(data) - block_size - 2

    def windows(self, split: str, starts: list[int], block_size: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        window = np.stack([np.asarray(data[s:s + block_size + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(window).to(device)
        return w[:, :-1], w[:, 1:]

    def document_ids(self, split: str, starts: list[int], block_size: int) -> torch.Tensor:
        """The document (its index in the split) of every input token of the windows at ``starts``: (B, T)
        int64 on the host, TauGPT's ``doc_ids`` (kept on the host: the model reads the boundaries there)."""
        offsets = self.train_docs if split == "train" else self.val_docs
        positions = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(block_size, dtype=np.int64)
        if offsets is None:
            return torch.zeros(positions.shape, dtype=torch.long)
        return torch.from_numpy(np.searchsorted(offsets, positions, side="right") - 1)


def _fingerprint(root: pathlib.Path, files: list[pathlib.Path], tokenizer: str, vocab_size: int) -> str:
    h = hashlib.sha1(f"{root.resolve()}|{tokenizer}|{vocab_size}|{VAL_EVERY}|{CACHE_FORMAT}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _replace(path: pathlib.Path, write) -> None:
    """Write a file under a temporary name, then move it into place (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def split_documents(root: pathlib.Path, files: list[pathlib.Path], data) -> tuple[list[bytes], list[bytes]]:
    """The train and val documents: split by file, or (one file, or too few to split by file) the last 5 %
    of the text is val."""
    train_files, val_files = split_files(root, files)
    if train_files and val_files:
        train_docs, val_docs = read_documents(train_files), read_documents(val_files)
    else:
        documents = read_documents(files)
        total = joined_length(documents)
        train_docs, val_docs = cut_documents(documents, total - total // VAL_EVERY)
    train_bytes, val_bytes = joined_length(train_docs), joined_length(val_docs)
    if not any(d.strip(SEPARATOR) for d in train_docs) or not val_bytes:
        raise DataError(f"--data {data or root}: {len(files)} files, {train_bytes + val_bytes} bytes of text after "
                        f"skipping binary files (those with a NUL byte): too little for a train and a val split")
    return train_docs, val_docs


def build_entry(folder: pathlib.Path, root: pathlib.Path, files: list[pathlib.Path], data, tokenizer: str,
                vocab_size: int, log) -> None:
    """Tokenise the corpus into the cache entry `folder`: per split its tokens (<split>.bin) and the start
    of every document (<split>.docs.npy); meta.json last, which marks the entry complete."""
    train_docs, val_docs = split_documents(root, files, data)
    folder.mkdir(parents=True, exist_ok=True)
    size = joined_length(train_docs) + joined_length(val_docs)
    log(f"tokenising {len(files)} files under {root} ({size / 1e6:.1f} MB) into {folder}")
    tok = ByteTokenizer() if tokenizer == "byte" else BPETokenizer.train(SEPARATOR.join(train_docs), vocab_size)
    tok.save(folder / "tokenizer.json")
    dtype = np.uint8 if tok.vocab_size <= 256 else np.uint16
    for split, documents in (("train", train_docs), ("val", val_docs)):
        ids, offsets = encode_documents(tok, documents)
        _replace(folder / f"{split}.bin", lambda f: f.write(np.asarray(ids, dtype=dtype).tobytes()))
        _replace(folder / f"{split}.docs.npy", lambda f: np.save(f, offsets))
    meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "root": str(root), "n_files": len(files), "format": CACHE_FORMAT}
    _replace(folder / "meta.json", lambda f: f.write(json.dumps(meta).encode()))


def load_dataset(data: str | None = None, cache_dir: str | None = None, tokenizer: str = "byte",
                 vocab_size: int = 4096, log=print) -> Dataset:
    """Tokenise (once) and open the corpus. ``data``: None (the stdlib), a text file or a folder."""
    root, files = list_files(pathlib.Path(data) if data else None)
    if not files:
        raise FileNotFoundError(f"no files found under {root}")
    vocab = 256 if tokenizer == "byte" else vocab_size
    folder = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    folder = folder / f"{tokenizer}-{_fingerprint(root, files, tokenizer, vocab)}"
    if not (folder / "meta.json").exists():
        build_entry(folder, root, files, data, tokenizer, vocab_size, log)
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    splits = {split: np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r") for split in ("train", "val")}
    docs = {split: np.load(folder / f"{split}.docs.npy") for split in ("train", "val")}
    return Dataset(train=splits["train"], val=splits["val"], tokenizer=load_tokenizer(meta["tokenizer"], folder),
                   folder=folder, train_docs=docs["train"], val_docs=docs["val"])
