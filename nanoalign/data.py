"""Datasets in TRL's vision formats, checked and normalised one sample at a time, in a resumable order.

Three formats, one per family of methods (TRL's column names; `--columns ours=theirs` renames others):

    sft:        messages (+ images)                 or prompt + completion (+ images)
    preference: prompt, chosen, rejected (+ images)
    rl:         prompt (+ images) (+ any other column, e.g. solution, handed to reward functions)

A `solution` column (a gold answer) makes the held-out samples an accuracy eval too (`accuracy_prompts`).
Messages are TRL's conversational layout: [{"role": ..., "content": str | [{"type": "image"} | {"type": "text",
"text": ...}]}]; a string prompt becomes a user turn, a string completion an assistant turn, and a user turn
with images but no placeholder gets them in front (as TRL does). Images (PIL, paths, bytes or {"bytes",
"path"} dicts, in "images" or one "image" column) are decoded here, so a corrupt file fails with its sample.

The sample order is a pure function of (seed, position): position p of the stream is sample
perm_epoch[p % N] with epoch = p // N, so resuming needs only the number of samples drawn.
"""

import io
from pathlib import Path

import torch
from PIL import Image

from nanoalign.shapes import shapes_sample

FORMAT_COLUMNS = {"sft": ("messages",), "preference": ("prompt", "chosen", "rejected"), "rl": ("prompt",)}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class BadSampleError(ValueError):
    """A sample that cannot be trained on; the message names it and says what to do."""


class ShapesDataset:
    """The built-in synthetic task as a map-style dataset (samples are drawn on access)."""

    def __init__(self, split: str, fmt: str, num_samples: int, overcount: float = 0.0):
        self.split, self.fmt, self.num_samples, self.overcount = split, fmt, num_samples, overcount

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        return shapes_sample(self.split, index, self.fmt, overcount=self.overcount)


# Held-out split names people use; `datasets` itself maps a file named eval.* to the split "test".
HELD_OUT_NAMES = ("eval", "evaluation", "test", "validation", "valid", "val", "dev")


def load_split(dataset: str, split: str, fmt: str, num_samples: int, columns: tuple[str, ...] = (), overcount: float = 0.0,
               *, held_out: bool = False):  # fmt: skip
    """`split` of `dataset` as a map-style dataset of raw rows (images not yet decoded); `num_samples` and
    `overcount` shape the built-in shapes split. held_out (the eval split): None when the data has none, as a
    single local file (training rows only) or a directory or hub dataset without it (or a HELD_OUT_NAMES)."""
    if dataset == "shapes":
        return ShapesDataset(split, fmt, num_samples, overcount)
    import datasets
    import pyarrow.parquet

    path = Path(dataset)
    # `datasets` fails on an empty local file without naming it (a bare StopIteration, an Arrow error)
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS):
        if file.stat().st_size == 0 or (file.suffix == ".parquet" and pyarrow.parquet.ParquetFile(file).metadata.num_rows == 0):
            raise ValueError(f"--dataset {dataset}: {file} has no rows; fill it or remove it")
    if path.is_file():  # one local file is the training split, whatever the split is called
        if path.suffix not in LOCAL_BUILDERS:
            raise ValueError(f"--dataset {dataset}: unsupported file type; use one of {sorted(LOCAL_BUILDERS)}")
        if held_out:
            return None
        ds = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        splits = datasets.load_dataset(dataset)  # DatasetDict: every split, so a missing one can be named
        candidates = [split] + [name for name in HELD_OUT_NAMES if held_out and split in HELD_OUT_NAMES and name != split]
        found = next((name for name in candidates if name in splits), None)
        if found is None:
            if held_out:
                return None
            raise ValueError(f"--dataset {dataset} has no split {split!r} (it has {sorted(splits)}); set --train-split")
        ds = splits[found]
    ds = ds.rename_columns(column_renames(columns, ds.column_names))
    # Decode images ourselves (see decode_image) so a corrupt file is reported with its sample.
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.Sequence | list):  # a Sequence has .feature, a list its one item
            inner = feature.feature if hasattr(feature, "feature") else feature[0]
            if isinstance(inner, datasets.Image):
                ds = ds.cast_column(name, datasets.Sequence(datasets.Image(decode=False)))
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in ds.column_names]
    if missing and not (fmt == "sft" and {"prompt", "completion"} <= set(ds.column_names)):
        raise ValueError(f"--dataset {dataset} [{split}] lacks column(s) {missing} needed for {fmt} data (it has "
                         f"{ds.column_names}); rename with --columns ours=theirs")  # fmt: skip
    return ds


def column_renames(columns: tuple[str, ...], column_names: list[str]) -> dict[str, str]:
    """--columns ours=theirs specs -> {theirs: ours}, checked against the dataset's columns."""
    renames = {}
    for spec in columns:
        ours, sep, theirs = spec.partition("=")
        if not sep or theirs not in column_names:
            raise ValueError(f"--columns {spec!r}: expected ours=theirs with theirs one of {column_names}")
        renames[theirs] = ours
    for theirs, ours in renames.items():
        if ours in column_names and ours not in renames:  # the rename would give two columns one name
            raise ValueError(f"--columns {ours}={theirs}: the dataset already has a column {ours!r}. Rename that one out of "
                             f"the way in the same flag (--columns {ours}={theirs} original_{ours}={ours}) or drop it from the data")  # fmt: skip
    return renames


def decode_image(image, sample_id: str, position: int) -> Image.Image:
    """One image as an RGB PIL image, fully decoded now (PIL decodes lazily, hiding corrupt files)."""
    try:
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, dict) and image.get("bytes"):
            pil = Image.open(io.BytesIO(image["bytes"]))
        elif isinstance(image, dict) and image.get("path"):
            pil = Image.open(image["path"])
        elif isinstance(image, (str, Path)):
            pil = Image.open(image)
        elif isinstance(image, bytes):
            pil = Image.open(io.BytesIO(image))
        else:
            raise TypeError(f"unsupported image value of type {type(image).__name__}")
        pil.load()
        return pil.convert("RGB")
    except Exception as err:  # any decoding failure becomes the same actionable error
        where = image.get("path") if isinstance(image, dict) else image if isinstance(image, (str, Path)) else ""
        raise BadSampleError(f"{sample_id}: image {position} {where!r} cannot be read ({type(err).__name__}: {err}). "
                             "Fix or remove the sample, or pass --skip-bad-samples to skip such samples.") from err  # fmt: skip


def _as_turns(value, role: str, field_name: str, sample_id: str) -> list[dict]:
    """A string becomes one turn of `role`; a list of messages is checked and kept."""
    if isinstance(value, str):
        return [{"role": role, "content": [{"type": "text", "text": value}]}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise BadSampleError(f"{sample_id}: column {field_name!r} must be a string or a list of {{role, content}} messages")
    # Arrow-backed datasets give every content item the union of all items' keys, filled with None
    # ({"type": "text", "text": "hi", "image": None}); chat templates test `'image' in item`, so drop them.
    return [
        {**m, "content": m["content"] if isinstance(m["content"], str) else [{k: v for k, v in c.items() if v is not None} for c in m["content"]]}
        for m in value
    ]


def num_placeholders(messages: list[dict]) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str) for c in m["content"] if c.get("type") == "image")


def _insert_placeholders(messages: list[dict], num_images: int, sample_id: str) -> list[dict]:
    """Put image placeholders in front of the first user turn when the data has images but none."""
    found = num_placeholders(messages)
    if found == 0 and num_images > 0:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        content = messages[first_user]["content"]
        content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        messages[first_user] = {**messages[first_user], "content": [{"type": "image"}] * num_images + content}
    elif found != num_images:
        raise BadSampleError(f"{sample_id}: the messages hold {found} image placeholders but the sample has {num_images} "
                             "images; each image needs exactly one {'type': 'image'} entry")  # fmt: skip
    return messages


def prepare_sample(raw: dict, fmt: str, sample_id: str) -> dict:
    """Check one raw row and normalise it -> {"sample_id", "images" (decoded RGB), and "messages" (sft) | "prompt",
    "chosen", "rejected" (preference) | "prompt" plus the other columns (rl)}. BadSampleError names the sample."""
    images = raw.get("images", raw.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    sample = {"sample_id": sample_id, "images": [decode_image(im, sample_id, i) for i, im in enumerate(images)]}
    if fmt == "sft":
        if "messages" in raw:
            messages = _as_turns(raw["messages"], "user", "messages", sample_id)
        else:
            messages = _as_turns(raw["prompt"], "user", "prompt", sample_id) + _as_turns(raw["completion"], "assistant", "completion", sample_id)
        if not messages:
            raise BadSampleError(f"{sample_id}: empty conversation; every SFT sample needs a user and an assistant turn")
        if not any(m["role"] == "assistant" and message_text(m) for m in messages):
            raise BadSampleError(f"{sample_id}: no assistant turn with text, so nothing to learn from; add the answer as a "
                                 "{'role': 'assistant', ...} message")  # fmt: skip
        if not any(m["role"] == "user" for m in messages):
            raise BadSampleError(f"{sample_id}: no user turn; the conversation needs a prompt")
        sample["messages"] = _insert_placeholders(messages, len(images), sample_id)
    elif fmt == "preference":
        sample["prompt"] = _insert_placeholders(_as_turns(raw["prompt"], "user", "prompt", sample_id), len(images), sample_id)
        for key in ("chosen", "rejected"):
            turns = _as_turns(raw[key], "assistant", key, sample_id)
            if not turns or not message_text(turns[-1]) or turns[-1]["role"] != "assistant":
                raise BadSampleError(f"{sample_id}: {key!r} must end with a non-empty assistant turn")
            sample[key] = turns
        if sample["chosen"] == sample["rejected"]:  # DPO's margin is 0 whatever the policy: nothing to learn
            raise BadSampleError(f"{sample_id}: 'chosen' and 'rejected' are identical; a preference pair must differ")
    elif fmt == "rl":
        sample["prompt"] = _insert_placeholders(_as_turns(raw["prompt"], "user", "prompt", sample_id), len(images), sample_id)
        sample.update({k: v for k, v in raw.items() if k not in ("prompt", "images", "image")})
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if "solution" in raw:  # a gold answer (RL: also a reward column): the accuracy eval uses it
        sample["solution"] = raw["solution"]
    return sample


def accuracy_prompts(samples: list[dict]) -> list[dict]:
    """The samples with a gold `solution`, as prompts to answer: an SFT conversation is cut before its
    last assistant turn; preference and RL samples have a prompt already."""
    prompts = []
    for s in samples:
        if "solution" not in s:
            continue
        prompt = s.get("prompt")
        if prompt is None:
            last = max(i for i, m in enumerate(s["messages"]) if m["role"] == "assistant")
            prompt = s["messages"][:last]
        prompts.append({"prompt": prompt, "images": s["images"], "solution": s["solution"], "sample_id": s["sample_id"]})
    return prompts


def message_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content.strip()
    return "".join(c.get("text", "") for c in content if c.get("type") == "text").strip()


def stream_indices(start: int, count: int, num_samples: int, seed: int) -> list[int]:
    """Dataset indices at positions [start, start + count) of the seeded, epoch-wise shuffled stream."""
    indices, perm, perm_epoch = [], None, -1
    for position in range(start, start + count):
        epoch = position // num_samples
        if epoch != perm_epoch:  # each epoch is its own permutation, reproducible from (seed, epoch)
            perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            perm_epoch = epoch
        indices.append(int(perm[position % num_samples]))
    return indices


def fetch_samples(dataset, indices: list[int], fmt: str, split: str, skip_bad: bool, check=None) -> tuple[list[dict], int]:
    """Load and prepare dataset[indices] -> (samples, number of bad ones skipped). check(sample), optional, raises
    BadSampleError for one that loads but cannot be used (e.g. an RL prompt past --max-length). With skip_bad, a bad
    sample is replaced by the next good index, so every rank gets as many (the same ones on a resumed run)."""
    samples, num_skipped = [], 0
    for index in indices:
        for attempt in range(len(dataset)):
            candidate = (index + attempt) % len(dataset)
            try:
                sample = prepare_sample(dataset[candidate], fmt, f"sample {candidate} of split {split!r}")
                if check is not None:
                    check(sample)
                samples.append({**sample, "index": candidate, "split": split})
                break
            except BadSampleError:
                if not skip_bad:
                    raise
                num_skipped += 1
        else:
            raise BadSampleError(f"split {split!r}: no usable sample at all (every sample failed to load)")
    return samples, num_skipped
